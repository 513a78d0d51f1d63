"""DHT training (Algorithms 2-3) and inference: queues, rewards, resume, failures, persistence."""

from __future__ import annotations

import copy
import re
from collections import Counter

import pytest
import torch
from conftest import ROOT, mode_spec, two_epoch_tiny
from test_integrity import RunsCode, assert_runs_code

from dht.arm_features import arm_space, compute_arm_features
from dht.config_loading import load_config, read_params
from dht.evaluation import SplitData, evaluate
from dht.flops import forward_flops, layer_flops
from dht.integrity import read_checkpoint, write_checkpoint, write_manifest
from dht.model import DHTConfig, DHTForSequenceClassification
from dht.policy import LayerQueue, predict
from dht.trainer import Trainer, TrainingError, load_trained, save_trained

N_TRAIN, N_TEST, SEQ = 70, 24, 12


def make_cfg(**train):
    """The tiny profile trained 2 epochs (P-DHT: 1 of warm-up, 1 frozen), batches of 16, a checkpoint every 2 steps."""
    raw = two_epoch_tiny(copy.deepcopy(read_params(ROOT / "params.yaml")))
    raw["profiles"]["tiny"]["train"].update({"batch_size": 16, "checkpoint_every": 2, **train})
    return load_config(ROOT / "params.yaml", profile="tiny", raw=raw)


def make_split(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, SEQ), generator=g)
    lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    labels = (ids[:, 1] % 3).long()  # learnable from the first token
    return SplitData(ids * mask, mask, labels, torch.arange(n) % 3)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    conf = DHTConfig(vocab_size=60, hidden_size=48, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=3)
    model = DHTForSequenceClassification(conf)
    cfg = make_cfg()
    train = make_split(N_TRAIN, 1)
    batches = [(train.input_ids[i : i + 32], train.attention_mask[i : i + 32]) for i in range(0, N_TRAIN, 32)]
    feats, _ = compute_arm_features(model, batches, arm_space(cfg), cfg.dht.features, seed=0)
    return model, feats, train, make_split(N_TEST, 2)


def trainer_for(setup, mode, cfg=None, checkpoint_dir=None, on_step=None, fp="fp"):
    model, feats, train, _ = setup
    cfg = cfg or make_cfg()
    torch.manual_seed(cfg.training_seed)
    return Trainer(cfg, mode, copy.deepcopy(model), feats, train, torch.device("cpu"), SEQ,
                   checkpoint_dir=checkpoint_dir, run_fingerprint=fp, on_step=on_step)


def run(trainer, test):
    progress = trainer.fit(progress_bar=False)
    pred = predict(trainer.model, trainer.policy, test, torch.device("cpu"), 16, SEQ)
    metrics = evaluate(pred, test, trainer.model.config, SEQ, ["easy", "medium", "hard"])
    metrics.pop("infer_seconds")
    return progress, metrics


def test_layer_queue_releases_full_batches_and_drains_leftovers():
    q = LayerQueue(3)
    ctx = torch.zeros(2)
    assert q.push(6, 0, 1, ctx) is None and q.push(3, 1, 0, ctx) is None and q.push(6, 2, 1, ctx) is None
    full = q.push(6, 3, 1, ctx)
    assert [i for i, _, _ in full] == [0, 2, 3]
    assert [(L, [i for i, _, _ in items]) for L, items in q.drain()] == [(3, [1])]
    assert q.drain() == []


@pytest.mark.parametrize("mode", ["t-dht", "s-dht", "p-dht"])
def test_every_training_sample_is_used_exactly_once_per_epoch(setup, mode, monkeypatch):
    seen: list[list[int]] = []
    original = Trainer.train_batch

    def recording(self, policy, frozen, layers, items):
        while len(seen) <= self.progress.epoch:
            seen.append([])
        seen[self.progress.epoch] += [i for i, _, _ in items]
        assert len(items) <= self.cfg.train.batch_size
        return original(self, policy, frozen, layers, items)

    monkeypatch.setattr(Trainer, "train_batch", recording)
    trainer = trainer_for(setup, mode)
    progress = trainer.fit(progress_bar=False)
    assert len(seen) == 2
    for epoch in seen:
        assert Counter(epoch) == Counter(range(N_TRAIN))  # all samples, none twice
    assert progress.samples_seen == 2 * N_TRAIN


def test_same_seed_same_metrics(setup):
    _, _, _, test = setup
    p1, m1 = run(trainer_for(setup, "t-dht"), test)
    p2, m2 = run(trainer_for(setup, "t-dht"), test)
    assert m1 == m2 and p1.train_flops == p2.train_flops and p1.selections == p2.selections
    assert [h[2] for h in p1.history] == [h[2] for h in p2.history]


@pytest.mark.parametrize("mode", ["f-dht", "p-dht"])
def test_killed_run_resumes_to_the_same_metrics(setup, mode, tmp_path):
    _, _, _, test = setup
    ref_progress, ref_metrics = run(trainer_for(setup, mode), test)

    class Killed(Exception):
        pass

    def kill_at(step):
        if step == 7:
            raise Killed

    first = trainer_for(setup, mode, checkpoint_dir=tmp_path, on_step=kill_at)
    with pytest.raises(Killed):
        first.fit(progress_bar=False)
    assert (tmp_path / "checkpoint.pt").is_file()
    resumed = trainer_for(setup, mode, checkpoint_dir=tmp_path)
    assert resumed.load_checkpoint() and 0 < resumed.progress.step < 7
    progress, metrics = run(resumed, test)
    assert metrics == ref_metrics
    assert progress.train_flops == ref_progress.train_flops and progress.selections == ref_progress.selections
    assert [round(h[2], 6) for h in progress.history] == [round(h[2], 6) for h in ref_progress.history]


def test_corrupt_or_mismatched_checkpoint_is_refused(setup, tmp_path):
    trainer = trainer_for(setup, "s-dht", checkpoint_dir=tmp_path, fp="aaa")
    trainer.save_checkpoint()
    other = trainer_for(setup, "s-dht", checkpoint_dir=tmp_path, fp="bbb")
    with pytest.raises(TrainingError, match="written by a run with other parameters.*rm -r"):
        other.load_checkpoint()
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="carries no checksum header.*rm -r"):
        trainer.load_checkpoint()
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"not a checkpoint"  # never silently overwritten


def mid_epoch_checkpoint(setup, tmp_path, mode="s-dht"):
    class Killed(Exception):
        pass

    def kill_at(step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        trainer_for(setup, mode, checkpoint_dir=tmp_path, on_step=kill_at).fit(progress_bar=False)
    path = tmp_path / "checkpoint.pt"
    state = read_checkpoint(path)
    assert 0 < state["progress"]["position"] < N_TRAIN  # mid-epoch
    return path, state


@pytest.mark.parametrize("damage", ["bit flips", "random bytes"])
def test_a_checkpoint_whose_content_changed_is_refused_and_kept(setup, tmp_path, damage):
    """Twenty bit flips in the embedding weights resumed silently (other metrics); random bytes resumed and then
    failed as a "non-finite loss". The checksum inside the checkpoint is verified first."""
    path, state = mid_epoch_checkpoint(setup, tmp_path)
    data = bytearray(path.read_bytes())
    weights = state["model"]["bert.embeddings.word_embeddings.weight"].numpy().tobytes()
    at = data.find(weights)  # torch.save stores tensor bytes uncompressed
    assert at > 0 and data.find(weights, at + 1) < 0
    if damage == "bit flips":
        for i in range(20):
            data[at + 37 * i + 3] ^= 0x10
    else:
        data[at + 100 : at + 164] = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match=rf"{re.escape(str(path))}: checksum mismatch .* the file changed after it was written .* "
                                            rf"not resumed and not overwritten; delete it .*: rm -r {re.escape(str(tmp_path))}$"):
        trainer_for(setup, "s-dht", checkpoint_dir=tmp_path).load_checkpoint()
    assert path.read_bytes() == bytes(data)  # neither overwritten nor deleted


def test_a_checkpoint_without_a_checksum_is_refused(setup, tmp_path):
    path, state = mid_epoch_checkpoint(setup, tmp_path)
    torch.save(state, path)  # the state alone, as checkpoints were written before they had a checksum
    with pytest.raises(TrainingError, match="carries no checksum .* cannot be verified.*rm -r"):
        trainer_for(setup, "s-dht", checkpoint_dir=tmp_path).load_checkpoint()


@pytest.mark.parametrize("header", ["checksum written by the attacker", "no checksum"])
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(setup, tmp_path, header):
    """A pickle put in place of the checkpoint ran its code at resume (torch.load with weights_only=False, the
    checksum checked only after). Now the checksum is checked before any byte is read, and a file whose checksum
    matches is still read weights-only: tensors and plain data, never an object that runs code."""
    path, state = mid_epoch_checkpoint(setup, tmp_path)
    marker = tmp_path.parent / f"{tmp_path.name}-code-ran"
    state["progress"]["run_id"] = RunsCode(marker)
    if header == "no checksum":
        torch.save(state, path)
    else:
        write_checkpoint(state, path)
    assert_runs_code(path.read_bytes(), marker)
    refusal = ("carries no checksum header" if header == "no checksum"
               else r"holds more than tensors and plain data \(.*\): reading it could run code, so it is refused")
    with pytest.raises(TrainingError, match=rf"^{re.escape(str(path))}: {refusal}.*not resumed and not overwritten; "
                                            rf"delete it to start this run over: rm -r {re.escape(str(tmp_path))}$"):
        trainer_for(setup, "s-dht", checkpoint_dir=tmp_path).load_checkpoint()
    assert not marker.exists()


def test_non_finite_loss_stops_with_the_step_and_batch(setup, monkeypatch):
    trainer = trainer_for(setup, "t-dht")
    calls = {"n": 0}
    original = trainer.model.classify

    def poisoned(hidden, key_keep=None, depth=None):
        calls["n"] += 1
        logits = original(hidden, key_keep, depth)
        return logits * float("nan") if calls["n"] == 3 else logits

    monkeypatch.setattr(trainer.model, "classify", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 1, step 3, in a batch of \d+ samples with L = \d+"):
        trainer.fit(progress_bar=False)


def test_first_batch_reward_is_neutral_and_tsb_waits(setup):
    trainer = trainer_for(setup, "t-dht")
    policy = trainer.policy
    q_before = policy.tsb.q.clone()
    chunk = trainer.order(0)[:16]
    released = trainer._enqueue(policy, chunk)
    layers, items = released[0] if released else trainer.queue.drain()[0]
    trainer.train_batch(policy, False, layers, items)
    assert torch.equal(policy.tsb.q, q_before)  # no binary feedback from a neutral first reward
    assert int(policy.ucb.counts.sum()) == len(items)  # UCB_L learned from it
    assert policy.baseline.get("ucb_l") is not None


def test_vanilla_is_the_full_model_and_dht_saves(setup):
    _, _, _, test = setup
    _, vanilla = run(trainer_for(setup, "vanilla-12"), test)
    assert vanilla["infer_flop_ratio"] == pytest.approx(1.0) and vanilla["mean_layers"] == 12
    progress, _ = run(trainer_for(setup, "vanilla-12"), test)
    assert progress.train_flops == pytest.approx(progress.reference_flops)  # no S1, no bandits: exactly 1.00x
    _, t_metrics = run(trainer_for(setup, "t-dht"), test)
    assert t_metrics["infer_flop_ratio"] <= 1.0 and set(t_metrics) >= {"accuracy_easy", "mean_layers_hard"}
    # A T-DHT with one path (6 layers, 8 heads in its one group) costs, per sample, 3 forwards of the path + the
    # S1 pass + the decision pass (the b fixed layers: the path has one group), against 3 forwards of the full
    # model (docs/training.md, T12): below 1 by exactly that.
    cfg = make_cfg()
    cfg.dht.modes["t-6l8h"] = mode_spec(search="tree", layers=[6], heads=[8])
    one_path, _ = run(trainer_for(setup, "t-6l8h", cfg), test)
    conf = setup[0].config
    fixed, dynamic, head = 3 * layer_flops(SEQ, 12, conf), 3 * layer_flops(SEQ, 8, conf), forward_flops(SEQ, [], conf)
    expected = (3 * (fixed + dynamic + head) + 2 * fixed) / (3 * (4 * fixed + head))
    assert one_path.train_flops / one_path.reference_flops == pytest.approx(expected, rel=1e-12)
    assert 0.5 < expected < 0.7


def test_inference_chooses_allowed_architectures_and_counts_them(setup):
    _, _, _, test = setup
    trainer = trainer_for(setup, "f-dht")
    trainer.fit(progress_bar=False)
    pred = predict(trainer.model, trainer.policy, test, torch.device("cpu"), 16, SEQ)
    again = predict(trainer.model, trainer.policy, test, torch.device("cpu"), 16, SEQ)
    assert torch.equal(pred.labels, again.labels) and torch.equal(pred.heads, again.heads)  # greedy: no randomness
    arms = {(len(h), h[-1]) for h in trainer.policy.arm_heads}
    for layers, row in zip(pred.layers.tolist(), pred.heads.tolist(), strict=True):
        assert (layers, row[layers - 1]) in arms and all(h == 0 for h in row[layers:])
    # a sample's prediction does not depend on the batch it is in
    single = predict(trainer.model, trainer.policy, test, torch.device("cpu"), 1, SEQ)
    assert torch.equal(single.labels, pred.labels) and torch.equal(single.layers, pred.layers)


def test_p_dht_freezes_all_but_the_last_two_layers_after_warmup(setup):
    trainer = trainer_for(setup, "p-dht", cfg=make_cfg(epochs=2))
    assert trainer.active(0) == (trainer.warmup_policy, False) and trainer.active(1) == (trainer.policy, True)
    trainer.progress.epoch = 1  # skip the warm-up: train one frozen epoch
    embeddings = trainer.model.bert.embeddings.word_embeddings.weight.detach().clone()
    layer0 = trainer.model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    classifier = trainer.model.classifier.weight.detach().clone()
    trainer.fit(progress_bar=False)
    assert torch.equal(trainer.model.bert.embeddings.word_embeddings.weight, embeddings)
    assert torch.equal(trainer.model.bert.encoder.layer[0].attention.self.query.weight, layer0)
    assert not torch.equal(trainer.model.classifier.weight, classifier)


def test_save_and_load_a_trained_model(setup, tmp_path):
    from safetensors.torch import save_file

    model, feats, _, test = setup
    trainer = trainer_for(setup, "t-dht")
    trainer.fit(progress_bar=False)
    save_trained(tmp_path, trainer.model, trainer.policy, "t-dht", trainer.cfg, {"classes": ["a", "b", "c"]})
    save_file(feats, str(tmp_path / "arm_features.safetensors"))
    write_manifest(tmp_path)  # as the train stage does, last
    loaded, policy, info = load_trained(tmp_path, torch.device("cpu"))
    assert info["mode_name"] == "t-dht" and info["classes"] == ["a", "b", "c"]
    a = predict(trainer.model, trainer.policy, test, torch.device("cpu"), 16, SEQ)
    b = predict(loaded, policy, test, torch.device("cpu"), 16, SEQ)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.heads, b.heads)
    with pytest.raises(FileNotFoundError, match="not a trained DHT model directory"):
        load_trained(tmp_path / "nothing", torch.device("cpu"))


@pytest.mark.parametrize("rule", ["all_but_last_two", "last_two"])
def test_p_dht_frozen_phase_trains_exactly_what_its_freeze_rule_says(setup, rule, monkeypatch):
    """After the warm-up, with `all_but_last_two` the last two layers of every trained path, the classifier and
    nothing else change (embeddings and earlier layers frozen); with `last_two` the converse: those two layers
    stay, the earlier layers and the embeddings change. Which depths were trained is recorded, not assumed."""
    raw = two_epoch_tiny(copy.deepcopy(read_params(ROOT / "params.yaml")))
    raw["profiles"]["tiny"]["train"].update({"batch_size": 16, "checkpoint_every": 2})
    raw["profiles"]["tiny"]["dht"]["p_dht_freeze"] = rule
    trainer = trainer_for(setup, "p-dht", cfg=load_config(ROOT / "params.yaml", profile="tiny", raw=raw))
    trained: list[tuple[int, bool]] = []
    original = Trainer.train_batch

    def recording(self, policy, frozen, layers, items):
        trained.append((layers, frozen))
        return original(self, policy, frozen, layers, items)

    monkeypatch.setattr(Trainer, "train_batch", recording)
    trainer.progress.epoch = 1  # skip the warm-up: train one frozen epoch
    model = trainer.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.fit(progress_bar=False)
    assert trained and all(frozen for _, frozen in trained)

    def changed(prefix: str) -> bool:
        keys = [k for k in before if k.startswith(prefix)]
        assert keys, prefix
        return any(not torch.equal(before[k], model.state_dict()[k]) for k in keys)

    depths = {layers for layers, _ in trained}
    tails = {layer for L in depths for layer in (L - 2, L - 1)}
    # layers that train under the rule in at least one batch (a tail of one depth is a body layer of another)
    expected = tails if rule == "all_but_last_two" else {layer for L in depths for layer in range(L - 2)}
    n_layers = model.config.num_hidden_layers
    assert expected and set(range(n_layers)) - expected  # the check has both kinds to look at
    assert {layer for layer in range(n_layers) if changed(f"bert.encoder.layer.{layer}.")} == expected, depths
    assert changed("bert.embeddings.") == (rule == "last_two")
    assert changed("classifier.") and changed("bert.pooler.")


def test_one_list_of_keys_behind_tracking_mlflow_and_the_checkpoint():
    """The train rule's tracked params, the MLflow params and the checkpoint fingerprint come from one list."""
    from dht.config import Config, run_param_keys
    from dht.trainer import fingerprint, run_params

    cfg = make_cfg()
    keys = run_param_keys(cfg, "p-dht")
    assert "dht.modes.p-dht" in keys and "dht.modes.f-dht" in keys and "dht.decision_states" in keys
    params = run_params(cfg, "p-dht")
    assert params["mode"] == cfg.section("dht.modes.p-dht") and params["warmup_mode"] == cfg.section("dht.modes.f-dht")
    # the same names for every model of a kind; a fixed mode (one arm) reads no bandit, context or inference key
    assert set(run_params(cfg, "t-dht")) == set(run_params(cfg, "s-dht")) == set(params) - {"warmup_mode", "dht.p_dht_freeze"}
    bandit_keys = {"dht.features", "dht.bandits", "dht.inference", "dht.count_s1_flops", "dht.decision_states"}
    assert set(run_params(cfg, "vanilla-12")) == set(run_params(cfg, "t-dht")) - bandit_keys

    def edited(key, value):
        raw = cfg.model_dump(mode="json")
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
        return Config.model_validate(raw)

    fp = fingerprint(cfg, "t-dht", "d", {})
    assert fingerprint(edited("dht.decision_states", "train"), "t-dht", "d", {}) != fp
    assert fingerprint(edited("dht.modes.s-dht.arms", ["3L12H", "12L12H"]), "t-dht", "d", {}) == fp  # not read
    fixed = fingerprint(cfg, "vanilla-12", "d", {})
    assert fingerprint(edited("dht.bandits.ucb_alpha", 2.0), "vanilla-12", "d", {}) == fixed
    assert fingerprint(edited("dht.bandits.ucb_alpha", 2.0), "t-dht", "d", {}) != fp
    assert fingerprint(edited("train.log_model", False), "t-dht", "d", {}) == fp  # MLflow's only
