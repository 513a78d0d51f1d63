"""Training FLOPs: the trainer's count (dht.flops.train_flops) against FlopCounterMode on real training steps.

Every training step of a run (its S1 pass, its eval-mode decision pass, its forward and backward) runs inside
FlopCounterMode; the bandits' own arithmetic (pooling, normalisers, LinUCB, TSB) runs outside it, since it is
not the model's. FlopCounterMode counts matrix multiplications only, and so does the analytic "full" convention
(LayerNorm, softmax, GELU, dropout, embeddings, the loss and the optimizer count 0 in both), so the two must agree
exactly: tolerance 0. FLOP counts are integers computed from shapes, so no CPU's rounding enters. The samples
fill the whole sequence, so the batch the trainer trims to its longest sample has the dataset's padded length n
at which the trainer counts (docs/training.md, T12).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from conftest import ROOT
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode

from dht.arm_features import arm_space, compute_arm_features
from dht.config_loading import load_config, read_params
from dht.evaluation import SplitData
from dht.flops import FlopShape, forward_flops, full_model_flops, layer_flops, train_flops
from dht.model import DHTConfig, DHTForSequenceClassification
from dht.policy import Policy
from dht.trainer import Trainer

N_TRAIN, SEQ = 48, 10


def make_cfg(dht: dict | None = None, modes: dict | None = None, **train):
    raw = copy.deepcopy(read_params(ROOT / "params.yaml"))
    raw["profiles"]["tiny"]["train"].update({"batch_size": 16, "checkpoint_every": 1000, **train})
    raw["profiles"]["tiny"].setdefault("dht", {}).setdefault("modes", {})["p-dht"] = {"warmup_epochs": 1}
    raw["dht"].update(dht or {})
    raw["dht"]["modes"].update(modes or {})
    return load_config(ROOT / "params.yaml", profile="tiny", raw=raw)


def full_length_split(n: int, seed: int) -> SplitData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, SEQ), generator=g)
    return SplitData(ids, torch.ones(n, SEQ, dtype=torch.long), (ids[:, 1] % 3).long(), torch.arange(n) % 3)


@functools.cache
def setup(layer_norm: str, pooling: str = "cls"):
    torch.manual_seed(0)
    conf = DHTConfig(vocab_size=60, hidden_size=48, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=3, layer_norm=layer_norm,
                     classifier_pooling=pooling,
                     attn_implementation="eager")  # SDPA's CPU kernel is not in FlopCounterMode's registry
    model = DHTForSequenceClassification(conf)
    train = full_length_split(N_TRAIN, 1)
    feats, _ = compute_arm_features(model, [(train.input_ids, train.attention_mask)], arm_space(make_cfg()),
                                    make_cfg().dht.features, seed=0)
    return model, feats, train


def make_trainer(layer_norm: str, mode: str, cfg, pooling: str = "cls") -> Trainer:
    model, feats, train = setup(layer_norm, pooling)
    torch.manual_seed(cfg.training_seed)
    return Trainer(cfg, mode, copy.deepcopy(model), feats, train, torch.device("cpu"), SEQ)


def outside_counter(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _disable_current_modes():  # the bandits' arithmetic is not the model's
            return fn(*args, **kwargs)

    return wrapped


@pytest.fixture
def counted(monkeypatch):
    """Count every S1 pass (Trainer._enqueue) and training step (Trainer.train_batch) with FlopCounterMode."""
    total = {"flops": 0, "steps": 0}

    def counting(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with FlopCounterMode(display=False) as counter:
                out = fn(*args, **kwargs)
            total["flops"] += counter.get_total_flops()
            total["steps"] += fn.__name__ == "train_batch"
            return out

        return wrapped

    for name in ("arm_context", "decide_arms", "head_contexts", "decide_heads", "learn", "stop_context",
                 "decide_stops", "learn_sequential"):
        monkeypatch.setattr(Policy, name, outside_counter(getattr(Policy, name)))
    for name in ("_enqueue", "train_batch"):
        monkeypatch.setattr(Trainer, name, counting(getattr(Trainer, name)))
    return total


LAYER_NORMS = ["post", "pre"]


@pytest.mark.slow
@pytest.mark.parametrize("layer_norm", LAYER_NORMS)
@pytest.mark.parametrize("freeze", ["all_but_last_two", "last_two", "none"])
def test_p_dht_frozen_steps_match_flop_counter(layer_norm, freeze, counted):
    """P-DHT after its warm-up, each p_dht_freeze reading: the S1 pass of every sample, then one batch per arm
    (depths 3 to 12; 8, 10 or 12 heads in the dynamic layers, sets chosen per sample by the TSB), so every
    depth is covered whatever the bandits would pick."""
    cfg = make_cfg({"p_dht_freeze": freeze}, epochs=2)
    assert cfg.dht.modes["p-dht"].warmup_epochs == 1
    trainer = make_trainer(layer_norm, "p-dht", cfg)
    policy, frozen = trainer.active(1)
    assert frozen == (freeze != "none") and {len(h) for h in policy.arm_heads} == {3, 6, 9, 12}
    trainer._enqueue(policy, torch.arange(N_TRAIN))  # S1 of every sample; the queues it fills are dropped
    trainer.queue.drain()
    per_arm = N_TRAIN // len(policy.arms)
    for a, heads in enumerate(policy.arm_heads):
        items = [(i, a, torch.zeros(policy.pool_l.size)) for i in range(a * per_arm, (a + 1) * per_arm)]
        trainer.train_batch(policy, frozen, len(heads), items)
    assert counted["steps"] == len(policy.arms) and trainer.progress.samples_seen == per_arm * len(policy.arms)
    s1_of_unused = (N_TRAIN - per_arm * len(policy.arms)) * forward_flops(SEQ, [12] * 3, trainer.model.config,
                                                                             include_classifier=False)
    assert trainer.progress.train_flops + s1_of_unused == counted["flops"]


@pytest.mark.slow
@pytest.mark.parametrize("layer_norm", LAYER_NORMS)
@pytest.mark.parametrize("mode, decision_states", [("t-dht", "clean"), ("t-dht", "train"), ("s-dht", "clean"),
                                                   ("vanilla-12", "clean")])
def test_dht_epoch_matches_flop_counter(layer_norm, mode, decision_states, counted):
    """Tree and integrated search (S1 pass, decision pass or none, mixed depths and heads) and 12-VaBERT."""
    cfg = make_cfg({"decision_states": decision_states}, epochs=2)
    progress = make_trainer(layer_norm, mode, cfg).fit(progress_bar=False)
    assert counted["steps"] >= 6 and progress.samples_seen == 2 * N_TRAIN
    assert progress.train_flops == counted["flops"]
    if mode == "vanilla-12":
        assert progress.train_flops == progress.reference_flops


@pytest.mark.slow
@pytest.mark.parametrize("mode, freeze", [("p-dht", "all_but_last_two"), ("t-dht", "none")])
def test_mean_pooling_matches_flop_counter(mode, freeze, counted):
    """classifier_pooling: mean (no pooler matmul), post-LN: the classifier reads the token mean."""
    cfg = make_cfg({"p_dht_freeze": freeze}, epochs=2)
    trainer = make_trainer("post", mode, cfg, pooling="mean")
    assert trainer.model.config.classifier_pooling == "mean"
    if mode == "p-dht":
        trainer.progress.epoch = 1  # the frozen epoch only
    progress = trainer.fit(progress_bar=False)
    assert counted["steps"] >= 3 and progress.train_flops == counted["flops"]


@pytest.mark.slow
@pytest.mark.parametrize("layer_norm, pooling", [("post", "cls"), ("pre", "mean")])
def test_sequential_epoch_matches_flop_counter(layer_norm, pooling, counted):
    """search: sequential (docs/training.md T31): each step's no-grad pass to the deepest depth with the chosen
    heads and an exit read at every depth, then the paths of mixed depths with every exit on them read with
    gradient (a sample that stops early leaves the batch)."""
    from test_sequential import SEQUENTIAL

    cfg = make_cfg(modes={"q-dht": SEQUENTIAL}, epochs=2)
    progress = make_trainer(layer_norm, "q-dht", cfg, pooling).fit(progress_bar=False)
    assert counted["steps"] >= 6 and progress.samples_seen == 2 * N_TRAIN
    assert len({k for e in progress.selections.values() for k in e if k.startswith("layers/")}) >= 2
    assert progress.train_flops == counted["flops"]


def test_frozen_layers_cost_what_autograd_computes():
    """The backward rules of train_flops, layer by layer, for the three P-DHT readings on a 6-layer path."""
    conf = DHTConfig(hidden_size=48, num_hidden_layers=12, num_attention_heads=12, intermediate_size=64,
                     num_labels=3, layer_norm="post")
    path = [12, 12, 12, 8, 12, 12]
    lin = [layer_flops(SEQ, h, conf, "linear") for h in path]
    att = [layer_flops(SEQ, h, conf) - lin[i] for i, h in enumerate(path)]
    fwd = forward_flops(SEQ, path, conf)
    head = forward_flops(SEQ, [], conf)

    def step(**kw):
        return train_flops(SEQ, path, conf, include_s1=False, **kw)

    assert step() == 3 * fwd
    # last_two: layers 4, 5 frozen, a gradient flows through them: no weight gradients there.
    assert step(frozen_layers={4, 5}) == 3 * fwd - lin[4] - lin[5]
    # all_but_last_two: layers 0-3 and the embeddings frozen, run without gradient: forward only. Layer 4's
    # input needs no gradient, and (post-LN) its Q/K/V read that input, so their dx matmuls are skipped.
    qkv = 2 * 3 * SEQ * 48 * (12 * 4)  # layer 4 keeps 12 heads of size 4
    tail = 2 * (lin[4] + att[4] + lin[5] + att[5]) - qkv
    assert step(frozen_layers={0, 1, 2, 3}, embeddings_train=False) == fwd + tail + 2 * head
    pre = dataclasses.replace(FlopShape.of(conf), layer_norm="pre")  # pre-LN: Q/K/V read LayerNorm(x), whose weight trains
    assert (train_flops(SEQ, path, pre, include_s1=False, frozen_layers={0, 1, 2, 3}, embeddings_train=False)
            == fwd + tail + qkv + 2 * head)
    # the decision pass: forward of the path's first layers, no classifier
    assert step(decision_layers=3) == 3 * fwd + forward_flops(SEQ, path[:3], conf, include_classifier=False)
    assert full_model_flops(SEQ, conf, mode="train") == train_flops(SEQ, [12] * 12, conf, include_s1=False)
    with pytest.raises(ValueError, match="decision_layers"):
        step(decision_layers=7)
