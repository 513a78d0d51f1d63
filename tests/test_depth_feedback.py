"""depth_feedback: all_depths (docs/training.md T24): UCB_L learns every depth option of every training sample from
one no-grad pass read at each option's depth, with each sample's own mean as the reward's baseline."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from test_trainer import SEQ, make_cfg, setup, trainer_for  # noqa: F401 (setup is a fixture)
from torch import Tensor

import dht.rewards as dht_rewards
import dht.trainer as trainer_module
from dht.config import Config
from dht.config_checks import check_semantics
from dht.flops import depth_feedback_flops, forward_flops
from dht.policy import Policy
from dht.rewards import all_depths_reward


def with_all_depths(cfg: Config, mode: str = "t-dht") -> Config:
    raw = cfg.model_dump(mode="json")
    raw["dht"]["modes"][mode]["depth_feedback"] = "all_depths"
    return Config.model_validate(raw)


def test_the_reward_compares_a_sample_with_itself():
    delta = torch.tensor([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0]], dtype=torch.float64)
    r = all_depths_reward(delta, 2.0)
    assert torch.allclose(r[0], 2.0 * (7 / 3) / delta[0]) and torch.allclose(r[1], torch.full((3,), 2.0, dtype=torch.float64))
    # how hard a sample is (all its losses x 10) does not move its rewards; the paper's batch ratio would
    assert torch.allclose(all_depths_reward(delta * torch.tensor([[10.0], [0.1]], dtype=torch.float64), 2.0), r)
    assert float(all_depths_reward(delta, 2.0, clip=3.0).max()) == 3.0
    with pytest.raises(ValueError, match="samples, options"):
        all_depths_reward(delta[0], 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        all_depths_reward(-delta, 1.0)


def learn_and_route(policy: Policy, losses_for, seed: int) -> tuple[Tensor, int, int]:
    """30 full-information batches of 32 random contexts whose depth losses ``losses_for(x, options, g)`` gives,
    then the greedy choice for 100 contexts with a positive first entry and 100 with a negative one: (arms
    [200], the shallowest option's index, the deepest's)."""
    options = torch.tensor(policy.layer_options, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    for _ in range(30):
        x = torch.randn(32, policy.context_size, generator=g, dtype=torch.float64)
        policy._learn_all_depths(x, losses_for(x, options, g))
    x = torch.randn(200, policy.context_size, generator=g, dtype=torch.float64)
    x[:, 0] = torch.where(torch.arange(200) < 100, 1.5, -1.5)
    return policy.ucb.select(x, greedy=True), int(options.argmin()), int(options.argmax())


def test_linucb_learns_where_depth_pays_from_every_option(setup):  # noqa: F811
    """Losses where the deepest option is worth its cost only for samples whose context has a positive first
    entry: after full-information updates the greedy choice follows the sample."""
    model, feats, _, _ = setup
    cfg = with_all_depths(make_cfg())
    policy = Policy(cfg, cfg.dht.modes["t-dht"], feats, model.config)

    def losses(x, options, g):
        # deep cuts the loss 20x where it pays (beats its cost), only 1.1x elsewhere; scale is per sample
        scale = torch.rand(32, 1, generator=g, dtype=torch.float64) * 3 + 0.1
        ratio = torch.where(x[:, 0] > 0, 20.0, 1.1)[:, None] ** ((options - options.min()) / (options.max() - options.min()))
        return scale / ratio

    arm, shallow, deep = learn_and_route(policy, losses, seed=3)
    assert int(policy.ucb.counts.min()) == int(policy.ucb.counts.max()) == 30 * 32  # every option, every sample
    assert (arm[:100] == deep).float().mean() > 0.9 and (arm[100:] == shallow).float().mean() > 0.9


def test_training_runs_the_pass_and_counts_its_flops(setup, monkeypatch):  # noqa: F811
    cfg = with_all_depths(make_cfg())
    trainer = trainer_for(setup, "t-dht", cfg=cfg)
    progress = trainer.fit(progress_bar=False)
    policy = trainer.policy
    assert int(policy.ucb.counts.sum()) == progress.samples_seen * len(policy.layer_options)
    assert int(policy.ucb.counts.min()) == int(policy.ucb.counts.max())  # every option learns every sample
    conf = trainer.model.config
    per_sample = depth_feedback_flops(SEQ, policy.layer_options, conf)
    heads, k = [conf.num_attention_heads] * max(policy.layer_options), len(policy.layer_options)
    classifier = forward_flops(SEQ, heads, conf) - forward_flops(SEQ, heads, conf, include_classifier=False)
    assert per_sample == forward_flops(SEQ, heads, conf) + (k - 1) * classifier  # the deepest pass, k exits
    # the same run with the pass counted as free: the same decisions, and exactly the passes' FLOPs less
    monkeypatch.setattr(trainer_module, "depth_feedback_flops", lambda *a, **k: 0)
    uncounted = trainer_for(setup, "t-dht", cfg=cfg).fit(progress_bar=False)
    assert uncounted.history == progress.history
    assert progress.train_flops - uncounted.train_flops == pytest.approx(progress.samples_seen * per_sample, rel=1e-9)


def test_only_tree_modes_take_it_on_any_number_of_processes():
    cfg = make_cfg()
    raw = cfg.model_dump(mode="json")
    raw["dht"]["modes"]["s-dht"]["depth_feedback"] = "all_depths"
    problems = check_semantics(Config.model_validate(raw))
    assert any("dht.modes.s-dht.depth_feedback = 'all_depths'" in p and "search: tree" in p for p in problems)
    assert not check_semantics(with_all_depths(cfg))
    raw = with_all_depths(cfg).model_dump(mode="json")
    raw["train"]["distributed"].update(nproc_per_node=2, backend="gloo")  # one loop: trained on 2 ranks too
    assert not check_semantics(Config.model_validate(raw))
    raw["dht"]["modes"]["t-dht"]["depth_feedback"] = "every"
    with pytest.raises(ValidationError, match="depth_feedback"):
        Config.model_validate(raw)


def test_the_difference_reward_prices_each_layer_in_loss():
    layers = torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64)
    # sample 0: depth saves 0.6 of loss per 2 layers (0.3 a layer > price 0.1): the deepest wins;
    # sample 1: saves 0.05 a layer (< price): the shallowest wins; sample 2: the same cut on a small loss
    losses = torch.tensor([[1.5, 0.9, 0.3], [0.5, 0.4, 0.3], [0.015, 0.009, 0.003]], dtype=torch.float64)
    r = dht_rewards.difference_reward(losses, layers, price=0.1, scale=2.0)
    assert r.argmax(dim=1).tolist() == [2, 0, 0]
    assert torch.allclose(r.sum(dim=1), torch.zeros(3, dtype=torch.float64))  # against the sample's own mean
    assert torch.allclose(r[0], -2.0 * (losses[0] + 0.1 * layers - (losses[0] + 0.1 * layers).mean()))
    # the ratio reward (gamma = 1) ranks sample 2 like sample 0: the same 5x cut, whatever the loss it saves
    ratio = all_depths_reward(losses * layers, 1.0)
    assert ratio[0].argmax() == ratio[2].argmax() == 2
    with pytest.raises(ValueError, match="options"):
        dht_rewards.difference_reward(losses[:, :2], layers, price=0.1)


def test_the_policy_learns_with_the_difference_reward(setup):  # noqa: F811
    model, feats, _, _ = setup
    raw = with_all_depths(make_cfg()).model_dump(mode="json")
    raw["dht"]["bandits"].update({"all_depths_reward": "difference", "depth_price": 0.1})
    cfg = Config.model_validate(raw)
    policy = Policy(cfg, cfg.dht.modes["t-dht"], feats, model.config)

    def losses(x, options, g):
        # depth saves 0.3 of loss a layer where x0 > 0, nothing elsewhere; 3.0: no loss reaches 0 (stays linear)
        return 3.0 - torch.where(x[:, 0] > 0, 0.3, 0.0)[:, None] * (options - options.min())

    arm, shallow, deep = learn_and_route(policy, losses, seed=4)
    assert (arm[:100] == deep).float().mean() > 0.9 and (arm[100:] == shallow).float().mean() > 0.9


def test_the_depth_losses_can_be_read_as_error_probabilities(setup):  # noqa: F811
    """dht.bandits.depth_loss (T27): the same pass, each option's loss 1 - p(true class) instead of the
    cross-entropy: exp(-cross_entropy) is p(true class), so the two readings of one model agree exactly."""
    raw = with_all_depths(make_cfg()).model_dump(mode="json")
    ce_trainer = trainer_for(setup, "t-dht", cfg=Config.model_validate(raw))
    raw["dht"]["bandits"]["depth_loss"] = "error_probability"
    err_trainer = trainer_for(setup, "t-dht", cfg=Config.model_validate(raw))
    ids, mask, labels = setup[2].batch(torch.arange(16), torch.device("cpu"))
    ce = ce_trainer._depth_losses(ce_trainer.policy, ids, mask, labels)
    err = err_trainer._depth_losses(err_trainer.policy, ids, mask, labels)
    assert err.shape == ce.shape == (16, len(err_trainer.policy.layer_options))
    assert bool(((err >= 0) & (err <= 1)).all())
    assert torch.allclose(err, 1.0 - torch.exp(-ce), atol=1e-5)
    raw["dht"]["bandits"]["depth_loss"] = "zero_one"
    with pytest.raises(ValidationError, match="depth_loss"):
        Config.model_validate(raw)


def test_depth_memory_epoch_restarts_ucb_l_each_epoch(setup):  # noqa: F811
    """depth_memory: epoch (T28): after a 2-epoch run UCB_L holds the last epoch's updates only."""
    raw = with_all_depths(make_cfg()).model_dump(mode="json")
    raw["dht"]["modes"]["t-dht"]["depth_memory"] = "epoch"
    trainer = trainer_for(setup, "t-dht", cfg=Config.model_validate(raw))
    progress = trainer.fit(progress_bar=False)
    last = progress.selections[max(progress.selections, key=int)]
    last_epoch = sum(v for k, v in last.items() if k.startswith("layers/"))
    assert 0 < last_epoch < progress.samples_seen
    k = len(trainer.policy.layer_options)
    assert int(trainer.policy.ucb.counts.sum()) == last_epoch * k  # full information, this epoch's samples only
    assert int(trainer.policy.ucb_h.counts.sum()) > 0  # UCB_H keeps its memory


def test_a_mode_sets_its_own_all_depths_reward_over_dht_bandits(setup):  # noqa: F811
    """A mode's all_depths_reward / depth_price / depth_loss replace dht.bandits' for that mode alone (the
    `seeds` profile prices t-dht-val without changing what the paper's modes read), and a mode that sets them
    without depth_feedback: all_depths is refused (they would do nothing)."""
    raw = with_all_depths(make_cfg()).model_dump(mode="json")
    raw["dht"]["modes"]["t-dht"].update({"all_depths_reward": "difference", "depth_price": 0.3,
                                          "depth_loss": "error_probability"})
    cfg = Config.model_validate(raw)
    assert not check_semantics(cfg)
    trainer = trainer_for(setup, "t-dht", cfg=cfg)
    own = trainer.policy.bandit_cfg
    assert (own.all_depths_reward, own.depth_price, own.depth_loss) == ("difference", 0.3, "error_probability")
    assert (cfg.dht.bandits.all_depths_reward, cfg.dht.bandits.depth_price) == ("ratio", 0.075)
    ids, mask, labels = setup[2].batch(torch.arange(8), torch.device("cpu"))
    err = trainer._depth_losses(trainer.policy, ids, mask, labels)
    assert bool(((err >= 0) & (err <= 1)).all())  # 1 - p(true class), the mode's depth_loss
    raw["dht"]["modes"]["f-dht"]["depth_price"] = 0.1
    problems = check_semantics(Config.model_validate(raw))
    assert any(p.startswith("dht.modes.f-dht: depth_price set") and "all_depths" in p for p in problems)
