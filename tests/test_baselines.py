"""Tests for what the baselines share: the registry (dht.baselines) and the training loop (dht.baselines.loop)."""

import importlib

import pytest
import torch
from torch import nn

from dht.baselines import KINDS, loop
from dht.config import BaselinesConfig, parse_baseline
from dht.guard import FiniteGuard, NonFiniteError


@pytest.mark.parametrize("name", ["distil-3", "fastbert-0.5", "nas-prune-0.5", "flexibert-0.5"])
def test_every_kind_has_its_section_and_a_runner(name):
    kind, _ = parse_baseline(name)
    baseline = KINDS[kind]
    assert baseline.section in BaselinesConfig.model_fields
    section = f"baselines.{baseline.section}"
    assert any(k == section or k.startswith(f"{section}.") for k in baseline.params)  # its section, or keys of it
    assert "model" not in baseline.params and "train" not in baseline.params  # read: the keys, not the sections
    assert callable(importlib.import_module(baseline.module).run)


def _model_and_data():
    torch.manual_seed(0)
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    model = nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), lambda index: ((model(x[index]) - y[index]) ** 2).mean()


def test_train_stops_after_max_steps_within_an_epoch_and_draws_one_order_per_epoch():
    model, opt, loss_of = _model_and_data()
    gen = torch.Generator().manual_seed(3)
    history = loop.train(model, opt, loss_of, 10, epochs=3, batch_size=4, generator=gen,
                         guard=FiniteGuard("test", "nothing"), max_steps=5)
    assert [epoch.sizes for epoch in history] == [[4, 4, 2], [4, 4]]
    expected = torch.Generator().manual_seed(3)
    for _ in range(2):  # two epochs began, so two orders were drawn, and no third
        torch.randperm(10, generator=expected)
    assert torch.equal(gen.get_state(), expected.get_state())
    first = history[0]
    by_hand = (first.losses[0] * 4 + first.losses[1] * 4 + first.losses[2] * 2) / 10
    assert first.sample_mean() == pytest.approx(by_hand, rel=1e-12)
    assert first.mean() == pytest.approx(sum(first.losses) / 3, rel=1e-12)


def test_update_names_the_epoch_only_when_given():
    model, opt, loss_of = _model_and_data()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    guard = FiniteGuard("test", "nothing")
    with pytest.raises(NonFiniteError, match=r"at epoch 2, step 7;"):
        loop.update(loss_of(torch.arange(4)), opt, guard, 7, 2, model=model)
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at step 7;"):
        loop.update(loss_of(torch.arange(4)), opt, guard, 7, model=model)
