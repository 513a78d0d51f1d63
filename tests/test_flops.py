"""Tests for dht.flops: FastBERT's published numbers, and agreement with FlopCounterMode on the real model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dht.flops import (
    FlopShape,
    arm_heads_per_layer,
    flop_ratio,
    forward_flops,
    full_model_flops,
    layer_flops,
    plan_flops,
    train_flops,
)
from dht.model import DHTConfig, DHTForSequenceClassification, head_mask_from_choices

BERT_BASE = FlopShape(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, num_labels=2
)
# Small model for FlopCounterMode: 12 layers, 12 heads of 8, FFN 192, 16 tokens.
SMALL = dict(
    vocab_size=64,
    hidden_size=96,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=192,
    max_position_embeddings=32,
    num_labels=4,
    attn_implementation="eager",
)
SEQ = 16
LINEAR_OPS = {"aten.addmm", "aten.mm"}  # nn.Linear / F.linear; attention matmuls are aten.bmm


@pytest.fixture(scope="module")
def model() -> DHTForSequenceClassification:
    torch.manual_seed(0)
    return DHTForSequenceClassification(DHTConfig(**SMALL)).eval()


def count(fn) -> tuple[int, dict[str, int]]:
    """Total FLOPs and per-op FLOPs that FlopCounterMode sees while running ``fn``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    per_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), per_op


def plan_for(heads_per_layer: list[list[int]], num_layers: int = 12, num_heads: int = 12):
    """depth/heads tensors for samples given as lists of heads kept per layer (random head identities)."""
    g = torch.Generator().manual_seed(len(heads_per_layer))
    choices = [
        [torch.randperm(num_heads, generator=g)[:k].tolist() for k in sample] for sample in heads_per_layer
    ]
    depth = torch.tensor([len(sample) for sample in heads_per_layer])
    return depth, head_mask_from_choices(choices, num_layers, num_heads)


# ---- published reference numbers ----------------------------------------------------------------------------


def test_bert_base_linear_convention_matches_fastbert():
    per_layer = layer_flops(128, 12, BERT_BASE, convention="linear")
    assert abs(per_layer - 1_811.9e6) <= 0.1e6
    total = forward_flops(128, [12] * 12, BERT_BASE, convention="linear")
    assert abs(total - 21_785e6) / 21_785e6 < 0.005  # FastBERT (Liu et al. 2020), BERT-base at n = 128


def test_full_convention_adds_exactly_the_attention_matmuls():
    n, d = 128, 768
    full = forward_flops(n, [12] * 12, BERT_BASE, convention="full")
    linear = forward_flops(n, [12] * 12, BERT_BASE, convention="linear")
    assert full - linear == 12 * 2 * (2 * n * n * d)  # QK^T and AV, 2 FLOPs per MAC


def test_cost_is_affine_in_kept_heads():
    for convention in ("full", "linear"):
        costs = [layer_flops(64, h, BERT_BASE, convention) for h in range(13)]
        steps = {b - a for a, b in zip(costs, costs[1:], strict=False)}
        assert len(steps) == 1 and steps.pop() > 0
        assert costs[0] == 2 * 2 * 64 * 768 * 3072  # no head: only the FFN


# ---- agreement with FlopCounterMode on the model ------------------------------------------------------------

SETTINGS = {
    "3 layers, all heads": [12] * 3,
    "6 layers, 8 heads in dynamic layers": [12] * 3 + [8] * 3,
    "12 layers, 10 heads in dynamic layers": [12] * 3 + [10] * 9,
    "mixed per layer, one layer without heads": [12, 12, 12, 8, 8, 8, 0, 5, 1, 12, 7, 3],
    "full model": [12] * 12,
}


@pytest.mark.parametrize("heads_per_layer", list(SETTINGS.values()), ids=list(SETTINGS))
def test_analytic_count_matches_flop_counter(model, heads_per_layer):
    depth, heads = plan_for([heads_per_layer])
    input_ids = torch.randint(1, SMALL["vocab_size"], (1, SEQ))
    with torch.no_grad():
        total, per_op = count(lambda: model(input_ids, depth=depth, heads=heads))
    full = forward_flops(SEQ, heads_per_layer, model.config, convention="full")
    linear = forward_flops(SEQ, heads_per_layer, model.config, convention="linear")
    measured_linear = sum(n for op, n in per_op.items() if op in LINEAR_OPS)
    assert abs(total - full) / full < 0.01
    assert abs(measured_linear - linear) / linear < 0.01
    assert set(per_op) <= LINEAR_OPS | {"aten.bmm"}  # nothing else is counted, so the split above is complete


def test_mean_pooling_has_no_pooler_matmul():
    torch.manual_seed(0)
    mean_model = DHTForSequenceClassification(DHTConfig(**SMALL, classifier_pooling="mean")).eval()
    input_ids = torch.randint(1, SMALL["vocab_size"], (2, SEQ))
    with torch.no_grad():
        total, _ = count(lambda: mean_model(input_ids))
    assert total == 2 * forward_flops(SEQ, [12] * 12, mean_model.config)
    cls_shape = FlopShape.of(DHTConfig(**SMALL))
    assert forward_flops(SEQ, [12] * 12, cls_shape) - total // 2 == 2 * SMALL["hidden_size"] ** 2  # the pooler


def test_masked_path_computes_every_head(model):
    heads_per_layer = [12] * 3 + [8] * 9
    depth, heads = plan_for([heads_per_layer])
    input_ids = torch.randint(1, SMALL["vocab_size"], (1, SEQ))
    with torch.no_grad():
        sliced, _ = count(lambda: model(input_ids, depth=depth, heads=heads))
        masked, _ = count(lambda: model(input_ids, depth=depth, heads=heads, attention_path="masked"))
    assert masked == forward_flops(SEQ, [12] * 12, model.config)
    assert sliced == forward_flops(SEQ, heads_per_layer, model.config) < masked


def test_mixed_batch_count_is_sum_of_per_sample_plans(model):
    # Two samples keep 8 heads in layers 3-5 but (random) different ones: the batched-gather branch.
    samples = [
        [12] * 3,
        [12] * 3 + [8] * 3,
        [12] * 3 + [8] * 6,
        [12] * 3 + [10] * 9,
        [12, 12, 12, 6, 6, 0, 0, 0, 12],
    ]
    depth, heads = plan_for(samples)
    input_ids = torch.randint(1, SMALL["vocab_size"], (len(samples), SEQ))
    with torch.no_grad():
        total, per_op = count(lambda: model(input_ids, depth=depth, heads=heads))
    assert "aten.baddbmm" in per_op  # the gathered branch ran
    expected = plan_flops(depth, heads, model.config, SEQ)
    assert total == int(expected.sum())
    assert expected.tolist() == [forward_flops(SEQ, s, model.config) for s in samples]


def test_training_step_matches_the_2x_backward_convention(model):
    """forward + backward + the no-grad S1 pass, as FlopCounterMode sees them, equals train_flops."""
    heads_per_layer = [12] * 3 + [8] * 3 + [10] * 3
    depth, heads = plan_for([heads_per_layer])
    input_ids = torch.randint(1, SMALL["vocab_size"], (1, SEQ))
    labels = torch.tensor([1])

    def step(with_s1: bool, plan: bool) -> None:
        if with_s1:
            with torch.no_grad():
                model.encode_prefix(input_ids, num_layers=3)
        kwargs = {"depth": depth, "heads": heads} if plan else {}
        model(input_ids, labels=labels, **kwargs).loss.backward()

    model.zero_grad(set_to_none=True)
    dht_step, _ = count(lambda: step(with_s1=True, plan=True))
    model.zero_grad(set_to_none=True)
    bert_step, _ = count(lambda: step(with_s1=False, plan=False))
    model.zero_grad(set_to_none=True)
    assert dht_step == train_flops(SEQ, heads_per_layer, model.config, fixed_layers=3)
    assert bert_step == full_model_flops(SEQ, model.config, mode="train")
    assert bert_step == 3 * full_model_flops(SEQ, model.config, mode="inference")


# ---- ratios and helpers -------------------------------------------------------------------------------------


def test_flop_ratios():
    full = [12] * 12
    for convention in ("full", "linear"):
        assert flop_ratio(128, full, BERT_BASE, convention) == 1.0
    # Training with the S1 pass costs more than 12-VaBERT even at full size: + b/N_L of a forward, / 3.
    s1_share = forward_flops(128, [12] * 3, BERT_BASE, include_classifier=False) / (
        3 * forward_flops(128, full, BERT_BASE)
    )
    assert flop_ratio(128, full, BERT_BASE, mode="train") == pytest.approx(1 + s1_share)
    # Arm 3L12H is a quarter of BERT-base (DistilBERT's 3-layer 0.25x, Section 6.2).
    assert flop_ratio(128, arm_heads_per_layer(3, 12, BERT_BASE), BERT_BASE) == pytest.approx(0.25, abs=0.001)
    # 8 of 12 heads in the 9 dynamic layers saves in both conventions, more under "full" because the attention
    # matmuls it adds also scale with the number of heads (and grow with n^2).
    r_full = flop_ratio(300, arm_heads_per_layer(12, 8, BERT_BASE), BERT_BASE, "full")
    r_linear = flop_ratio(300, arm_heads_per_layer(12, 8, BERT_BASE), BERT_BASE, "linear")
    assert 0.8 < r_full < r_linear < 1.0


def test_train_flops_conventions():
    plan = [12] * 3 + [8] * 3
    fwd = forward_flops(64, plan, BERT_BASE)
    s1 = forward_flops(64, [12] * 3, BERT_BASE, include_classifier=False)
    assert train_flops(64, plan, BERT_BASE, fixed_layers=3) == 3 * fwd + s1
    assert train_flops(64, plan, BERT_BASE, include_s1=False) == 3 * fwd
    frozen = train_flops(64, plan, BERT_BASE, include_s1=False, frozen_layers={4, 5})
    linear, attention = (
        layer_flops(64, 8, BERT_BASE, "linear"),
        layer_flops(64, 8, BERT_BASE) - layer_flops(64, 8, BERT_BASE, "linear"),
    )
    assert frozen == 3 * fwd - 2 * linear  # frozen layers skip their weight gradients only
    assert attention > 0


@pytest.mark.parametrize("convention", ["full", "linear"])
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_plan_flops_agrees_with_scalar_functions(convention, mode):
    config = DHTConfig(**SMALL)
    g = torch.Generator().manual_seed(3)
    depth = torch.tensor([0, 3, 7, 12, 12, 5])
    heads = torch.rand(6, 12, 12, generator=g) > 0.5
    heads[3] = True
    got = plan_flops(depth, heads, config, 20, convention=convention, mode=mode)
    for i, d in enumerate(depth.tolist()):
        per_layer = heads[i, :d].sum(-1).tolist()
        if mode == "inference":
            expected = forward_flops(20, per_layer, config, convention)
        else:
            expected = train_flops(20, per_layer, config, convention)
        assert got[i].item() == expected, i
    lengths = torch.tensor([8, 16])
    by_length = plan_flops(None, None, config, lengths, convention=convention)
    assert by_length.tolist() == [forward_flops(n, [12] * 12, config, convention) for n in (8, 16)]
    assert plan_flops(None, None, config, 20, batch_size=2).tolist() == [full_model_flops(20, config)] * 2
    plain_step = plan_flops(None, None, config, 20, convention, "train", batch_size=1, include_s1=False)
    assert plain_step.item() == full_model_flops(20, config, convention, "train")


def test_arm_heads_per_layer():
    assert arm_heads_per_layer(6, 8, BERT_BASE) == [12, 12, 12, 8, 8, 8]
    assert arm_heads_per_layer(3, 10, BERT_BASE) == [12, 12, 12]
    assert arm_heads_per_layer(4, 8, BERT_BASE, fixed_layers=1) == [12, 8, 8, 8]


def test_invalid_inputs():
    with pytest.raises(ValueError, match="convention"):
        forward_flops(16, [12], BERT_BASE, convention="thop")
    with pytest.raises(ValueError, match="heads per layer"):
        forward_flops(16, [13], BERT_BASE)
    with pytest.raises(ValueError, match="layers requested"):
        forward_flops(16, [12] * 13, BERT_BASE)
    with pytest.raises(ValueError, match="batch size"):
        plan_flops(None, None, BERT_BASE, 16)
    with pytest.raises(ValueError, match="hidden_size"):
        FlopShape.of({"intermediate_size": 4, "num_attention_heads": 2, "num_hidden_layers": 1})
