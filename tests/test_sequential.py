"""search: sequential (docs/training.md T31): stop or continue at every group boundary, decided by one LinUCB per
boundary from the pooled state and that depth's exit statistics, learned with full information from a price per
layer on 1 - p(true class); every exit on the path trained, with self-distillation from the deepest."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ROOT, run_cli, two_epoch_tiny
from test_trainer import N_TRAIN, SEQ, make_split, setup, trainer_for  # noqa: F401 (setup is a fixture)
from torch import Tensor

from dht.config import ConfigError
from dht.config_loading import load_config, read_params
from dht.curves import choose
from dht.policy import Policy, exit_statistics, predict
from dht.rewards import continue_rewards

DATASET = "embedded-news"
PRICES = [0.0, 0.05, 0.01, 10.0]  # unsorted on purpose: the curve is traced in ascending order
SEQUENTIAL = {"search": "sequential", "layers": [3, 6, 9, 12], "heads": [8, 10, 12], "depth_feedback": "all_depths",
              "exit_loss": "path", "all_depths_reward": "difference", "depth_loss": "error_probability",
              "depth_price": 0.01, "exit_weights": "depth", "distil_weight": 0.5}


def make_cfg(mode: dict | None = None, models: list[str] | None = None, others: dict | None = None, **train):
    """The tiny profile (12 layers, b = c = 3) with a sequential mode `q-dht`, batches of 16."""
    raw = two_epoch_tiny(copy.deepcopy(read_params(ROOT / "params.yaml")))
    raw["profiles"]["tiny"]["train"].update({"batch_size": 16, "checkpoint_every": 2, **train})
    raw["dht"]["modes"]["q-dht"] = {**SEQUENTIAL, **(mode or {})}
    for name, change in (others or {}).items():
        raw["dht"]["modes"][name].update(change)
    tiny = raw["profiles"]["tiny"]
    tiny["run"] = {**tiny.get("run", {}), "models": models or ["vanilla-12", "t-dht", "q-dht"]}
    return load_config(ROOT / "params.yaml", profile="tiny", raw=raw)


@pytest.fixture(scope="module")
def qsetup(setup):  # noqa: F811
    """test_trainer's model and splits, with arm features that cover the sequential mode's heads (t-dht's)."""
    return setup


# ---- configuration -------------------------------------------------------------------------------------------


def test_the_configuration_refuses_a_sequential_mode_it_cannot_run():
    """One error naming the key and the fix, before any work."""
    assert make_cfg().dht.modes["q-dht"].search == "sequential"
    cases = [({"layers": [3, 9, 12]}, "every group boundary"), ({"layers": [6, 9, 12]}, "every group boundary"),
             ({"heads": None}, "needs `layers`"), ({"depth_feedback": "chosen"}, "set depth_feedback: all_depths"),
             ({"exit_loss": "chosen"}, "set exit_loss: path"), ({"all_depths_reward": "ratio"}, "difference"),
             ({"arms": ["12L12H"]}, "not `arms`"), ({"distil_weight": 1.5}, "distil_weight")]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            make_cfg(change)
    # read by the sequential mode only: not silently ignored on another
    with pytest.raises(ConfigError, match="t-dht: exit_weights, distil_weight, continue_reward and prices are read by"):
        make_cfg(others={"t-dht": {"distil_weight": 0.3}})


# ---- the reward and the context ------------------------------------------------------------------------------


def test_continuing_is_worth_the_error_it_saves_less_the_price_of_its_layers():
    errs = torch.tensor([[0.6, 0.5, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    depths = [3, 6, 9, 12]
    nxt = continue_rewards(errs, depths, price=0.01, how="next")
    assert torch.allclose(nxt, torch.tensor([[0.07, 0.37, -0.03], [-0.03, -0.03, -0.03]], dtype=torch.float64))
    # best: at 3 the sample gains most by going to 9 (0.5 saved for 6 layers), not by the next group's 0.1
    best = continue_rewards(errs, depths, price=0.01, how="best")
    assert torch.allclose(best, torch.tensor([[0.44, 0.37, -0.03], [-0.03, -0.03, -0.03]], dtype=torch.float64))
    with pytest.raises(ValueError, match="samples, 4 depths"):
        continue_rewards(errs[:, :3], depths, 0.01)


def test_the_exit_statistics_read_how_sure_the_exit_is():
    stats = exit_statistics(torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert stats[0, 0] > 0.99 and stats[0, 1] > 0.99 and stats[0, 2] < 0.01
    assert torch.allclose(stats[1], torch.tensor([1 / 3, 0.0, 1.0]), atol=1e-6)


# ---- the router ----------------------------------------------------------------------------------------------


def route(policy: Policy, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Full-information steps on contexts whose second-to-last entry (the exit's margin) tells hard samples
    (negative) from easy ones: a hard sample's error falls by 0.3 a group up to 9 layers, an easy one's is 0.05 at
    every depth. Then the greedy stop decisions at the first boundary for 100 hard and 100 easy contexts."""
    g = torch.Generator().manual_seed(seed)
    size = policy.stop_context_size
    for _ in range(30):
        x = torch.randn(32, size, generator=g)
        hard = x[:, -2] < 0
        errs = torch.where(hard[:, None], torch.tensor([0.9, 0.6, 0.3, 0.3]), torch.tensor([0.05] * 4))
        errs = errs + 0.02 * torch.rand(32, 4, generator=g)
        contexts = [policy.decide_stops(k, x, greedy=False, learn=True)[1] for k in range(3)]
        policy.learn_sequential(contexts, errs, [], errs[:, -1], torch.full((32,), 12))
    x = torch.randn(200, size, generator=g)
    x[:, -2] = torch.where(torch.arange(200) < 100, -1.5, 1.5)
    stop, _ = policy.decide_stops(0, x, greedy=True, learn=False)
    return stop[:100], stop[100:]


def test_the_router_sends_hard_samples_deeper(qsetup):
    model, feats, _, _ = qsetup
    cfg = make_cfg()
    stop_hard, stop_easy = route(Policy(cfg, cfg.dht.modes["q-dht"], feats, model.config))
    assert stop_hard.float().mean() < 0.1 and stop_easy.float().mean() > 0.9


def test_a_router_with_the_reward_sign_broken_fails_the_router_test(qsetup, monkeypatch):
    """The test above fails on a broken router: with the reward's sign flipped the hard samples stop."""
    import dht.policy

    real = dht.policy.continue_rewards
    monkeypatch.setattr(dht.policy, "continue_rewards", lambda *a, **k: -real(*a, **k))
    model, feats, _, _ = qsetup
    cfg = make_cfg()
    stop_hard, stop_easy = route(Policy(cfg, cfg.dht.modes["q-dht"], feats, model.config))
    assert not (stop_hard.float().mean() < 0.1 and stop_easy.float().mean() > 0.9)


def test_a_higher_price_stops_every_sample_no_later_and_matches_a_bandit_trained_at_it(qsetup):
    """T31's dial: the stop bandits learned at depth_price 0.01; at a higher stop_price a sample that stopped still
    stops (the sets of stopped samples nest), at 0.05 the easy samples stop and the hard ones go on (a group saves
    them 0.3 of error, more than 3 layers x 0.05), at 1.0 everyone stops; and the decisions at 0.05 are those of
    bandits trained at 0.05 (the price only moves continuing's estimate), but for samples at the boundary."""
    model, feats, _, _ = qsetup
    cfg = make_cfg()
    policy = Policy(cfg, cfg.dht.modes["q-dht"], feats, model.config)
    route(policy)
    x = torch.randn(200, policy.stop_context_size, generator=torch.Generator().manual_seed(1))
    x[:, -2] = torch.where(torch.arange(200) < 100, -1.5, 1.5)
    stops = {}
    for price in (0.0, 0.01, 0.05, 0.2, 1.0):
        policy.stop_price = price
        stops[price] = policy.decide_stops(0, x, greedy=True, learn=False)[0]
    prices = sorted(stops)
    assert all(bool((stops[a] <= stops[b]).all()) for a, b in zip(prices, prices[1:], strict=False))
    assert stops[0.05][:100].float().mean() < 0.1 and stops[0.05][100:].float().mean() > 0.9
    assert bool(stops[1.0].all())
    priced = make_cfg({"depth_price": 0.05})
    trained_at = Policy(priced, priced.dht.modes["q-dht"], feats, model.config)
    route(trained_at)
    agree = (trained_at.decide_stops(0, x, greedy=True, learn=False)[0] == stops[0.05]).float().mean()
    assert agree >= 0.98
    # the price travels with the bandits (a saved model predicts at the price chosen for it)
    policy.stop_price = 0.05
    again = Policy(cfg, cfg.dht.modes["q-dht"], feats, model.config)
    again.load_state_dict(policy.state_dict())
    assert again.stop_price == 0.05


def test_the_point_chosen_on_validation_is_the_cheapest_within_the_tolerance():
    from dht.curves import mean_curve

    curve = [{"dial": 0.0, "val_accuracy": 0.84, "val_infer_flop_ratio": 0.9, "accuracy": 0.83, "infer_flop_ratio": 0.9},
             {"dial": 0.02, "val_accuracy": 0.83, "val_infer_flop_ratio": 0.6, "accuracy": 0.80, "infer_flop_ratio": 0.6},
             {"dial": 0.05, "val_accuracy": 0.80, "val_infer_flop_ratio": 0.4, "accuracy": 0.82, "infer_flop_ratio": 0.4}]
    picked = choose(curve, 0.835, 0.01)  # 0.83 and 0.84 are within 0.01; 0.80 is not, however good on test
    assert picked["dial"] == 0.02 and picked["met"]
    assert choose(curve, 0.90, 0.01)["dial"] == 0.0 and not choose(curve, 0.90, 0.01)["met"]  # the most accurate
    mean = mean_curve([curve, [{**p, "accuracy": p["accuracy"] + 0.02} for p in curve]])
    assert [round(p["accuracy"], 6) for p in mean] == [0.84, 0.81, 0.83]
    assert mean[0]["accuracy_std"] == pytest.approx(0.02 / 2 ** 0.5)
    with pytest.raises(ValueError, match="different dial grids"):
        mean_curve([curve, curve[:2]])


def test_a_curve_needs_the_next_groups_reward_and_a_sequential_mode():
    with pytest.raises(ConfigError, match="continue_reward: next or prices: null"):
        make_cfg({"continue_reward": "best", "prices": [0.0, 0.1]})
    with pytest.raises(ConfigError, match="prices are read by search: sequential only"):
        make_cfg(others={"t-dht": {"prices": [0.0, 0.1]}})
    raw = two_epoch_tiny(copy.deepcopy(read_params(ROOT / "params.yaml")))
    raw["dht"]["modes"]["q-dht"] = {**SEQUENTIAL, "prices": [0.0, 0.1]}
    raw["profiles"]["tiny"]["run"] = {**raw["profiles"]["tiny"].get("run", {}), "models": ["vanilla-12", "q-dht"]}
    raw["data"]["val_fraction"] = 0.0
    with pytest.raises(ConfigError, match="data.val_fraction = 0 holds none out"):
        load_config(ROOT / "params.yaml", profile="tiny", raw=raw)


# ---- training and inference ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(qsetup, tmp_path):
    """The stop bandits, their normalisers and the accounting of mixed depths are in the checkpoint."""
    from test_trainer import run

    cfg = make_cfg()
    _, _, _, test = qsetup
    ref_progress, ref_metrics = run(trainer_for(qsetup, "q-dht", cfg), test)
    assert len({k for e in ref_progress.selections.values() for k in e if k.startswith("layers/")}) >= 2

    class Killed(Exception):
        pass

    def kill_at(step):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        trainer_for(qsetup, "q-dht", cfg, checkpoint_dir=tmp_path, on_step=kill_at).fit(progress_bar=False)
    resumed = trainer_for(qsetup, "q-dht", cfg, checkpoint_dir=tmp_path)
    assert resumed.load_checkpoint() and 0 < resumed.progress.step < 7
    progress, metrics = run(resumed, test)
    assert metrics == ref_metrics
    assert progress.train_flops == ref_progress.train_flops and progress.selections == ref_progress.selections


def test_samples_that_stop_leave_the_batch_and_read_their_exit(qsetup, monkeypatch):
    """Inference: the boundary bandit stops every other sample after the b = 3 fixed layers, the others go on to
    12 layers; the layers after 3 run on the others alone, a stopped sample's prediction is the 3-layer exit's,
    and its FLOPs are 3 layers' and one exit's, a deep sample's 12 layers' and four exits'."""
    from dht.flops import exit_read_flops, forward_flops
    from dht.walk import exit_logits

    model, feats, _, test = qsetup
    cfg = make_cfg()
    policy = Policy(cfg, cfg.dht.modes["q-dht"], feats, model.config)
    monkeypatch.setattr(policy, "decide_stops", lambda k, x, greedy, learn: (
        (torch.arange(len(x)) % 2 == 0) if k == 0 else torch.zeros(len(x), dtype=torch.bool), x))
    sizes: list[tuple[int, int]] = []
    real = model.run_layers

    def counting(state, keep, first, stop, heads=None):
        sizes.append((first, state.shape[0]))
        return real(state, keep, first, stop, heads)

    monkeypatch.setattr(model, "run_layers", counting)
    batch = 8
    pred = predict(model, policy, test, torch.device("cpu"), batch, SEQ)
    stopped = torch.arange(len(test)) % batch % 2 == 0
    assert pred.layers[stopped].unique().tolist() == [3] and pred.layers[~stopped].unique().tolist() == [12]
    assert all(n == batch // 2 for first, n in sizes if first >= 3) and any(first >= 3 for first, _ in sizes)
    model.eval()
    with torch.no_grad():
        shallow = exit_logits(model, test.input_ids, test.attention_mask, [3])[0].softmax(-1)
    assert torch.allclose(pred.probs[stopped], shallow[stopped], atol=1e-5)
    conf = model.config
    assert pred.flops[stopped].unique().tolist() == [forward_flops(SEQ, [12] * 3, conf)]
    deep = [forward_flops(SEQ, row.tolist(), conf) + exit_read_flops(3, conf) for row in pred.heads[~stopped]]
    assert pred.flops[~stopped].tolist() == deep and bool((pred.heads[~stopped, 3:] < 12).any())


@pytest.mark.slow
def test_snakemake_trains_a_sequential_mode_from_the_reference_and_dht_predict_reads_it(tiny_project):
    """A sequential mode added to params.yaml as a user would (init: reference, its own per-depth exit heads) is
    trained by Snakemake after the reference, its metrics count mixed depths, and `dht predict` answers with it."""
    from test_pipeline import set_params

    project = tiny_project

    def edit(raw):
        tiny = two_epoch_tiny(raw)["profiles"]["tiny"]
        raw["dht"]["modes"]["q-dht"] = {**SEQUENTIAL, "init": "reference", "exit_heads": "per_depth",
                                        "prices": PRICES}
        tiny["run"] = {**tiny.get("run", {}), "models": ["vanilla-12", "vanilla-3", "t-dht", "q-dht"]}
    set_params(project, edit)
    target = f"results/{DATASET}/q-dht/metrics.json"
    out = run_cli(["snakemake", "--cores", "1", target, "--config", "profile=tiny"], cwd=project)
    text = out.stdout + out.stderr
    assert f"train {DATASET}/q-dht: starting from the trained reference" in text
    metrics = json.loads((project / target).read_text())
    assert 3 <= metrics["mean_layers"] <= 12 and 0 < metrics["infer_flop_ratio"] <= 1.2
    # the curve: every price on both splits, FLOPs falling as the price rises; the predictions at the price the
    # rule picks on the validation split alone (recomputed here from the curve's validation columns)
    curve = metrics["curve"]
    assert [p["dial"] for p in curve] == sorted(PRICES)
    flops = [p["val_infer_flop_ratio"] for p in curve]
    assert flops == sorted(flops, reverse=True) and flops[0] > flops[-1], flops
    reference = json.loads((project / f"results/{DATASET}/vanilla-12/metrics.json").read_text())
    assert metrics["chosen"]["dial"] == choose(curve, reference["val_accuracy"], 0.01)["dial"] == metrics["stop_price"]
    at = next(p for p in curve if p["dial"] == metrics["stop_price"])
    assert (metrics["accuracy"], metrics["infer_flop_ratio"]) == (at["accuracy"], at["infer_flop_ratio"])
    assert f"train {DATASET}/q-dht: price {metrics['stop_price']:g} chosen on the validation split" in text
    model_dir = project / f"models/{DATASET}/q-dht"
    assert json.loads((model_dir / "config.json").read_text())["exit_heads"] == "per_depth"
    assert json.loads((model_dir / "dht_policy.json").read_text())["search"] == "sequential"
    (project / "texts.txt").write_text("a text about the market\nanother one\n")
    answer = run_cli(["dht", "predict", "--model", str(model_dir), "--input", "texts.txt", "--format", "jsonl"],
                     cwd=project).stdout.strip().splitlines()
    rows = [json.loads(line) for line in answer]
    assert len(rows) == 2 and all(row["layers"] in (3, 6, 9, 12) for row in rows), rows
    # the user's dial: at a price no group can pay for, every text stops after the b = 3 fixed layers
    answer = run_cli(["dht", "predict", "--model", str(model_dir), "--input", "texts.txt", "--format", "jsonl",
                      "--price", "10"], cwd=project).stdout.strip().splitlines()
    assert [json.loads(line)["layers"] for line in answer] == [3, 3]


@pytest.mark.parametrize("exit_weights, distil", [("depth", 0.5), ("uniform", 0.0)])
def test_a_samples_loss_reads_every_exit_on_its_path(qsetup, exit_weights, distil):
    """The gradient pass's loss of a sample that stops after d layers: the mean of its exits' losses up to d,
    weighed by depth (or not), each below the deepest mixed with the KL divergence from the teacher's
    probabilities; exits past its stop are not read."""
    import torch.nn.functional as F

    from dht.walk import exit_logits, path_points, start, walk

    model, feats, _, test = qsetup
    cfg = make_cfg({"exit_weights": exit_weights, "distil_weight": distil})
    trainer = trainer_for(qsetup, "q-dht", cfg)
    policy, model = trainer.policy, trainer.model
    ids, mask, labels = test.batch(torch.arange(8), torch.device("cpu"))
    depth = torch.tensor([3, 6, 9, 12, 3, 6, 9, 12])
    teacher = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    groups = [{"plan": torch.ones(8, 3, 12, dtype=torch.bool)} for _ in range(3)]
    seq = {"depth": depth, "teacher": teacher, "groups": groups}
    reads: list[Tensor] = []
    model.eval()
    with torch.no_grad():
        walk(start(model, ids, mask), path_points(model.config, 12),
             trainer._sequential_reads(policy, seq, labels, torch.zeros(8, 12, dtype=torch.long), reads))
        exits = exit_logits(model, ids, mask, [3, 6, 9, 12])
    want = []
    for i in range(8):
        total = weight = 0.0
        for d, logits in zip([3, 6, 9, 12], exits, strict=True):
            if d > depth[i]:
                break
            loss = F.cross_entropy(logits[i : i + 1], labels[i : i + 1])
            if d < 12:
                kl = F.kl_div(logits[i : i + 1].log_softmax(-1), teacher[i : i + 1].log_softmax(-1), log_target=True,
                              reduction="sum")
                loss = (1 - distil) * loss + distil * kl
            w = d if exit_weights == "depth" else 1
            total, weight = total + w * float(loss), weight + w
        want.append(total / weight)
    assert torch.allclose(reads[0], torch.tensor(want), atol=1e-5)


def test_depth_memory_epoch_restarts_the_stop_bandits(qsetup):
    """T28 for the sequential mode: the boundary bandits start again (A = lambda I, b = 0); their normalisers keep
    their statistics."""
    model, feats, _, _ = qsetup
    cfg = make_cfg({"depth_memory": "epoch"})
    policy = Policy(cfg, cfg.dht.modes["q-dht"], feats, model.config)
    route(policy)
    assert all(int(bandit.counts.sum()) > 0 for bandit in policy.ucb_s)
    seen = [copy.deepcopy(norm.state_dict()) for norm in policy.norm_s]
    policy.forget_depths()
    assert all(int(bandit.counts.sum()) == 0 for bandit in policy.ucb_s)
    for norm, before in zip(policy.norm_s, seen, strict=True):
        after = norm.state_dict()
        assert all(torch.equal(torch.as_tensor(after[k]), torch.as_tensor(v)) for k, v in before.items())
