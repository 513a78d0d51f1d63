"""Arm features (Section 4.2): which arms, the random-arm plan, exact means, bounded streaming, storage; the
warm-up that lets an identity-initialised model tell arms apart, and the per-epoch refresh in training."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, embedded_raw, two_epoch_tiny

from dht.arm_features import (
    arm_layer_heads,
    arm_matrix,
    arm_separation,
    arm_space,
    compute_arm_features,
    iter_batches,
    load_arm_features,
    random_arm_plan,
    save_arm_features,
    warm_up,
)
from dht.arms import parse_arm
from dht.config_loading import load_config
from dht.contexts import multi_granularity_pool
from dht.model import DHTConfig, DHTForSequenceClassification

# Two arms of one family closer than this (distance / the family's mean norm) are "the same vector". An
# identity initialisation gives exactly 0 (float rounding: < 1e-6); the tiny profile's stage gives >= 0.0095
# (UCB_cp, four seeds measured; UCB_L >= 0.05).
INDISTINCT = 2e-3


def config(**run):
    """The tiny profile (the 12-layer structure, b = c = 3) running the modes given."""
    raw = embedded_raw()
    raw["run"].update(run)
    if "models" in run:  # without the reference among the models, no baseline can be built from it
        raw["profiles"]["tiny"]["run"]["baselines"] = []
    return load_config(ROOT / "params.yaml", profile="tiny", raw=raw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = DHTConfig(vocab_size=50, hidden_size=48, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return DHTForSequenceClassification(cfg).eval()


def batches(n=40, width=16, batch_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (n, width), generator=g)
    lengths = torch.randint(4, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    return [(ids[i : i + batch_size], mask[i : i + batch_size]) for i in range(0, n, batch_size)]


def test_arm_space_is_the_union_of_the_run_modes():
    space = arm_space(config())
    assert space.layer_options == (3, 6, 9, 12) and space.head_options == (8, 10, 12)
    assert "12L12H" in space.cp_arms and "6L8H" in space.cp_arms and "4L8H+2L12H" in space.cp_arms
    assert set(space.cp_arms) <= set(space.pool) and "3L8H" in space.pool  # tree combinations join the pool
    only_s = arm_space(config(models=["s-dht"]))
    assert only_s.layer_options == () and only_s.cp_arms == ("3L12H", "6L12H", "9L12H", "12L8H", "12L10H", "12L12H")
    p_only = arm_space(config(models=["p-dht"]))  # its warm-up mode (f-dht) is included
    assert "6L10H" in p_only.cp_arms and "10L12H+2L12H" in p_only.cp_arms


def test_arm_layer_heads_keeps_the_first_b_layers_full():
    assert arm_layer_heads(parse_arm("6L8H"), 3, 12) == [12, 12, 12, 8, 8, 8]
    assert arm_layer_heads(parse_arm("4L8H+2L12H"), 3, 12) == [12, 12, 12, 8, 12, 12]


def test_random_arm_plan_follows_each_arm_and_keeps_relative_positions():
    arms = [[12, 12, 12], [12, 12, 12, 8, 8, 8], [12, 12, 12, 10, 10, 10, 12, 12, 12], [12, 12, 12, 8, 12, 12]]
    groups = [range(3, 6), range(6, 9), range(9, 12)]
    arm_ids = torch.tensor([0, 1, 2, 3, 1, 2, 3, 0])
    depth, plan = random_arm_plan(arms, arm_ids, 12, 12, groups, torch.Generator().manual_seed(0))
    assert depth.tolist() == [len(arms[k]) for k in arm_ids.tolist()]
    for i, k in enumerate(arm_ids.tolist()):
        for layer, h in enumerate(arms[k]):
            assert int(plan[i, layer].sum()) == h
        assert plan[i, :3].all()  # fixed layers: every head
        for group in groups:  # same number of heads in a group -> the same heads
            rows = [plan[i, layer] for layer in group if layer < len(arms[k])]
            for a in rows:
                for b in rows:
                    if int(a.sum()) == int(b.sum()):
                        assert torch.equal(a, b)
                    elif int(a.sum()) < int(b.sum()):
                        assert not (a & ~b).any()  # fewer heads: a subset of the same order
    assert len({tuple(plan[i, 3].tolist()) for i in (1, 4)}) == 2  # different samples, different subsets


def test_arm_feature_means_are_exact_and_cover_every_arm(model):
    cfg = config()
    space = arm_space(cfg)
    data = batches()
    feats, counts = compute_arm_features(model, data, space, cfg.dht.features, seed=0)
    # UCB_L: the mean over all samples of the pooled state after layer L of the full model
    pool = load_config(ROOT / "params.yaml").dht.features.ucb_l  # the paper's (1, 2) x (4, 8, 16), tiny's too
    ids = torch.cat([b[0] for b in data])
    mask = torch.cat([b[1] for b in data])
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer in (3, 6, 12):
        torch.testing.assert_close(feats[f"ucb_l/{layer}"], multi_granularity_pool(states[layer], mask, pool).mean(0), atol=1e-5, rtol=1e-4)
    assert counts["ucb_l/12"] == 40
    assert feats["ucb_l/3"].shape == (84,) and feats["ucb_h/8"].shape == (42,) and feats["ucb_cp/6L8H"].shape == (84,)
    assert feats["tsb/0"].shape == (4,)  # head slices of 4 dims keep the splits that divide them (4 of 4, 8)
    assert {f"tsb/{h}" for h in range(12)} <= set(feats)
    # the random-arm pass spreads samples evenly over the pool
    per_arm = [counts.get(f"ucb_cp/{a}", 0) for a in space.cp_arms]
    assert all(c >= 1 for c in per_arm)
    assert not torch.allclose(feats["ucb_cp/12L8H"], feats["ucb_cp/12L12H"])  # heads change the state


def test_a_single_full_arm_equals_the_full_model(model):
    cfg = config(models=["vanilla-12"])
    feats, _ = compute_arm_features(model, batches(), arm_space(cfg), cfg.dht.features, seed=0)
    torch.testing.assert_close(feats["ucb_cp/12L12H"], feats["ucb_l/12"], atol=1e-5, rtol=1e-4)


def test_same_seed_same_features_and_streaming_does_not_change_means(model):
    cfg = config()
    space = arm_space(cfg)
    a, _ = compute_arm_features(model, batches(batch_size=16), space, cfg.dht.features, seed=3)
    b, _ = compute_arm_features(model, batches(batch_size=16), space, cfg.dht.features, seed=3)
    c, _ = compute_arm_features(model, batches(batch_size=7), space, cfg.dht.features, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(a["ucb_l/9"], c["ucb_l/9"], atol=1e-5, rtol=1e-4)


def test_too_few_samples_for_the_arms_is_a_clear_error(model):
    cfg = config()
    with pytest.raises(ValueError, match="raise dht.features.arm_feature_samples"):
        compute_arm_features(model, batches(n=3, batch_size=3), arm_space(cfg), cfg.dht.features)


def test_iter_batches_streams_a_seeded_subset(tmp_path):
    ids = np.arange(100 * 8, dtype=np.int32).reshape(100, 8)
    table = pa.table({
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), 8),
        "attention_mask": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(800, np.int8)), 8),
    })
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=16)
    everything = torch.cat([b[0] for b in iter_batches(tmp_path / "train.parquet", 32)])
    assert torch.equal(everything, torch.from_numpy(ids.astype(np.int64)))
    sub = torch.cat([b[0] for b in iter_batches(tmp_path / "train.parquet", 32, limit=30, seed=1)])
    again = torch.cat([b[0] for b in iter_batches(tmp_path / "train.parquet", 32, limit=30, seed=1)])
    assert sub.shape == (30, 8) and torch.equal(sub, again)
    assert len({int(r[0]) for r in sub}) == 30


def test_save_load_and_stack(tmp_path):
    feats = {"ucb_l/3": torch.ones(84), "ucb_l/6": torch.zeros(84)}
    meta = save_arm_features(tmp_path, feats, {"ucb_l/3": 5, "ucb_l/6": 5}, {"dataset": "x"})
    assert meta["sizes"] == {"ucb_l/3": 84, "ucb_l/6": 84}
    loaded = load_arm_features(tmp_path)
    assert arm_matrix(loaded, "ucb_l", [6, 3]).tolist()[1] == [1.0] * 84
    with pytest.raises(KeyError, match="rerun the arm_features stage"):
        arm_matrix(loaded, "ucb_l", [9])
    (tmp_path / "arm_features.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_arm_features(tmp_path)
    with pytest.raises(FileNotFoundError, match="run the arm_features stage first"):
        load_arm_features(tmp_path / "nowhere")


# ---- identity initialisation, warm-up, control variate ---------------------------------------------------


def identity_model(seed=0):
    torch.manual_seed(seed)
    cfg = DHTConfig(vocab_size=50, hidden_size=48, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=64, max_position_embeddings=32, num_labels=3, layer_norm="pre",
                    residual_init_scale=0.0)
    return DHTForSequenceClassification(cfg).eval()


def labelled(n=64, width=16, seed=0):
    ids, mask = (torch.cat(t) for t in zip(*batches(n=n, width=width, batch_size=n, seed=seed), strict=True))
    return ids, mask, (ids[:, 1] % 3).long()  # learnable from the first token


def test_identity_model_gives_every_arm_one_vector_and_the_warm_up_separates_them():
    cfg = config()
    space = arm_space(cfg)
    model = identity_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    feats, _ = compute_arm_features(model, batches(n=64), space, cfg.dht.features)
    sep = arm_separation(feats, 3, 12)
    # every layer is the identity: depth and heads change nothing, so the vectors can say nothing
    assert sep["ucb_l"]["min_relative_distance"] < 1e-6 and sep["ucb_cp"]["min_relative_distance"] < 1e-6
    assert sep["ucb_h"]["min_relative_distance"] < 1e-6

    ids, mask, labels = labelled()
    warm, stats = warm_up(model, ids, mask, labels, 40, cfg.train, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # training starts from this one
    assert not warm.training and set(stats) == {"loss_first", "loss_last"}
    feats, _ = compute_arm_features(warm, batches(n=64), space, cfg.dht.features)
    for family, s in arm_separation(feats, 3, 12).items():
        assert s["min_relative_distance"] > INDISTINCT, (family, s)
    again, _ = warm_up(model, ids, mask, labels, 40, cfg.train, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(warm.state_dict().values(), again.state_dict().values(), strict=True))


def test_arms_that_run_the_same_network_share_one_vector(model):
    """With b = 3, 1L8H+2L12H and 1L12H+2L12H run three full layers: the arm 3L12H; 10L12H+2L12H is 12L12H."""
    cfg = config()
    space = arm_space(cfg)
    # params.yaml refuses two spellings of one plan within a mode (the paper's 1L8H+2L12H is dropped from P-DHT),
    # but across modes they meet (P-DHT's 1L12H+2L12H, F-DHT's 3L12H): the stage gives every spelling one vector
    assert "1L8H+2L12H" not in space.cp_arms
    space = dataclasses.replace(space, cp_arms=(*space.cp_arms, "1L8H+2L12H"), pool=(*space.pool, "1L8H+2L12H"))
    feats, counts = compute_arm_features(model, batches(n=64), space, cfg.dht.features, seed=0)
    assert torch.equal(feats["ucb_cp/1L8H+2L12H"], feats["ucb_cp/3L12H"])
    assert torch.equal(feats["ucb_cp/1L12H+2L12H"], feats["ucb_cp/3L12H"])
    assert torch.equal(feats["ucb_cp/10L12H+2L12H"], feats["ucb_cp/12L12H"])
    assert not torch.equal(feats["ucb_cp/4L8H+2L12H"], feats["ucb_cp/6L8H"])
    pool = {k: v for k, v in counts.items() if k.startswith("pool/")}
    assert sum(pool.values()) == 64 and max(pool.values()) - min(pool.values()) <= 1  # one arm per sample, evenly
    assert "pool/1L8H+2L12H" not in pool and "pool/3L12H" in pool


def test_the_control_variate_removes_the_sampling_noise_of_few_samples_per_arm(model):
    """UCB_cp/UCB_H estimate the mean over all samples: with the full state as control variate, which samples
    ran an arm matters much less than in a plain mean over them (the module doc)."""
    cfg = config(models=["f-dht"])
    space = arm_space(cfg)
    a, _ = compute_arm_features(model, batches(n=80), space, cfg.dht.features, seed=1)
    b, _ = compute_arm_features(model, batches(n=80), space, cfg.dht.features, seed=2)
    exact = {}  # every sample through every arm, one random head order per sample (the estimand, estimated)
    ids = torch.cat([x for x, _ in batches(n=80)])
    mask = torch.cat([m for _, m in batches(n=80)])
    pool = load_config(ROOT / "params.yaml").dht.features.ucb_cp  # the paper's (1, 2) x (4, 8, 16), tiny's too
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for arm in space.cp_arms:
            heads = arm_layer_heads(parse_arm(arm), 3, 12)
            depth, plan = random_arm_plan([heads], torch.zeros(80, dtype=torch.long), 12, 12,
                                          model.config.dynamic_layer_groups(), gen)
            states = model(input_ids=ids, attention_mask=mask, depth=depth, heads=plan,
                           output_hidden_states=True).hidden_states
            exact[arm] = multi_granularity_pool(states[len(heads)], mask, pool).mean(0)
    for arm in space.cp_arms:  # 8 samples per arm, against 80: the estimate stays within 5% of the norm
        for feats in (a, b):
            error = float((feats[f"ucb_cp/{arm}"] - exact[arm]).norm() / exact[arm].norm())
            assert error < 0.05, (arm, error)


def test_arm_separation_measures_the_closest_pair():
    feats = {"ucb_l/3": torch.tensor([1.0, 0.0]), "ucb_l/6": torch.tensor([1.0, 0.1]), "ucb_l/9": torch.tensor([0.0, 1.0]),
             "ucb_cp/3L12H": torch.tensor([1.0, 0.0]), "ucb_cp/1L8H+2L12H": torch.tensor([1.0, 0.0]),
             "ucb_cp/6L8H": torch.tensor([0.0, 2.0]), "tsb/0": torch.ones(2)}
    sep = arm_separation(feats, 3, 12)
    assert sep["ucb_l"]["pair"] == ["3", "6"] and sep["ucb_l"]["arms"] == 3
    assert sep["ucb_l"]["min_relative_distance"] == pytest.approx(0.1 / ((1 + 1.01**0.5 + 1) / 3))
    assert sep["ucb_cp"]["arms"] == 2 and sep["ucb_cp"]["min_relative_distance"] == pytest.approx(5**0.5 / 1.5)
    assert "tsb" not in sep and "ucb_h" not in sep  # one arm, none: nothing to tell apart


@pytest.mark.slow
def test_the_tiny_profiles_stage_output_tells_every_arm_apart(tiny_upstream):
    """The arm_features stage as the pipeline runs it (data stages first, through Snakemake: conftest)."""
    from dht.model import model_from_params
    from dht.runtime import seed_everything

    out = tiny_upstream / "data/features/embedded-news"
    feats = load_arm_features(out)
    cfg = load_config(tiny_upstream / "params.yaml", profile="tiny")
    sep = arm_separation(feats, cfg.dht.fixed_layers, cfg.model.num_attention_heads)
    assert set(sep) == {"ucb_l", "ucb_h", "ucb_cp", "tsb"} and sep["ucb_cp"]["arms"] == 16
    for family, s in sep.items():
        assert s["min_relative_distance"] > INDISTINCT, (family, s)
    meta = json.loads((out / "meta.json").read_text())
    assert cfg.model.residual_init_scale == 0 and meta["warmup"]["steps"] == cfg.dht.features.warmup_steps > 0
    for family, s in sep.items():  # the stage records the same measure
        assert meta["separation"][family]["pair"] == s["pair"]
        assert meta["separation"][family]["min_relative_distance"] == pytest.approx(s["min_relative_distance"])
    # init_model/ is the initial model, not the warmed-up copy: every run starts from the same weights
    init = DHTForSequenceClassification.from_pretrained(out / "init_model")
    data_meta = json.loads((tiny_upstream / "data/processed/embedded-news/meta.json").read_text())
    seed_everything(cfg.data_seed)
    fresh = model_from_params(cfg, num_labels=data_meta["num_labels"], vocab_size=data_meta["vocab_size"])
    assert all(torch.equal(a, b) for a, b in zip(init.state_dict().values(), fresh.state_dict().values(), strict=True))


# ---- dht.features.refresh: epoch (the trainer) -----------------------------------------------------------


def refresh_setup(refresh="epoch"):
    from test_trainer import N_TRAIN, make_split

    raw = two_epoch_tiny(embedded_raw())  # the refresh happens once, at the start of the second (last) epoch
    tiny = raw["profiles"]["tiny"]
    tiny["train"].update({"batch_size": 16, "checkpoint_every": 2})
    tiny["dht"]["features"] = {"refresh": refresh}
    cfg = load_config(ROOT / "params.yaml", profile="tiny", raw=raw)
    torch.manual_seed(0)
    conf = DHTConfig(vocab_size=60, hidden_size=48, num_hidden_layers=12, num_attention_heads=12, intermediate_size=64,
                     max_position_embeddings=12, num_labels=3, layer_norm="pre", residual_init_scale=0.0)
    model = DHTForSequenceClassification(conf)
    train = make_split(N_TRAIN, 1)
    stage = [(train.input_ids[i : i + 32], train.attention_mask[i : i + 32]) for i in range(0, N_TRAIN, 32)]
    feats, _ = compute_arm_features(model, stage, arm_space(cfg), cfg.dht.features, seed=0)  # the identity's
    return cfg, model, feats, train, make_split(24, 2)


def refresh_trainer(setup, mode, **kw):
    from dht.trainer import Trainer

    cfg, model, feats, train, _ = setup
    torch.manual_seed(cfg.training_seed)
    return Trainer(cfg, mode, copy.deepcopy(model), feats, train, torch.device("cpu"), 12, run_fingerprint="fp", **kw)


def finish(trainer, test):
    from dht.evaluation import evaluate
    from dht.policy import predict

    progress = trainer.fit(progress_bar=False)
    metrics = evaluate(predict(trainer.model, trainer.policy, test, torch.device("cpu"), 16, 12), test,
                       trainer.model.config, 12, None)
    metrics.pop("infer_seconds")
    return progress, metrics


@pytest.mark.parametrize("mode", ["t-dht", "s-dht"])
def test_refresh_replaces_the_arm_matrices_with_the_trained_models_features(mode, monkeypatch):
    import dht.trainer

    setup = refresh_setup()
    real = dht.trainer.compute_arm_features
    calls = []

    def recording(model, batches, space, features, seed=0):
        feats, counts = real(model, batches, space, features, seed=seed)
        calls.append((trainer.progress.epoch, trainer.progress.train_flops, feats, counts))
        return feats, counts

    monkeypatch.setattr(dht.trainer, "compute_arm_features", recording)
    trainer = refresh_trainer(setup, mode)
    stage_z = trainer.policy.ucb.arm_features.clone()
    assert float(torch.cdist(stage_z, stage_z).max()) < 1e-6  # the identity model: one vector for every arm
    trainer.fit(progress_bar=False)
    assert [c[0] for c in calls] == [1]  # once, at the start of the second (last) epoch
    _, _, feats, counts = calls[0]
    family, arms = ("ucb_l", trainer.policy.layer_options) if mode == "t-dht" else ("ucb_cp", trainer.policy.arms)
    z = trainer.policy.ucb.arm_features
    assert torch.equal(z, arm_matrix(feats, family, arms).double())
    assert float(torch.cdist(z, z).max()) > 0  # one epoch of training moved the layers off the identity
    if mode == "t-dht":
        assert torch.equal(trainer.policy.ucb_h.arm_features, arm_matrix(feats, "ucb_h", [8, 10, 12]).double())
    assert sum(v for k, v in counts.items() if k.startswith("pool/")) == len(setup[3])

    plain = refresh_trainer(refresh_setup("none"), mode)
    plain.fit(progress_bar=False)
    assert torch.equal(plain.policy.ucb.arm_features, stage_z)  # refresh: none keeps the stage's


def test_refresh_costs_training_flops(monkeypatch):
    """Two forward passes' worth at most per sample: the full model and one arm of the pool."""
    from dht.flops import forward_flops
    from dht.trainer import Trainer

    setup = refresh_setup()
    trainer = refresh_trainer(setup, "f-dht")
    real = Trainer._refresh_arm_features
    added = []

    def measured(self, policy):
        before = self.progress.train_flops
        real(self, policy)
        added.append(self.progress.train_flops - before)

    monkeypatch.setattr(Trainer, "_refresh_arm_features", measured)
    trainer.fit(progress_bar=False)
    full = forward_flops(12, [12] * 12, trainer.model.config)
    assert len(added) == 1 and len(setup[3]) * full < added[0] < 2 * len(setup[3]) * full


@pytest.mark.parametrize(("mode", "kill_at"), [("t-dht", "first_step"), ("f-dht", "after_checkpoint"),
                                             ("p-dht", "after_checkpoint")])
def test_a_resumed_run_restores_the_refreshed_features_exactly(mode, kill_at, tmp_path):
    """Killed at the first step of the second epoch: the last checkpoint is the first epoch's end, written before
    the refresh, and the resumed run refreshes again; killed at the first step after a checkpoint inside the second
    epoch: that checkpoint holds the refreshed features. (Which step follows a checkpoint depends on when the
    bandits' queues release batches, so the kill waits for the checkpoint rather than counting steps.)"""
    setup = refresh_setup()
    test = setup[4]
    ref_progress, ref_metrics = finish(refresh_trainer(setup, mode), test)

    class Killed(Exception):
        pass

    mid_epoch_checkpoints = []

    def kill(step):
        if first.progress.epoch == 1 and (kill_at == "first_step" or mid_epoch_checkpoints):
            raise Killed

    first = refresh_trainer(setup, mode, checkpoint_dir=tmp_path, on_step=kill)
    save = first.save_checkpoint

    def recording_save():
        save()
        if first.progress.epoch == 1 and first.progress.position > 0:
            mid_epoch_checkpoints.append(first.progress.step)

    first.save_checkpoint = recording_save
    with pytest.raises(Killed):
        first.fit(progress_bar=False)
    resumed = refresh_trainer(setup, mode, checkpoint_dir=tmp_path)
    assert resumed.load_checkpoint() and resumed.progress.epoch == 1
    if kill_at == "after_checkpoint":  # restored from the checkpoint, not recomputed
        assert resumed.progress.position > 0 and resumed.progress.step == mid_epoch_checkpoints[0]
        assert torch.equal(resumed.policy.ucb.arm_features, first.policy.ucb.arm_features)
        family, arms = ("ucb_l", resumed.policy.layer_options) if mode == "t-dht" else ("ucb_cp", resumed.policy.arms)
        assert not torch.equal(resumed.policy.ucb.arm_features, arm_matrix(setup[2], family, arms).double())
    else:
        assert resumed.progress.position == 0
    progress, metrics = finish(resumed, test)
    assert metrics == ref_metrics
    assert progress.train_flops == ref_progress.train_flops and progress.selections == ref_progress.selections
