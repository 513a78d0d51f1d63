"""dht.features.exit_confidence (docs/training.md T23): the shallow exit's uncertainty in the UCB_L / UCB_cp
context, in training and at inference, and a LinUCB that can route on it."""

from __future__ import annotations

import copy

import pytest
import torch
from test_trainer import SEQ, make_cfg, make_split, setup, trainer_for  # noqa: F401 (setup is a fixture)

import dht.policy as policy_module
import dht.trainer as trainer_module
from dht.config import Config
from dht.integrity import write_manifest
from dht.policy import Policy, exit_uncertainty, predict
from dht.trainer import load_trained, save_trained


def with_exit_confidence(cfg: Config) -> Config:
    raw = cfg.model_dump(mode="json")
    raw["dht"]["features"]["exit_confidence"] = True
    return Config.model_validate(raw)


@pytest.mark.parametrize("mode", ["t-dht", "s-dht"])
def test_the_context_gains_the_exit_uncertainty(setup, mode):  # noqa: F811
    model, feats, _, _ = setup
    cfg = with_exit_confidence(make_cfg())
    policy = Policy(cfg, cfg.dht.modes[mode], feats, model.config)
    plain = Policy(make_cfg(), make_cfg().dht.modes[mode], feats, model.config)
    assert policy.context_size == plain.context_size + 1 == policy.pool_l.size + 1
    assert policy.ucb.context_dim == policy.context_size
    g = torch.Generator().manual_seed(0)
    s1 = torch.randn(6, SEQ, model.config.hidden_size, generator=g)
    mask = torch.ones(6, SEQ, dtype=torch.long)
    with pytest.raises(ValueError, match="exit_confidence"):
        policy.choose_arms(s1, mask, 6, greedy=True, learn=False)
    u = torch.tensor([0.05, 0.6, 0.2, 0.45, 0.3, 0.0])
    for _ in range(3):  # let the running normaliser see the spread
        _, context = policy.choose_arms(s1, mask, 6, greedy=True, learn=True, uncertainty=u)
    assert context.shape == (6, policy.context_size)
    assert torch.equal(context[:, -1].argsort(), u.argsort())  # normalised, the order kept
    fixed = Policy(cfg, cfg.dht.modes["vanilla-12"], feats, model.config)
    assert not fixed.exit_confidence  # a fixed arm decides nothing


def test_exit_uncertainty_is_one_minus_the_shallow_heads_top_probability(setup):  # noqa: F811
    model = copy.deepcopy(setup[0]).eval()
    data = make_split(8, 5)
    with torch.no_grad():
        s1 = model.encode_prefix(data.input_ids, data.attention_mask)
        u = exit_uncertainty(model, s1, data.attention_mask)
        probs = model.classify(s1, data.attention_mask.bool()).softmax(-1)
    assert torch.allclose(u, 1 - probs.max(-1).values)
    assert bool(((u >= 0) & (u <= 1 - 1 / model.config.num_labels + 1e-6)).all())


def test_trains_saves_and_predicts_with_it(setup, tmp_path, monkeypatch):  # noqa: F811
    cfg = with_exit_confidence(make_cfg())
    trainer = trainer_for(setup, "t-dht", cfg=cfg)
    calls = []
    original = policy_module.exit_uncertainty
    for module in (trainer_module, policy_module):  # training decisions, inference
        monkeypatch.setattr(module, "exit_uncertainty", lambda *a: calls.append(1) or original(*a))
    trainer.fit(progress_bar=False)
    assert calls  # the training decisions read it
    test = setup[3]
    pred = predict(trainer.model, trainer.policy, test, torch.device("cpu"), 16, SEQ)
    save_trained(tmp_path / "m", trainer.model, trainer.policy, "t-dht", cfg, {"dataset": "x", "classes": ["a", "b", "c"],
                                                                              "max_length": SEQ})
    from safetensors.torch import save_file

    save_file(setup[1], str(tmp_path / "m" / "arm_features.safetensors"))
    write_manifest(tmp_path / "m")  # as the train stage does, last
    model, policy, _ = load_trained(tmp_path / "m", torch.device("cpu"))
    assert policy.exit_confidence
    n = len(calls)
    again = predict(model, policy, test, torch.device("cpu"), 16, SEQ)
    assert len(calls) > n  # inference reads it too
    assert torch.equal(again.layers, pred.layers) and torch.equal(again.labels, pred.labels)


def test_linucb_routes_on_the_uncertainty(setup):  # noqa: F811
    """With rewards that favour depth for uncertain samples and the shallow arm for confident ones (the
    trade-off a sample-adaptive depth should learn), the contexts carry enough of the uncertainty for
    LinUCB to route on it; the pooled S1 part here is noise."""
    model, feats, _, _ = setup
    cfg = with_exit_confidence(make_cfg())
    policy = Policy(cfg, cfg.dht.modes["t-dht"], feats, model.config)
    shallow, deep = 0, len(policy.layer_options) - 1
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(32, SEQ, dtype=torch.long)
    for _ in range(40):
        s1 = torch.randn(32, SEQ, model.config.hidden_size, generator=g)
        u = torch.rand(32, generator=g) * 0.6
        _, context = policy.choose_arms(s1, mask, 32, greedy=True, learn=True, uncertainty=u)
        for arm, better in ((shallow, u < 0.3), (deep, u >= 0.3)):
            policy.ucb.update(context, torch.full((32,), arm), better.double() * 2 - 1)
    s1 = torch.randn(64, SEQ, model.config.hidden_size, generator=g)
    u = torch.cat([torch.full((32,), 0.05), torch.full((32,), 0.55)])
    arm, _ = policy.choose_arms(s1, torch.ones(64, SEQ, dtype=torch.long), 64, greedy=True, learn=False,
                                uncertainty=u)
    assert (arm[:32] == shallow).float().mean() > 0.9 and (arm[32:] == deep).float().mean() > 0.9
