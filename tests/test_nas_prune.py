"""Tests for dht.baselines.nas_prune: the differentiable NAS pruning baseline (report Sections 5.3-5.5)."""

import dataclasses
import json
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dht.baselines import nas_prune as nas
from dht.baselines.nas_prune import supernet as supernet_module
from dht.evaluation import SplitData, evaluate
from dht.flops import full_model_flops
from dht.model import DHTConfig, DHTForSequenceClassification

SEQ = 12
LINEAR_OPS = {"aten.addmm", "aten.mm"}  # nn.Linear / F.linear; attention matmuls are aten.bmm
TINY = dict(vocab_size=30, hidden_size=48, num_hidden_layers=12, num_attention_heads=12, intermediate_size=64,
            max_position_embeddings=16, num_labels=3, attn_implementation="eager")


def make_data(n: int, seed: int) -> SplitData:
    """Random tokens, padded to random lengths; label = first token mod 3 (learnable)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (n, SEQ), generator=g)
    lengths = torch.randint(6, SEQ + 1, (n,), generator=g)
    lengths[0] = SEQ  # at least one full-length row, so batches keep the width SEQ
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    ids = ids * mask
    return SplitData(ids, mask, ids[:, 0] % 3)


@pytest.fixture(scope="module")
def train_data() -> SplitData:
    return make_data(128, 1)


def train_teacher(train_data: SplitData, **overrides) -> DHTForSequenceClassification:
    """A briefly trained tiny 12-layer teacher (hidden 48, 12 heads of 4, FFN 64), in eval mode."""
    torch.manual_seed(0)
    model = DHTForSequenceClassification(DHTConfig(**TINY, **overrides))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        ids, mask, labels = train_data.batch(torch.randint(0, len(train_data), (32,), generator=g), "cpu")
        loss = model(ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def teacher(train_data: SplitData) -> DHTForSequenceClassification:
    """The post-LN (BERT) teacher."""
    return train_teacher(train_data)


@pytest.fixture(scope="module")
def pre_ln_teacher(train_data: SplitData) -> DHTForSequenceClassification:
    """The same teacher with pre-LN layers and a final LayerNorm (a non-zero residual init, so that every branch
    contributes and the supernet/extraction comparisons are meaningful)."""
    model = train_teacher(train_data, layer_norm="pre", residual_init_scale=0.5)
    assert hasattr(model.bert, "final_layer_norm")
    return model


@pytest.fixture(scope="module")
def mean_teacher(train_data: SplitData) -> DHTForSequenceClassification:
    """The post-LN teacher trained with classifier_pooling='mean' (no pooler)."""
    return train_teacher(train_data, classifier_pooling="mean")


@pytest.fixture(scope="module")
def pre_ln_mean_teacher(train_data: SplitData) -> DHTForSequenceClassification:
    return train_teacher(train_data, layer_norm="pre", residual_init_scale=0.5, classifier_pooling="mean")


TEACHERS = {"post-cls": "teacher", "pre-cls": "pre_ln_teacher", "post-mean": "mean_teacher",
            "pre-mean": "pre_ln_mean_teacher"}


@pytest.fixture(params=list(TEACHERS))
def any_teacher(request: pytest.FixtureRequest) -> DHTForSequenceClassification:
    """The four teachers, for the tests whose forward passes depend on where the LayerNorms sit and on what
    the classifier reads."""
    return request.getfixturevalue(TEACHERS[request.param])


def padded_batch(data: SplitData, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n samples; some are padded (so that mean pooling must skip the padding)."""
    ids, mask = data.input_ids[:n], data.attention_mask[:n]
    assert not bool(mask.bool().all()) and bool(mask.bool().any(1).all())
    return ids, mask


def random_arch(teacher: DHTForSequenceClassification, seed: int) -> nas.PrunedArch:
    """A ragged architecture: random kept dims, a layer without heads, one without FFN, heads with no Q/K dim
    (uniform attention) and heads of different widths."""
    rng = random.Random(seed)
    dh = teacher.config.hidden_size // teacher.config.num_attention_heads
    layers = []
    for i in range(teacher.config.num_hidden_layers):
        heads = [] if i == 3 else sorted(rng.sample(range(12), rng.randint(1, 12)))
        qk = [sorted(rng.sample(range(dh), rng.randint(0 if j % 3 == 0 else 1, dh))) for j in range(len(heads))]
        v = [sorted(rng.sample(range(dh), rng.randint(1, dh))) for _ in heads]
        ffn = [] if i == 5 else sorted(rng.sample(range(64), rng.randint(1, 64)))
        layers.append(nas.LayerArch(heads, qk, v, ffn))
    return nas.PrunedArch(sorted(rng.sample(range(48), 30)), layers, **nas.teacher_fields(teacher))


def count(fn) -> tuple[int, dict[str, int]]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


# ---- equation (4) -------------------------------------------------------------------------------------------


def test_cost_loss_is_zero_inside_the_band_and_pushes_towards_it():
    target, t = 100.0, 0.1

    def loss_and_grad(actual: float) -> tuple[float, float]:
        expected = torch.tensor(95.0, requires_grad=True)
        loss = nas.tas_cost_loss(expected, actual, target, t)
        if not loss.requires_grad:
            return float(loss), 0.0
        loss.backward()
        return float(loss.detach()), float(expected.grad)

    for inside in (90.0, 100.0, 110.0, 95.0):  # the band's boundaries count as inside
        assert loss_and_grad(inside) == (0.0, 0.0)
    value, grad = loss_and_grad(111.0)  # too expensive: log E, minimising it lowers E
    assert value == pytest.approx(torch.log(torch.tensor(95.0)).item()) and grad > 0
    value, grad = loss_and_grad(89.0)  # too cheap: -log E, minimising it raises E
    assert value == pytest.approx(-torch.log(torch.tensor(95.0)).item()) and grad < 0


def test_rescaled_sigmoid_passes_the_mask_gradient_to_alpha():
    alpha = torch.tensor([5.0, 0.0, -5.0], requires_grad=True)
    m = nas.rescaled_sigmoid(alpha)
    assert torch.allclose(m, torch.sigmoid(alpha.detach()))
    (m * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert alpha.grad.tolist() == [1.0, 2.0, 3.0]  # not shrunk by sigmoid'(+-5) = 0.0066


# ---- extraction and weight copying ------------------------------------------------------------------------


def test_everything_kept_gives_the_teachers_logits(any_teacher, train_data):
    teacher = any_teacher
    arch = nas.PrunedArch.full(teacher)
    assert arch.layer_norm == teacher.config.layer_norm
    assert arch.classifier_pooling == teacher.config.classifier_pooling
    pruned = nas.extract(teacher, arch)
    ids, mask = padded_batch(train_data, 16)
    with torch.no_grad():
        expected = teacher(ids, attention_mask=mask).logits
        assert torch.allclose(pruned(ids, mask), expected, atol=1e-5)
        net = nas.Supernet(teacher)  # the masked supernet with all gates 1 is the teacher too
        assert torch.allclose(net(ids, mask, net.hard_gates(arch)), expected, atol=1e-5)
    # Mean pooling: the teacher's pooler is neither run nor copied.
    pooler = teacher.bert.pooler.dense
    unused = pooler.weight.numel() + pooler.bias.numel() if teacher.config.classifier_pooling == "mean" else 0
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert sum(p.numel() for p in pruned.parameters()) == n_teacher - unused


def test_pruned_model_equals_supernet_with_the_architectures_gates(any_teacher, train_data):
    """The kept rows/columns are copied correctly and the masked LayerNorm is the pruned LayerNorm."""
    teacher = any_teacher
    arch = random_arch(teacher, 0)
    pruned = nas.extract(teacher, arch)
    net = nas.Supernet(teacher)
    ids, mask = padded_batch(train_data, 16)
    with torch.no_grad():
        expected = net(ids, mask, net.hard_gates(arch))
        logits = pruned(ids, mask)
        assert torch.allclose(logits, expected, atol=1e-5)
        # The comparison is not vacuous: the pruned architecture does change the teacher's logits.
        assert not torch.allclose(expected, teacher(ids, attention_mask=mask).logits, atol=1e-3)
        # Padding is ignored: a padded sample alone at its own length has the logits it has in the batch.
        row = int(mask.sum(1).argmin())
        length = int(mask[row].sum())
        assert length < ids.shape[1]
        assert torch.allclose(pruned(ids[row:row + 1, :length]), logits[row:row + 1], atol=1e-5)
    assert pruned.word_embeddings.weight.shape == (30, 30)
    assert pruned.layers[3].value.weight.shape == (0, 30) and pruned.layers[5].intermediate.weight.shape == (0, 30)
    pre = teacher.config.layer_norm == "pre"
    assert hasattr(pruned, "final_norm") == pre and all(layer.pre_ln == pre for layer in pruned.layers)
    e = torch.tensor(arch.embed_dims)
    if pre:
        assert torch.equal(pruned.final_norm.weight, teacher.bert.final_layer_norm.weight[e])
        assert torch.equal(pruned.final_norm.bias, teacher.bert.final_layer_norm.bias[e])
    assert pruned.arch.classifier_pooling == teacher.config.classifier_pooling
    if teacher.config.classifier_pooling == "mean":  # no pooler; the classifier reads the d_e kept dimensions
        assert not hasattr(pruned, "pooler")
        assert torch.equal(pruned.classifier.weight, teacher.classifier.weight[:, e])
    else:
        assert torch.equal(pruned.pooler.weight, teacher.bert.pooler.dense.weight[:, e])
        assert torch.equal(pruned.classifier.weight, teacher.classifier.weight)


def test_supernet_keeps_the_residual_stream_zero_outside_the_kept_dimensions(any_teacher, train_data):
    """The design rule of the module docstring, checked inside the forward: with an architecture's 0/1 gates, the
    residual stream is exactly 0 outside the kept embedding dimensions. Post-LN: every masked LayerNorm output (the
    stream after each add; its input x + f(x) is not zero there, the LayerNorm is what zeroes it). Pre-LN: the
    stream itself (every LayerNorm input but the raw embeddings) and every LayerNorm output (sub-layer inputs, the
    final LayerNorm)."""
    teacher = any_teacher
    arch = random_arch(teacher, 8)
    net = nas.Supernet(teacher)
    gates = net.hard_gates(arch)
    pruned_dims = gates["embed"] == 0
    seen: list[torch.Tensor] = []
    original = supernet_module.masked_layer_norm

    def spy(x, ln, m):
        out = original(x, ln, m)
        seen.extend([x, out])
        return out

    supernet_module.masked_layer_norm = spy
    try:
        with torch.no_grad():
            net(train_data.input_ids[:4], train_data.attention_mask[:4], gates)
    finally:
        supernet_module.masked_layer_norm = original
    pre = teacher.config.layer_norm == "pre"
    assert len(seen) == 2 * (1 + 2 * 12 + pre)  # embeddings, 2 per layer, pre-LN's final LayerNorm
    checked = seen[1:] if pre else seen[1::2]
    assert all(torch.count_nonzero(t[..., pruned_dims]) == 0 for t in checked)
    assert all(torch.count_nonzero(t[..., ~pruned_dims]) > 0 for t in checked)


def test_extract_rejects_an_architecture_of_the_other_layer_norm_or_pooling(
    teacher, pre_ln_teacher, mean_teacher
):
    with pytest.raises(ValueError, match="layer_norm"):
        nas.extract(pre_ln_teacher, nas.PrunedArch.full(teacher))
    with pytest.raises(ValueError, match="layer_norm"):
        nas.extract(teacher, nas.PrunedArch.full(pre_ln_teacher))
    with pytest.raises(ValueError, match="layer_norm"):
        nas.PrunedArch(**{**nas.PrunedArch.full(teacher).to_dict(), "layer_norm": "sandwich"})
    with pytest.raises(ValueError, match="classifier_pooling"):
        nas.extract(teacher, nas.PrunedArch.full(mean_teacher))
    with pytest.raises(ValueError, match="classifier_pooling"):
        nas.extract(mean_teacher, nas.PrunedArch.full(teacher))
    with pytest.raises(ValueError, match="classifier_pooling"):
        nas.PrunedArch(**{**nas.PrunedArch.full(teacher).to_dict(), "classifier_pooling": "max"})


def test_derive_arch_applies_the_threshold_to_dimensions_and_heads(teacher):
    net = nas.Supernet(teacher)
    alphas = net.alphas()
    alphas["heads"].zero_()
    alphas["embed"][:8] = -5.0  # sigmoid(-5) = 0.0067 < 0.01: pruned
    alphas["embed"][8:10] = -4.5  # sigmoid(-4.5) = 0.011: kept
    alphas["v"][0, 0:4] = -6.0  # head 0 of layer 0 has no value dimension left: the head goes
    alphas["heads"][1, 2] = -6.0  # 12 * softmax = 0.0037 < 0.01: head 2 of layer 1 goes
    alphas["ffn"][2] = -6.0
    arch = nas.derive_arch(alphas, net.fields)
    assert arch.embed_dims == list(range(8, 48))
    assert arch.layers[0].heads == list(range(1, 12))
    assert 2 not in arch.layers[1].heads and len(arch.layers[1].heads) == 11
    assert arch.layers[2].ffn_dims == [] and len(arch.layers[3].ffn_dims) == 64
    alphas["embed"][:] = -7.0
    assert len(nas.derive_arch(alphas, net.fields).embed_dims) == 1  # a LayerNorm needs one dimension


def test_fit_threshold_keeps_the_reports_threshold_inside_the_band_and_moves_it_outside(teacher):
    fields = nas.teacher_fields(teacher)
    full = full_model_flops(SEQ, teacher.config)
    g = torch.Generator().manual_seed(0)
    net = nas.Supernet(teacher)
    alphas = net.alphas()
    tau, arch = nas.fit_threshold(alphas, fields, 1.0 * full, 0.05, SEQ)
    assert tau == nas.KEEP_THRESHOLD and nas.pruned_flops(arch, SEQ) == full
    # Masks that did not reach 0/1 (all between 0.3 and 0.9): at 0.01 everything is kept, 0.5 is missed.
    for key in ("embed", "qk", "v", "ffn"):
        alphas[key] = torch.rand(alphas[key].shape, generator=g) * 3 - 1
    for r in (0.5, 0.3):
        tau, arch = nas.fit_threshold(alphas, fields, r * full, 0.05, SEQ)
        assert tau > nas.KEEP_THRESHOLD
        assert abs(nas.pruned_flops(arch, SEQ) / full - r) <= 0.05 * r
    # Over-pruned masks (most below 0.01): the threshold goes down until the band is reached.
    for key in ("embed", "qk", "v", "ffn"):
        alphas[key] = torch.rand(alphas[key].shape, generator=g) * 4 - 8
    tau, arch = nas.fit_threshold(alphas, fields, 0.5 * full, 0.05, SEQ)
    assert tau < nas.KEEP_THRESHOLD
    assert abs(nas.pruned_flops(arch, SEQ) / full - 0.5) <= 0.05 * 0.5


# ---- FLOPs ------------------------------------------------------------------------------------------------


def test_pruned_flops_match_flop_counter_and_the_teachers_count(any_teacher, train_data):
    """LayerNorms count 0 in this project (dht/flops.py) and FlopCounterMode does not count them either, so
    the pre-LN model's extra final LayerNorm changes nothing. Mean pooling runs no pooler and its mean is no
    matmul: the count has no pooler term and the classifier reads d_e inputs (FlopCounterMode agrees)."""
    teacher = any_teacher
    full_arch = nas.PrunedArch.full(teacher)
    mean = teacher.config.classifier_pooling == "mean"
    d, labels = teacher.config.hidden_size, teacher.config.num_labels
    for convention in ("full", "linear"):
        if not mean:
            assert nas.pruned_flops(full_arch, SEQ, convention) == full_model_flops(
                SEQ, teacher.config, convention)
        for arch in (full_arch, random_arch(teacher, 1)):
            as_cls = nas.pruned_flops(dataclasses.replace(arch, classifier_pooling="cls"), SEQ, convention)
            de = arch.embed_width
            head = 2 * de * labels if mean else 2 * de * d + 2 * d * labels
            assert nas.pruned_flops(arch, SEQ, convention) == as_cls - (2 * de * d + 2 * d * labels) + head
    ids = train_data.input_ids[:8]  # no attention mask: every sample is SEQ tokens
    for arch in (full_arch, random_arch(teacher, 1), random_arch(teacher, 2)):
        pruned = nas.extract(teacher, arch)
        with torch.no_grad():
            total, per_op = count(lambda p=pruned: p(ids))
        assert abs(total - 8 * nas.pruned_flops(arch, SEQ, "full")) <= 0.01 * total
        linear = sum(n for op, n in per_op.items() if op in LINEAR_OPS)
        assert linear == 8 * nas.pruned_flops(arch, SEQ, "linear")


@pytest.mark.parametrize("name", ["teacher", "mean_teacher"])
def test_expected_flops_of_binary_gates_are_the_architectures_flops(name, request):
    teacher = request.getfixturevalue(name)
    net = nas.Supernet(teacher)
    arch = random_arch(teacher, 3)
    for convention in ("full", "linear"):
        expected = float(net.expected_flops(SEQ, convention, net.hard_gates(arch)))
        assert expected == pytest.approx(nas.pruned_flops(arch, SEQ, convention))


# ---- search -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_search_reaches_the_target_and_keeps_everything_at_ratio_one(teacher, train_data):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    half = nas.search(teacher, train_data, 0.5, lambda_cost=1.0, tolerance=0.05, epochs=8, lr_weights=1e-4,
                      lr_arch=0.5, batch_size=16, device="cpu", seed=0, seq_len=SEQ)
    assert half.within_tolerance and abs(half.flop_ratio - 0.5) <= 0.05 * 0.5
    assert abs(half.expected_flop_ratio - 0.5) <= 0.1  # E_cost settled near R (the masks are not all 0/1)
    assert half.history[0]["cost_loss"] > 0 and half.history[-1]["expected_flop_ratio"] < 0.65
    assert len(half.history) == 8 and half.train_flops > 0
    assert nas.pruned_flops(half.arch, SEQ) == pytest.approx(half.flop_ratio * half.full_flops)
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before[name]), f"search modified the teacher's {name}"

    whole = nas.search(teacher, train_data, 1.0, lambda_cost=1.0, tolerance=0.05, epochs=2, lr_weights=1e-4,
                       lr_arch=0.5, batch_size=16, device="cpu", seed=0, seq_len=SEQ)
    assert whole.threshold == nas.KEEP_THRESHOLD and whole.flop_ratio >= 0.97
    assert whole.arch.embed_width == 48 and all(h == 12 for h in whole.arch.heads_per_layer())
    assert all(entry["cost_loss"] == 0.0 for entry in whole.history)  # F_cost inside the band throughout


# ---- fine-tuning, inference, save/load --------------------------------------------------------------------


def test_distillation_loss_decreases_and_the_teacher_is_untouched(any_teacher, train_data):
    teacher = any_teacher
    pruned = nas.extract(teacher, random_arch(teacher, 4))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = nas.finetune(pruned, teacher, train_data, epochs=3, lr=3e-3, temperature=2.0, alpha_kd=0.5,
                       batch_size=32, device="cpu", seed=0, seq_len=SEQ)
    loss, kd = out["loss_per_epoch"], out["kd_per_epoch"]
    assert len(loss) == 3 and loss[-1] < loss[0] and kd[-1] < kd[0]
    per_sample = full_model_flops(SEQ, teacher.config) + 3 * nas.pruned_flops(pruned.arch, SEQ)
    assert out["train_flops"] == 3 * len(train_data) * per_sample
    assert not pruned.training and not teacher.training
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_save_load_round_trip(any_teacher, train_data, tmp_path):
    teacher = any_teacher
    pruned = nas.extract(teacher, random_arch(teacher, 5))
    pruned.save(tmp_path / "model")
    loaded = nas.PrunedBert.load(tmp_path / "model")
    assert not loaded.training
    assert loaded.arch == pruned.arch and loaded.arch.layer_norm == teacher.config.layer_norm
    assert loaded.arch.classifier_pooling == teacher.config.classifier_pooling
    for (name, a), (name_b, b) in zip(pruned.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == name_b and torch.equal(a, b)
    ids, mask = train_data.input_ids[:16], train_data.attention_mask[:16]
    with torch.no_grad():
        assert torch.equal(pruned(ids, mask), loaded(ids, mask))

    net = nas.Supernet(teacher, generator=torch.Generator().manual_seed(0))
    result = nas.SearchResult(net.alphas(), pruned.arch, 0.01, [{"epoch": 1, "ce": 0.5}], 1.0, 2.0, 1.0, 0.9,
                              0.5, True, {"seed": 0})
    result.save(tmp_path / "search")
    again = nas.SearchResult.load(tmp_path / "search")
    assert again.arch == result.arch and again.history == result.history
    assert all(torch.equal(again.alphas[k], result.alphas[k]) for k in result.alphas)


def test_post_ln_models_saved_without_the_layer_norm_field_still_load(teacher, train_data, tmp_path):
    """Architectures written before ``PrunedArch.layer_norm`` and ``classifier_pooling`` existed are post-LN
    with the [CLS] pooler and load as such."""
    pruned = nas.extract(teacher, random_arch(teacher, 9))
    pruned.save(tmp_path)
    data = json.loads((tmp_path / nas.ARCH_FILE).read_text())
    del data["layer_norm"], data["classifier_pooling"]
    (tmp_path / nas.ARCH_FILE).write_text(json.dumps(data))
    loaded = nas.PrunedBert.load(tmp_path)
    assert loaded.arch.layer_norm == "post" and loaded.arch.classifier_pooling == "cls"
    assert loaded.arch == pruned.arch
    ids, mask = train_data.input_ids[:8], train_data.attention_mask[:8]
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), pruned(ids, mask))


def test_predictions_feed_the_pipelines_metrics(any_teacher, train_data):
    teacher = any_teacher
    arch = random_arch(teacher, 6)
    pruned = nas.extract(teacher, arch)
    test = make_data(40, 7)
    pred = nas.predict_pruned(pruned, test, "cpu", batch_size=16, seq_len=SEQ)
    with torch.no_grad():
        logits = pruned(test.input_ids, test.attention_mask)
    assert torch.allclose(pred.probs, logits.softmax(-1), atol=1e-6)
    assert torch.equal(pred.labels, logits.argmax(-1))
    assert pred.heads.shape == (40, 12) and pred.heads[0].tolist() == arch.heads_per_layer()
    assert pred.layers.tolist() == [12] * 40
    metrics = evaluate(pred, test, teacher.config, SEQ, None)
    ratio = nas.pruned_flops(arch, SEQ) / full_model_flops(SEQ, teacher.config)
    assert metrics["infer_flop_ratio"] == pytest.approx(ratio)
    assert metrics["infer_flop_ratio_linear"] == pytest.approx(
        nas.pruned_flops(arch, SEQ, "linear") / full_model_flops(SEQ, teacher.config, "linear"))


def test_search_extract_finetune_predict_end_to_end(any_teacher, train_data, tmp_path):
    """The whole baseline (as workflow/scripts/baseline.py runs it) on a post- and a pre-LN teacher: a short
    search, extraction, distillation, save/load, predictions and metrics."""
    teacher = any_teacher
    result = nas.search(teacher, train_data, 0.5, lambda_cost=1.0, tolerance=0.05, epochs=1, lr_weights=1e-4,
                        lr_arch=0.5, batch_size=32, device="cpu", seed=0, seq_len=SEQ)
    assert result.arch.layer_norm == teacher.config.layer_norm
    assert result.arch.classifier_pooling == teacher.config.classifier_pooling
    assert result.within_tolerance  # fit_threshold enters the band even after one epoch
    pruned = nas.extract(teacher, result.arch)
    net = nas.Supernet(teacher)
    ids, mask = train_data.input_ids[:8], train_data.attention_mask[:8]
    with torch.no_grad():  # the searched architecture too: extracted model = supernet with its 0/1 gates
        assert torch.allclose(pruned(ids, mask), net(ids, mask, net.hard_gates(result.arch)), atol=1e-5)
    out = nas.finetune(pruned, teacher, train_data, epochs=1, lr=3e-3, temperature=2.0, alpha_kd=0.5,
                       batch_size=32, device="cpu", seed=0, seq_len=SEQ)
    assert len(out["loss_per_epoch"]) == 1 and out["train_flops"] > 0
    pruned.save(tmp_path)
    loaded = nas.PrunedBert.load(tmp_path)
    test = make_data(24, 11)
    pred = nas.predict_pruned(loaded, test, "cpu", batch_size=16, seq_len=SEQ)
    with torch.no_grad():
        assert torch.allclose(pred.probs, pruned(test.input_ids, test.attention_mask).softmax(-1), atol=1e-6)
    metrics = evaluate(pred, test, teacher.config, SEQ, None)
    assert metrics["infer_flop_ratio"] == pytest.approx(result.flop_ratio)
