"""The states UCB_H and the TSB decide from (dht.decision_states) and their per-group normalisers."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from conftest import ROOT, mode_spec

from dht.arm_features import arm_space, compute_arm_features
from dht.config_loading import load_config, read_params
from dht.evaluation import SplitData
from dht.model import DHTConfig, DHTForSequenceClassification
from dht.policy import Policy, predict
from dht.trainer import Trainer

N_TRAIN, SEQ = 64, 12


def make_cfg(**dht):
    raw = copy.deepcopy(read_params(ROOT / "params.yaml"))
    raw["profiles"]["tiny"]["train"].update({"batch_size": 16, "checkpoint_every": 1000})
    raw["dht"].update(dht)
    cfg = load_config(ROOT / "params.yaml", profile="tiny", raw=raw)
    cfg.dht.modes["t-12"] = mode_spec(search="tree", layers=[12], heads=[8, 10, 12])  # every sample: 3 groups
    return cfg


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    conf = DHTConfig(vocab_size=60, hidden_size=48, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=3)
    assert conf.hidden_dropout_prob > 0 and conf.attention_probs_dropout_prob > 0  # training states are noisy
    model = DHTForSequenceClassification(conf)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (N_TRAIN, SEQ), generator=g)
    lengths = torch.randint(4, SEQ + 1, (N_TRAIN,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    train = SplitData(ids * mask, mask, (ids[:, 1] % 3).long(), torch.arange(N_TRAIN) % 3)
    feats, _ = compute_arm_features(model, [(train.input_ids, train.attention_mask)], arm_space(make_cfg()),
                                    make_cfg().dht.features, seed=0)
    return model, feats, train


def trainer_for(setup, mode, cfg):
    model, feats, train = setup
    torch.manual_seed(cfg.training_seed)
    return Trainer(cfg, mode, copy.deepcopy(model), feats, train, torch.device("cpu"), SEQ)


def recording(monkeypatch, policy, calls):
    """Record every head decision of `policy`: the state its contexts were pooled from, the group, and what was
    decided (training pools on each rank and decides jointly, inference in one call: both go through these two)."""
    contexts, decide = policy.head_contexts, policy.decide_heads

    def head_contexts(state, mask):
        calls.append({"state": state.detach().clone()})
        return contexts(state, mask)

    def decide_heads(g, xt, xh, arm, greedy, learn):
        out = decide(g, xt, xh, arm, greedy=greedy, learn=learn)
        calls[-1].update(g=g, **out)
        return out

    monkeypatch.setattr(policy, "head_contexts", head_contexts)
    monkeypatch.setattr(policy, "decide_heads", decide_heads)


def one_batch(trainer):
    released = trainer._enqueue(trainer.policy, trainer.order(0)[:16])
    assert len(released) == 1  # one depth, a full queue
    return released[0]


def test_training_decides_from_the_states_inference_sees(setup, monkeypatch):
    """With dropout on, a training step's UCB_H/TSB contexts are those inference computes from the same weights
    and input: group by group the state is the plain (eval-mode) pass with the heads chosen so far, and group 0's
    normalised contexts equal predict's."""
    trainer = trainer_for(setup, "t-12", make_cfg())
    policy = trainer.policy
    layers, items = one_batch(trainer)
    weights = copy.deepcopy(trainer.model)  # the weights the decisions see (the step updates them afterwards)
    train_calls: list[dict] = []
    recording(monkeypatch, policy, train_calls)
    trainer.train_batch(policy, False, layers, items)
    assert [c["g"] for c in train_calls] == [0, 1, 2]

    index = torch.tensor([i for i, _, _ in items])
    ids, mask, _ = trainer.train_data.batch(index, torch.device("cpu"))
    weights.eval()
    with torch.no_grad():
        state, keep = weights.embed(ids, mask)
        state = weights.run_layers(state, keep, 0, 3)
        for call, group in zip(train_calls, policy.groups, strict=True):
            torch.testing.assert_close(call["state"], state)
            state = weights.run_layers(state, keep, group.start, group.stop, call["plan"])

    # Inference from the same weights and samples (after the step's normaliser updates, which it reads).
    infer_calls: list[dict] = []
    recording(monkeypatch, policy, infer_calls)
    data = SplitData(trainer.train_data.input_ids[index], trainer.train_data.attention_mask[index],
                     trainer.train_data.labels[index])
    pred = predict(weights, policy, data, torch.device("cpu"), 16, SEQ)
    assert pred.layers.tolist() == [12] * len(items) and infer_calls[0]["g"] == 0
    for key in ("state", "xh", "xt"):
        torch.testing.assert_close(infer_calls[0][key], train_calls[0][key])


def test_train_reading_decides_from_the_noisy_states(setup, monkeypatch):
    """dht.decision_states: train keeps the other reading: the gradient pass's states, dropout included."""
    trainer = trainer_for(setup, "t-12", make_cfg(decision_states="train"))
    layers, items = one_batch(trainer)
    weights = copy.deepcopy(trainer.model).eval()
    calls: list[dict] = []
    recording(monkeypatch, trainer.policy, calls)
    trainer.train_batch(trainer.policy, False, layers, items)
    ids, mask, _ = trainer.train_data.batch(torch.tensor([i for i, _, _ in items]), torch.device("cpu"))
    with torch.no_grad():
        state, keep = weights.embed(ids, mask)
        clean = weights.run_layers(state, keep, 0, 3)
    gap = (calls[0]["state"] - clean).abs().max()
    assert gap > 100 * (clean.abs().max() * 1e-6)  # dropout, far beyond rounding


def test_per_group_normalisers_hold_separate_statistics(setup):
    """UCB_H and TSB contexts are normalised per dynamic group: each normaliser has seen exactly the samples
    whose path reaches its group, its own means, and survives a state_dict round trip; the old single-normaliser
    state is refused with a reason."""
    trainer = trainer_for(setup, "t-dht", make_cfg())
    progress = trainer.fit(progress_bar=False)
    policy = trainer.policy
    depths: Counter[int] = Counter()  # samples trained at each depth, over the epochs
    for sel in progress.selections.values():
        depths.update({int(k.split("/")[1]): v for k, v in sel.items() if k.startswith("layers/")})
    reached = [sum(n for depth, n in depths.items() if depth > group.start) for group in policy.groups]
    assert len(policy.norm_h) == len(policy.norm_t) == len(policy.groups) == 3
    assert [int(n.count) for n in policy.norm_h] == reached == [int(n.count) for n in policy.norm_t]
    assert reached[0] > reached[2] > 0  # the groups saw different samples
    for norms in (policy.norm_h, policy.norm_t):
        for a in range(3):
            for b in range(a + 1, 3):
                assert not torch.allclose(norms[a].mean, norms[b].mean, rtol=1e-3, atol=1e-6)

    copy_policy = Policy(trainer.cfg, trainer.mode, trainer.arm_features, trainer.model.config)
    copy_policy.load_state_dict(policy.state_dict())
    for name in ("norm_h", "norm_t"):
        for mine, theirs in zip(getattr(policy, name), getattr(copy_policy, name), strict=True):
            assert torch.equal(mine.mean, theirs.mean) and torch.equal(mine.m2, theirs.m2)
            assert float(mine.count) == float(theirs.count)
    old = policy.state_dict() | {"norm_h": policy.norm_h[0].state_dict()}
    with pytest.raises(ValueError, match="one norm_h normaliser.*one per dynamic group.*retrain"):
        copy_policy.load_state_dict(old)
