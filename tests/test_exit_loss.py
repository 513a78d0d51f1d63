"""exit_loss: path (docs/training.md T26): a training sample's loss also reads the shared classifier after every
shallower depth option its path passes, so the shallow exits train on the samples routed deep."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from test_trainer import SEQ, make_cfg, setup, trainer_for  # noqa: F401 (setup is a fixture)

import dht.trainer as trainer_module
from dht.config import Config
from dht.config_checks import check_semantics
from dht.flops import exit_loss_flops, forward_flops


def with_path_exits(cfg: Config, mode: str = "t-dht") -> Config:
    raw = cfg.model_dump(mode="json")
    raw["dht"]["modes"][mode]["exit_loss"] = "path"
    return Config.model_validate(raw)


def deep_batch(trainer, n: int = 8):
    """One queue batch of n training samples at the deepest option (context zeros: the arm is given)."""
    policy = trainer.policy
    deepest = max(policy.layer_options)
    arm = policy.layer_options.index(deepest)
    return policy, deepest, [(i, arm, torch.zeros(policy.context_size)) for i in range(n)]


@pytest.mark.parametrize("exit_loss", ["chosen", "path"])
def test_the_loss_reads_every_exit_the_path_passes(setup, monkeypatch, exit_loss):  # noqa: F811
    cfg = make_cfg()
    cfg = with_path_exits(cfg) if exit_loss == "path" else cfg
    trainer = trainer_for(setup, "t-dht", cfg=cfg)
    policy, deepest, items = deep_batch(trainer)
    reads: list[tuple[int, torch.Tensor]] = []  # (tokens' hidden size, logits) of each classifier read with gradient
    classify = trainer.model.classify

    def recording(hidden, keep=None, depth=None):
        logits = classify(hidden, keep, depth)
        if torch.is_grad_enabled() and trainer.model.training:
            reads.append(logits.detach())
        return logits

    monkeypatch.setattr(trainer.model, "classify", recording)
    loss = trainer.train_batch(policy, False, deepest, items)
    labels = trainer.train_data.labels[: len(items)]
    shallower = [d for d in policy.layer_options if d < deepest]
    assert len(reads) == 1 + (len(shallower) if exit_loss == "path" else 0)
    # the step's loss: each read's cross-entropy, every read weighing the same
    expected = torch.stack([F.cross_entropy(logits, labels) for logits in reads]).mean()
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_a_shallow_batch_reads_no_extra_exit(setup, monkeypatch):  # noqa: F811
    trainer = trainer_for(setup, "t-dht", cfg=with_path_exits(make_cfg()))
    policy = trainer.policy
    shallowest = min(policy.layer_options)
    items = [(i, policy.layer_options.index(shallowest), torch.zeros(policy.context_size)) for i in range(8)]
    calls = []
    classify = trainer.model.classify
    monkeypatch.setattr(trainer.model, "classify",
                        lambda h, k=None, d=None: calls.append(torch.is_grad_enabled()) or classify(h, k, d))
    trainer.train_batch(policy, False, shallowest, items)
    assert calls.count(True) == 1


def test_its_flops_are_the_extra_classifier_reads(setup, monkeypatch):  # noqa: F811
    cfg = with_path_exits(make_cfg())
    progress = trainer_for(setup, "t-dht", cfg=cfg).fit(progress_bar=False)
    conf = setup[0].config
    heads = [conf.num_attention_heads] * 2
    classifier = forward_flops(SEQ, heads, conf) - forward_flops(SEQ, heads, conf, include_classifier=False)
    assert exit_loss_flops(2, conf) == 2 * 3 * classifier and exit_loss_flops(0, conf) == 0
    # the same run with the reads counted as free: the same steps, exactly their FLOPs less
    monkeypatch.setattr(trainer_module, "exit_loss_flops", lambda *a, **k: 0)
    free = trainer_for(setup, "t-dht", cfg=cfg).fit(progress_bar=False)
    assert free.history == progress.history
    options = sorted(cfg.dht.modes["t-dht"].layers)
    expected = sum(count * exit_loss_flops(sum(d < int(key.split("/")[1]) for d in options), conf)
                   for epoch in progress.selections.values() for key, count in epoch.items()
                   if key.startswith("layers/"))
    assert expected > 0
    assert progress.train_flops - free.train_flops == pytest.approx(expected, rel=1e-9)


def test_any_number_of_processes_and_a_known_value():
    raw = with_path_exits(make_cfg()).model_dump(mode="json")
    assert not check_semantics(Config.model_validate(raw))
    raw["train"]["distributed"].update(nproc_per_node=2, backend="gloo")  # one loop: trained on 2 ranks too
    assert not check_semantics(Config.model_validate(raw))
    raw["dht"]["modes"]["t-dht"]["exit_loss"] = "all"
    with pytest.raises(ValidationError, match="exit_loss"):
        Config.model_validate(raw)
