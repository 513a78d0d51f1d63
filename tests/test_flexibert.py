"""Tests for the FlexiBERT/BOSHNAS baseline (dht/baselines/flexibert): design space, ops and padding, FLOPs against
FlopCounterMode, persistence, embedding, surrogate, weight inheritance, training and the search."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dht.baselines.flexibert import (
    OPS,
    ArchEmbedder,
    Architecture,
    FlexiBertForSequenceClassification,
    HeteroscedasticEnsemble,
    LayerSpec,
    SpaceConfig,
    TrainingEvaluator,
    best_under_budget,
    embedding_distance,
    enumerate_space,
    flop_ratio,
    inherit_weights,
    inheritance_overlap,
    mixer_flops,
    model_flops,
    neighbours,
    pareto_front,
    sample,
    sample_unique,
    search,
    train_and_evaluate,
    within_budget,
)
from dht.baselines.flexibert.model import CONFIG_FILE, WEIGHTS_FILE, build_mixer, dct_matrix, dft_matrices
from dht.flops import FlopShape, forward_flops, full_model_flops

SMALL = SpaceConfig(hidden=(16, 32), heads=(2, 4), ffn_widths=(32, 64), layers=(2, 4))
# Every family, a hidden-size change (projection), a 2-layer FFN stack and a 4-group convolution.
MIXED = Architecture((
    LayerSpec("wma", 2, 32, (64,)),
    LayerSpec("dft", 1, 16, (32, 32)),
    LayerSpec("conv9", 4, 16, (32,)),
    LayerSpec("dct", 1, 32, (64,)),
    LayerSpec("sdp", 4, 32, (64,)),
))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _padded_batch(vocab: int = 50, n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, n), generator=gen)
    mask = torch.ones(3, n, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids * mask, mask


# --- design space -----------------------------------------------------------------------------------------------


def test_architecture_roundtrip_and_validation():
    assert Architecture.from_dict(json.loads(json.dumps(MIXED.to_dict()))) == MIXED
    assert Architecture.from_id(MIXED.id) == MIXED
    assert MIXED.id == "wma.2.32.64_dft.1.16.32-32_conv9.4.16.32_dct.1.32.64_sdp.4.32.64"
    assert MIXED.hidden_sizes == (32, 16, 16, 32, 32) and not MIXED.is_homogeneous
    # Linear transforms have no heads: any value is stored as 1, so equal layers are equal.
    assert LayerSpec("dct", 4, 32, (64,)) == LayerSpec("dct", 1, 32, (64,))
    with pytest.raises(ValueError, match="divisible"):
        LayerSpec("sdp", 3, 32, (64,))
    with pytest.raises(ValueError, match="unknown op"):
        LayerSpec("lstm", 2, 32, (64,))
    with pytest.raises(ValueError, match="feed-forward"):
        LayerSpec("sdp", 2, 32, ())
    with pytest.raises(ValueError, match="at least one"):
        Architecture(())


def test_space_defaults_size_enumeration_and_sampling():
    tiny = SpaceConfig()
    assert (tiny.hidden, tiny.layers, tiny.heads, tiny.ffn_widths, tiny.ffn_depths) == (
        (128, 256), (2, 4), (2, 4), (512, 1024), (1, 2))
    assert tiny.ops == OPS
    # 2 hidden x (5 headed ops x 2 heads + 2 linear) x (2 widths x 2 depths) layer choices.
    assert len(tiny.layer_choices()) == 96 and tiny.size() == 96**2 + 96**4
    with pytest.raises(ValueError, match="sample"):
        enumerate_space(tiny)
    assert SpaceConfig.paper_tiny().ffn_depths == (1, 3) and "conv13" not in SpaceConfig.paper_tiny().ops

    space = SpaceConfig(hidden=(16, 32), heads=(2,), ffn_widths=(32,), ffn_depths=(1, 2), layers=(1, 2),
                        ops=("sdp", "dct", "conv5"))
    archs = enumerate_space(space)
    assert len(archs) == space.size() == 12 + 12**2
    assert len({a.id for a in archs}) == len(archs) and all(space.contains(a) for a in archs)
    rng = np.random.default_rng(0)
    drawn = sample_unique(space, 50, rng)
    assert len({a.id for a in drawn}) == 50 and all(space.contains(a) for a in drawn)

    stacked = dataclasses.replace(space, layers=(2, 4), layers_per_stack=2)
    for a in enumerate_space(stacked):
        assert a.layers[0::2] == a.layers[1::2]  # tied stacks
    assert stacked.size() == 12 + 12**2
    assert SpaceConfig.from_dict(space.to_dict()) == space


def test_neighbours_differ_by_one_attribute():
    arch = sample(SMALL, np.random.default_rng(3))
    nbrs = neighbours(arch, SMALL)
    assert nbrs and all(SMALL.contains(n) and n != arch for n in nbrs)
    for n in nbrs:
        if n.num_layers != arch.num_layers:
            continue
        changed = [(a, b) for a, b in zip(arch.layers, n.layers, strict=True) if a != b]
        assert len(changed) == 1
        a, b = changed[0]
        diffs = [(a.op, a.heads) != (b.op, b.heads), a.hidden != b.hidden, a.ffn != b.ffn]
        assert sum(diffs) == 1, (a, b)


# --- model: ops, padding, persistence ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_mixer_shape_and_padding(op):
    torch.manual_seed(0)
    mixer = build_mixer(LayerSpec(op, 4, 32, (64,)), attention_dropout=0.0).eval()
    x = torch.randn(3, 12, 32)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 7:] = False
    y = mixer(x, mask)
    assert y.shape == (3, 12, 32) and torch.isfinite(y).all()
    # Padded positions contribute nothing: new content there changes no real position's output.
    x_pad = x.clone()
    x_pad[1, 7:] = 100 * torch.randn(5, 32)
    y_pad = mixer(x_pad, mask)
    assert torch.allclose(y_pad[1, :7], y[1, :7], atol=1e-5)
    assert torch.equal(y_pad[0], y[0])
    # ... while a real token does reach the other real positions (the op mixes tokens at all).
    x_real = x.clone()
    x_real[1, 5] = 100 * torch.randn(32)
    assert not torch.allclose(mixer(x_real, mask)[1, 3], y[1, 3], atol=1e-3)


def test_dft_and_dct_matrices_are_the_transforms():
    n = 7
    c, s = dft_matrices(n, dtype=torch.float64)
    reference = torch.fft.fft(torch.eye(n, dtype=torch.float64), dim=0) / n**0.5
    assert torch.allclose(torch.complex(c, -s), reference, atol=1e-6)
    x = torch.randn(1, n, 5, dtype=torch.float64)
    cd, sd = dft_matrices(5, dtype=torch.float64)
    two_d = (c @ x) @ cd - (s @ x) @ sd
    assert torch.allclose(two_d, torch.fft.fft2(x).real / (n * 5) ** 0.5, atol=1e-5)
    dct = dct_matrix(n, dtype=torch.float64)
    assert torch.allclose(dct @ dct.T, torch.eye(n, dtype=torch.float64), atol=1e-6)
    scipy_fft = pytest.importorskip("scipy.fft")
    ref = scipy_fft.dct(np.eye(n), type=2, norm="ortho", axis=0)
    assert np.allclose(dct.numpy(), ref, atol=1e-6)


def test_model_forward_loss_and_padding_invariance():
    torch.manual_seed(0)
    model = FlexiBertForSequenceClassification.build(MIXED, vocab_size=50, num_labels=3, max_len=16).eval()
    ids, mask = _padded_batch()
    out = model(ids, mask, labels=torch.tensor([0, 1, 2]))
    assert out.logits.shape == (3, 3) and out.loss is not None and out.loss.ndim == 0
    assert model(ids, mask).loss is None
    other = ids.clone()
    other[mask == 0] = 7  # different tokens in the padding only
    assert torch.allclose(model(other, mask).logits, out.logits, atol=1e-5)
    other[1, 2] = 8  # a real token changes its own sample only
    changed = model(other, mask).logits
    assert not torch.allclose(changed[1], out.logits[1], atol=1e-4)
    assert torch.allclose(changed[0], out.logits[0], atol=1e-6)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 17, dtype=torch.long))
    # Projections exist exactly where the hidden size changes.
    assert [layer.proj is not None for layer in model.layers] == [True, False, True, False, False]


def test_save_pretrained_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = FlexiBertForSequenceClassification.build(MIXED, vocab_size=50, num_labels=3, max_len=16).eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / WEIGHTS_FILE).is_file()
    saved = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert saved["arch_id"] == MIXED.id and saved["num_labels"] == 3
    loaded = FlexiBertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert loaded.arch == MIXED and loaded.config == model.config
    ids, mask = _padded_batch()
    assert torch.equal(loaded(ids, mask).logits, model(ids, mask).logits)


# --- FLOPs ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("heads", [2, 4])
def test_mixer_flops_equal_flop_counter(op, heads):
    mixer = build_mixer(LayerSpec(op, heads, 32, (64,)), attention_dropout=0.0).eval()
    x, mask = torch.randn(2, 12, 32), torch.ones(2, 12, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        mixer(x, mask)
    assert counter.get_total_flops() == 2 * mixer_flops(op, 12, 32, heads)


def test_model_flops_equal_flop_counter_and_linear_convention():
    torch.manual_seed(0)
    model = FlexiBertForSequenceClassification.build(MIXED, vocab_size=50, num_labels=3, max_len=16).eval()
    ids, mask = _padded_batch()
    with FlopCounterMode(display=False) as counter:
        model(ids, mask)
    assert counter.get_total_flops() == 3 * model_flops(MIXED, 12, num_labels=3)

    linear_flops = []  # what the nn.Linear layers really computed, from their inputs and outputs

    def hook(module, inputs, output):
        linear_flops.append(2 * inputs[0].numel() // inputs[0].shape[-1] * module.in_features * module.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    model(ids, mask)
    for h in handles:
        h.remove()
    assert sum(linear_flops) == 3 * model_flops(MIXED, 12, num_labels=3, convention="linear")
    assert model_flops(MIXED, 12, 3, convention="linear") < model_flops(MIXED, 12, 3)


def test_flop_ratio_against_dht_reference_and_budget():
    reference = FlopShape(hidden_size=96, intermediate_size=384, num_attention_heads=12, num_hidden_layers=12,
                          num_labels=2)
    bert = Architecture.homogeneous(12, "sdp", 12, 96, (384,))  # 12-VaBERT itself, written as a FlexiBERT
    assert flop_ratio(bert, 48, reference) == 1.0
    # A 6-layer BERT costs what dht.flops says DHT's arm 6L12H costs (one classifier, so just above 0.5).
    six = flop_ratio(Architecture.homogeneous(6, "sdp", 12, 96, (384,)), 48, reference)
    assert six == forward_flops(48, [12] * 6, reference) / full_model_flops(48, reference)
    assert model_flops(Architecture.homogeneous(6, "sdp", 12, 96, (384,)), 48) == forward_flops(48, [12] * 6, reference)
    archs = sample_unique(SpaceConfig(), 60, np.random.default_rng(0))
    ratios = np.array([flop_ratio(a, 48, reference) for a in archs])
    kept = within_budget(archs, 48, max_ratio=0.5, reference=reference)
    assert 0 < len(kept) < len(archs)
    assert {a.id for a in kept} == {a.id for a, r in zip(archs, ratios, strict=True) if r <= 0.5}


# --- embedding and surrogate ----------------------------------------------------------------------------------------


def test_embedding_distance_zero_iff_identical_and_neighbours_closer():
    embedder = ArchEmbedder.for_space(SMALL)
    rng = np.random.default_rng(0)
    archs = sample_unique(SMALL, 150, rng)
    X = embedder.embed_many(archs)
    assert X.shape == (150, embedder.dim) and X.min() >= 0 and X.max() <= 1
    d = np.linalg.norm(X[:, None] - X[None], axis=-1)
    off_diagonal = d[~np.eye(len(archs), dtype=bool)]
    assert off_diagonal.min() > 0  # distinct architectures never collide
    assert embedding_distance(embedder, archs[0], Architecture.from_id(archs[0].id)) == 0.0
    near, far = [], []
    for i, a in enumerate(archs[:40]):
        nbrs = neighbours(a, SMALL)
        near.append(np.mean([embedding_distance(embedder, a, n) for n in nbrs]))
        far.append(np.mean(d[i, rng.choice(len(archs), 10, replace=False)]))
    assert np.mean(near) < 0.5 * np.mean(far)
    # Same-family edits (SDP -> WMA) are closer than cross-family ones (SDP -> DFT).
    base = Architecture.homogeneous(2, "sdp", 2, 16, (32,))
    wma = Architecture((LayerSpec("wma", 2, 16, (32,)), base.layers[1]))
    dft = Architecture((LayerSpec("dft", 1, 16, (32,)), base.layers[1]))
    assert embedding_distance(embedder, base, wma) < embedding_distance(embedder, base, dft)


def test_surrogate_fits_and_is_less_uncertain_near_data():
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, size=(30, 6)).astype(np.float32)
    y = 0.6 + 0.2 * X[:, 0] - 0.1 * X[:, 1] + rng.normal(0, 0.005, 30)
    model = HeteroscedasticEnsemble(seed=0).fit(X, y)
    at_data = model.predict(X)
    assert np.abs(at_data.mean - y).mean() < 0.02
    far = model.predict(X + 4.0)
    assert far.epistemic.mean() > 10 * at_data.epistemic.mean()
    assert far.total.mean() > at_data.total.mean()
    again = HeteroscedasticEnsemble(seed=0).fit(X, y).predict(X)
    assert np.array_equal(again.mean, at_data.mean)  # seeded: reproducible


# --- weight inheritance and training ------------------------------------------------------------------------------


def test_inherit_weights_copies_exactly_matching_tensors():
    parent_arch = Architecture((LayerSpec("sdp", 2, 32, (64,)), LayerSpec("sdp", 2, 32, (64,))))
    child_arch = Architecture((LayerSpec("wma", 2, 32, (64,)), LayerSpec("conv5", 2, 32, (64, 64))))
    torch.manual_seed(0)
    parent = FlexiBertForSequenceClassification.build(parent_arch, 50, 2, 16)
    torch.manual_seed(1)
    child = FlexiBertForSequenceClassification.build(child_arch, 50, 2, 16)
    before = {k: v.clone() for k, v in child.state_dict().items()}
    p_state = parent.state_dict()
    expected = {k for k, v in before.items() if k in p_state and p_state[k].shape == v.shape}
    copied = inherit_weights(child, parent)
    assert set(copied) == expected
    assert "layers.0.attention.query.weight" in expected  # SDP -> WMA keeps Q/K/V/O
    assert "layers.0.attention.bilinear" not in expected and "layers.1.conv.value.weight" not in expected
    assert "layers.1.ffn.0.weight" in expected and "layers.1.ffn.1.weight" not in expected  # 64x64 vs 32x64
    after = child.state_dict()
    for k in before:
        assert torch.equal(after[k], p_state[k] if k in expected else before[k]), k
    overlap = inheritance_overlap(child_arch, parent_arch, vocab_size=50, num_labels=2, max_len=16)
    n_copied = sum(before[k].numel() for k in expected)
    assert overlap == pytest.approx(n_copied / sum(v.numel() for v in before.values()))


def _toy_split(n: int, seed: int, length: int = 12) -> dict[str, np.ndarray]:
    """Class 1 iff token 3 occurs among the real tokens; [CLS] = 2, padding = 0."""
    r = np.random.default_rng(seed)
    ids = r.integers(5, 30, size=(n, length))
    ids[:, 0] = 2
    lengths = r.integers(6, length + 1, size=n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    label = r.integers(0, 2, size=n)
    pos = r.integers(1, lengths)
    ids[label == 1, pos[label == 1]] = 3
    return {"input_ids": np.where(mask == 1, ids, 0).astype(np.int64), "attention_mask": mask, "label": label}


def test_train_and_evaluate_learns_and_inheritance_transfers():
    train, val = _toy_split(256, 0), _toy_split(128, 1)
    arch = Architecture.homogeneous(1, "sdp", 2, 16, (32,))
    kwargs = dict(vocab_size=32, num_labels=2, dropout=0.0, batch_size=32, seed=0)
    trained = train_and_evaluate(arch, train, val, epochs=8, lr=1e-2, **kwargs)
    assert trained.accuracy >= 0.9 and trained.steps == 64
    # One near-zero-lr step: a fresh model stays at chance, an inheriting one keeps the parent's accuracy.
    scratch = train_and_evaluate(arch, train, val, max_steps=1, lr=1e-8, **kwargs)
    inherited = train_and_evaluate(arch, train, val, max_steps=1, lr=1e-8, inherit_from=trained.model, **kwargs)
    assert scratch.accuracy < 0.75 <= inherited.accuracy
    assert len(inherited.inherited) == len(trained.model.state_dict())


def test_training_evaluator_in_search_passes_parents():
    train, val = _toy_split(64, 0), _toy_split(32, 1)
    space = SpaceConfig(hidden=(16,), heads=(2,), ffn_widths=(16, 32), ffn_depths=(1,), layers=(1, 2),
                        ops=("sdp", "dct", "conv5"))
    evaluator = TrainingEvaluator(train, val, max_steps=2, batch_size=32, vocab_size=32, num_labels=2)
    trace = search(enumerate_space(space), evaluator, budget=4, n_init=2, rng=np.random.default_rng(0),
                   surrogate_factory=lambda s: HeteroscedasticEnsemble(epochs=50, seed=s))
    assert [e["parent_id"] is None for e in trace] == [True, True, False, False]
    for e in trace[2:]:
        assert evaluator.results[e["arch_id"]]["parent_id"] == e["parent_id"]
        assert evaluator.results[e["arch_id"]]["inherited"] > 0
    assert evaluator.model(trace[0]["arch_id"]).arch.id == trace[0]["arch_id"]


# --- search ---------------------------------------------------------------------------------------------------------

_OP_SCORE = {"sdp": 0.6, "wma": 0.7, "dft": 0.0, "dct": 0.1, "conv5": 0.3, "conv9": 0.4, "conv13": 0.5}


def _synthetic_accuracy(arch: Architecture) -> float:
    per_layer = [_OP_SCORE[x.op] * (1 + 0.3 * (x.hidden == 32)) + 0.1 * x.heads / 4 + 0.1 * (x.ffn[0] == 64)
                 + 0.05 * len(x.ffn) for x in arch.layers]
    return float(np.mean(per_layer) + 0.1 * (arch.num_layers == 4))


def test_search_beats_random_on_a_synthetic_problem():
    candidates = sample_unique(SMALL, 300, np.random.default_rng(0))
    true = np.array([_synthetic_accuracy(a) for a in candidates])
    reference = FlopShape(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=12,
                          num_labels=2)
    search_pct, random_pct = [], []
    for seed in range(3):
        noise = np.random.default_rng(100 + seed)
        trace = search(candidates, lambda a, p, noise=noise: _synthetic_accuracy(a) + noise.normal(0, 0.01),
                       budget=16, n_init=4, rng=np.random.default_rng(seed), seq_len=12, reference=reference,
                       surrogate_factory=lambda s: HeteroscedasticEnsemble(epochs=200, seed=s))
        assert len(trace) == 16 and len({e["arch_id"] for e in trace}) == 16
        assert [e["method"] for e in trace[:4]] == ["init"] * 4
        assert all(e["predicted_mean"] is not None and e["epistemic"] >= 0 for e in trace[4:])
        assert all(e["flop_ratio"] == pytest.approx(flop_ratio(Architecture.from_dict(e["arch"]), 12, reference))
                   for e in trace)
        best = _synthetic_accuracy(Architecture.from_dict(max(trace, key=lambda e: e["accuracy"])["arch"]))
        picks = np.random.default_rng(seed).choice(len(candidates), 16, replace=False)
        search_pct.append((true < best).mean())
        random_pct.append((true < true[picks].max()).mean())
    assert min(search_pct) >= 0.95  # top 5% of the candidates every time (the median is 0.5)
    assert np.mean(search_pct) > np.mean(random_pct)


def test_best_under_budget_and_pareto_front():
    trace = [
        {"arch_id": "a", "accuracy": 0.70, "flops": 10, "flop_ratio": 0.1},
        {"arch_id": "b", "accuracy": 0.80, "flops": 30, "flop_ratio": 0.3},
        {"arch_id": "c", "accuracy": 0.75, "flops": 20, "flop_ratio": 0.2},
        {"arch_id": "d", "accuracy": 0.78, "flops": 40, "flop_ratio": 0.4},
        {"arch_id": "e", "accuracy": 0.90, "flops": 60, "flop_ratio": 0.6},
    ]
    assert best_under_budget(trace, 0.25)["arch_id"] == "c"
    assert best_under_budget(trace, 0.5)["arch_id"] == "b"
    assert best_under_budget(trace, 0.05) is None
    assert [e["arch_id"] for e in pareto_front(trace)] == ["a", "c", "b", "e"]
