"""Tests for dht.baselines.fastbert: FastBERT (BL3) self-distillation, adaptive inference and its FLOP count."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dht.baselines.fastbert import (
    FastBERT,
    FastBERTClassifier,
    classifier_flops,
    distill,
    distill_flops_per_sample,
    exit_flops,
    normalized_entropy,
    predict_fastbert,
)
from dht.evaluation import SplitData, evaluate
from dht.flops import FlopShape, forward_flops, full_model_flops
from dht.model import DHTConfig, DHTForSequenceClassification

SEQ = 12
LABELS = 3
TINY = dict(
    vocab_size=40,
    hidden_size=48,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=64,
    max_position_embeddings=16,
    num_labels=LABELS,
    attn_implementation="eager",  # FlopCounterMode counts the attention matmuls (bmm) of eager attention
)
LINEAR_OPS = {"aten.addmm", "aten.mm"}
CPU = torch.device("cpu")
EPOCHS = 5


def make_data(n: int, seed: int, padded: bool = True) -> SplitData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (n, SEQ), generator=g)
    lengths = torch.randint(3, SEQ + 1, (n,), generator=g) if padded else torch.full((n,), SEQ)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0 after each sample's length (right padding)
    return SplitData(ids, mask, torch.randint(0, LABELS, (n,), generator=g))


def make_teacher(seed: int = 0) -> DHTForSequenceClassification:
    torch.manual_seed(seed)
    teacher = DHTForSequenceClassification(DHTConfig(**TINY)).eval()
    with torch.no_grad():  # a random but opinionated teacher: entropies spread over (0, 1)
        teacher.classifier.weight.normal_(0.0, 1.5)
    return teacher


@pytest.fixture(scope="module")
def distilled() -> dict:
    teacher = make_teacher()
    before = copy.deepcopy(teacher.state_dict())
    torch.manual_seed(1)
    fastbert = FastBERT(teacher)
    train = make_data(96, seed=2)
    seen: list[tuple[int, float]] = []
    result = distill(fastbert, train, epochs=EPOCHS, lr=5e-3, batch_size=16, device=CPU, seed=3,
                     on_epoch=lambda e, kl: seen.append((e, kl)))
    return {"fastbert": fastbert, "teacher": teacher, "before": before, "result": result, "seen": seen,
            "train": train, "test": make_data(40, seed=4)}


def count(fn) -> tuple[int, int]:
    """(total FLOPs, Linear FLOPs = mm + addmm) that FlopCounterMode sees while running ``fn``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    per_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), sum(n for op, n in per_op.items() if op in LINEAR_OPS)


# ---- the student classifier ------------------------------------------------------------------------------------


def test_classifier_shape_and_padding_mask():
    torch.manual_seed(0)
    cla = FastBERTClassifier(48, LABELS).eval()
    x = torch.randn(2, SEQ, 48)
    keep = torch.ones(2, SEQ, dtype=torch.bool)
    keep[1, 7:] = False
    out = cla(x, keep)
    assert out.shape == (2, LABELS)
    # Changing padded positions does not change the output; the unpadded sample equals a run without mask.
    y = x.clone()
    y[1, 7:] = 100.0
    torch.testing.assert_close(cla(y, keep), out)
    torch.testing.assert_close(cla(x[:1], None), out[:1])
    torch.testing.assert_close(cla(x[1:, :7], None), out[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, SEQ])
def test_classifier_flops_match_flop_counter(n):
    torch.manual_seed(0)
    cla = FastBERTClassifier(48, LABELS).eval()
    x = torch.randn(1, n, 48)
    with torch.no_grad():
        total, linear = count(lambda: cla(x))
    assert total == classifier_flops(n, 48, LABELS, "full")
    assert linear == classifier_flops(n, 48, LABELS, "linear")


def test_bert_base_teacher_with_fastbert_classifier_matches_published_flops():
    """FastBERT (Liu et al. 2020, Table 1 / Section 4) quotes 21,785M FLOPs for its BERT-base teacher at n = 128
    (thop: Linear layers only): 12 layers (21,743M) + one FastBERT classifier (42.0M)."""
    bert_base = FlopShape(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                          num_labels=2)
    layers = forward_flops(128, [12] * 12, bert_base, "linear", include_classifier=False)
    total = layers + classifier_flops(128, 768, 2, "linear")
    assert abs(total - 21_785e6) / 21_785e6 < 1e-4
    # Reaching layer 12 costs 12-VaBERT plus 11 students (~2.5% more, "full" convention).
    ratio = exit_flops(12, 128, bert_base, "full") / full_model_flops(128, bert_base, "full")
    assert 1.02 < ratio < 1.03


def test_normalized_entropy_bounds():
    p = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(normalized_entropy(p), torch.tensor([0.0, 1.0, 0.6309297535714575], dtype=torch.float64))


# ---- self-distillation -----------------------------------------------------------------------------------------


def test_distillation_kl_decreases(distilled):
    kl = distilled["result"]["epoch_kl"]
    assert len(kl) == EPOCHS and all(k >= 0 for k in kl)
    assert all(a > b for a, b in zip(kl, kl[1:], strict=False)), kl
    assert kl[-1] < kl[0] * 0.5, kl
    assert [e for e, _ in distilled["seen"]] == list(range(1, EPOCHS + 1))
    assert [v for _, v in distilled["seen"]] == kl
    result, conf = distilled["result"], distilled["teacher"].config
    per_sample = distill_flops_per_sample(SEQ, conf)
    assert per_sample == full_model_flops(SEQ, conf, "full") + 3 * 11 * classifier_flops(SEQ, 48, LABELS, "full")
    assert result["train_flops"] == per_sample * 96 * EPOCHS
    assert result["steps"] == 6 * EPOCHS and result["samples"] == 96 * EPOCHS


def test_backbone_and_teacher_unchanged(distilled):
    after = distilled["teacher"].state_dict()
    assert after.keys() == distilled["before"].keys()
    for name, value in distilled["before"].items():
        assert torch.equal(after[name], value), name
    assert all(p.grad is None for p in distilled["teacher"].parameters())


def test_distill_is_seeded():
    """Same seed, same students; the global RNG is left as it was."""
    train = make_data(32, seed=5)
    states = []
    for _ in range(2):
        torch.manual_seed(7)
        fb = FastBERT(make_teacher())
        rng = torch.get_rng_state()
        distill(fb, train, epochs=1, lr=1e-3, batch_size=16, device=CPU, seed=11)
        assert torch.equal(torch.get_rng_state(), rng)
        states.append(fb.students.state_dict())
    for name, value in states[0].items():
        assert torch.equal(states[1][name], value), name


# ---- adaptive inference ----------------------------------------------------------------------------------------


def test_speed_zero_is_the_teacher(distilled):
    fb, test = distilled["fastbert"], distilled["test"]
    pred = predict_fastbert(fb, test, speed=0.0, device=CPU, batch_size=8, seq_len=SEQ)
    assert (pred.layers == 12).all()
    assert (pred.heads == 12).all()
    with torch.no_grad():
        logits = distilled["teacher"](test.input_ids, test.attention_mask).logits
    assert torch.equal(pred.labels, logits.argmax(-1))
    torch.testing.assert_close(pred.probs, logits.softmax(-1), rtol=1e-4, atol=1e-5)
    assert (pred.flops == exit_flops(12, SEQ, distilled["teacher"].config, "full")).all()


def test_speed_one_exits_at_layer_one(distilled):
    pred = predict_fastbert(distilled["fastbert"], distilled["test"], speed=1.0, device=CPU, batch_size=8, seq_len=SEQ)
    assert (pred.layers == 1).all()
    assert (pred.heads[:, 0] == 12).all() and (pred.heads[:, 1:] == 0).all()


def speed_near(u: torch.Tensor, q: float, clearance: float = 1e-4) -> float:
    """A speed near the q-quantile of the uncertainties ``u``, midway between two neighbouring values at least
    2 x ``clearance`` apart. A speed equal (or within rounding) to a sample's uncertainty would make that sample's
    exit a float tie: ``u`` recomputed in another batch differs by ~1e-7 (measured: batch 1 against all 40)."""
    values = u.flatten().double().sort().values
    wide = ((values[1:] - values[:-1]) > 2 * clearance).nonzero().squeeze(1)
    i = wide[(wide - q * (len(values) - 1)).abs().argmin()]
    return float((values[i] + values[i + 1]) / 2)


def expected_exits(u: torch.Tensor, speed: float) -> torch.Tensor:
    """First layer (1-based) whose student's uncertainty is below speed; 12 (the teacher) when none is."""
    below = torch.cat([u < speed, torch.ones(u.shape[0], 1, dtype=torch.bool)], dim=1)
    return below.float().argmax(dim=1) + 1


def test_exits_follow_the_uncertainties(distilled):
    """Exit layer = the first student whose normalised entropy < speed, at speeds spread over the data's range."""
    fb, test = distilled["fastbert"], distilled["test"]
    u = fb.uncertainties(test.input_ids, test.attention_mask)
    assert u.shape == (len(test), 11) and bool(((u >= 0) & (u <= 1)).all())
    speeds = sorted({0.0, 1.0, *(speed_near(u, q) for q in torch.linspace(0.05, 0.95, 7).tolist())})
    assert all(float((u.double() - s).abs().min()) > 1e-4 for s in speeds)  # no sample's exit is a float tie
    layers = []
    for speed in speeds:
        pred = predict_fastbert(fb, test, speed, CPU, 16, SEQ)
        assert torch.equal(pred.layers, expected_exits(u, speed)), speed
        layers.append(pred.layers)
    means = [float(x.float().mean()) for x in layers]
    assert all(a >= b for a, b in zip(means, means[1:], strict=False)), means  # faster with a higher speed
    for a, b in zip(layers, layers[1:], strict=False):  # sample by sample too
        assert (a >= b).all()
    assert sum(1.0 < m < 12.0 for m in means) >= 3, means  # intermediate speeds mix exits
    assert len(torch.cat(layers).unique()) >= 5  # exits at several layers, not only 1 and 12


def mixed_speed(fb: FastBERT, data: SplitData) -> float:
    """A speed at which the data's exits are spread: near the median uncertainty of all students (not the median
    itself, which is one sample's uncertainty: its exit would be a float tie)."""
    return speed_near(fb.uncertainties(data.input_ids, data.attention_mask), 0.5)


def test_batch_size_does_not_matter(distilled):
    fb, test = distilled["fastbert"], distilled["test"]
    speed = mixed_speed(fb, test)  # a mixture of exits, so the batch really shrinks along the way
    one = predict_fastbert(fb, test, speed, CPU, 1, SEQ)
    eight = predict_fastbert(fb, test, speed, CPU, 8, SEQ)
    assert len(eight.layers.unique()) > 2
    assert torch.equal(one.layers, eight.layers)
    assert torch.equal(one.labels, eight.labels)
    torch.testing.assert_close(one.probs, eight.probs, rtol=1e-4, atol=1e-5)
    assert torch.equal(one.flops, eight.flops) and torch.equal(one.flops_linear, eight.flops_linear)
    torch.testing.assert_close(eight.probs.sum(-1), torch.ones(len(test)))


def test_flops_of_an_exit_match_flop_counter(distilled):
    """Running k layers + k students (and the teacher head at 12) costs what exit_flops says."""
    fb, teacher = distilled["fastbert"], distilled["teacher"]
    conf = teacher.config
    ids = make_data(1, seed=9, padded=False).input_ids

    def run(k: int) -> None:
        hidden, keep = teacher.embed(ids)
        for layer in range(k):
            hidden = teacher.run_layers(hidden, keep, layer, layer + 1)
            if layer < 11:
                fb.students[layer](hidden, keep)
        if k == 12:
            teacher.classify(hidden)

    for k in (1, 5, 11, 12):
        with torch.no_grad():
            total, linear = count(lambda k=k: run(k))
        assert abs(total - exit_flops(k, SEQ, conf, "full")) <= 0.01 * total, k
        assert abs(linear - exit_flops(k, SEQ, conf, "linear")) <= 0.01 * linear, k


def test_predict_counts_what_it_runs(distilled):
    """End to end: FlopCounterMode around predict_fastbert on one unpadded sample equals its reported FLOPs, for
    every layer this sample can exit at (each new minimum of its uncertainties) and for the teacher."""
    fb = distilled["fastbert"]
    data = make_data(8, seed=10, padded=False)

    def exit_speeds(u: list[float]) -> dict[int, float]:
        """Exit layer -> a speed that makes the sample exit there."""
        cases, lowest = {12: 0.0}, 1.0
        for layer, value in enumerate(u, start=1):
            if value < lowest:
                cases[layer] = (value + lowest) / 2
                lowest = value
        return cases

    per_sample = [exit_speeds(u) for u in fb.uncertainties(data.input_ids, data.attention_mask).tolist()]
    i = max(range(len(data)), key=lambda j: len(per_sample[j]))  # the sample with the most possible exits
    one, cases = SplitData(data.input_ids[i : i + 1], data.attention_mask[i : i + 1], data.labels[i : i + 1]), per_sample[i]
    assert len(cases) >= 3, cases
    for k, speed in cases.items():
        out = []
        total, linear = count(lambda speed=speed, out=out: out.append(predict_fastbert(fb, one, speed, CPU, 1, SEQ)))
        pred = out[0]
        assert int(pred.layers[0]) == k
        assert abs(total - float(pred.flops[0])) <= 0.01 * total, k
        assert abs(linear - float(pred.flops_linear[0])) <= 0.01 * linear, k


def test_evaluate_accepts_predictions(distilled):
    test, conf = distilled["test"], distilled["teacher"].config
    pred = predict_fastbert(distilled["fastbert"], test, 0.0, CPU, 16, SEQ)
    metrics = evaluate(pred, test, conf, SEQ, None)
    assert metrics["mean_layers"] == 12.0 and metrics["mean_heads"] == 12.0
    assert metrics["infer_flop_ratio"] > 1.0  # 12-VaBERT plus 11 students that never let anyone out
    fast = evaluate(predict_fastbert(distilled["fastbert"], test, 1.0, CPU, 16, SEQ), test, conf, SEQ, None)
    assert fast["mean_layers"] == 1.0
    # Tiny model: a 128-wide student costs more than a 48-wide layer, so one layer + one student is ~0.47x here
    # (BERT-base at n = 128: 0.11x).
    expected = exit_flops(1, SEQ, conf, "full") / full_model_flops(SEQ, conf, "full")
    assert fast["infer_flop_ratio"] == pytest.approx(expected)


def test_save_load_round_trip(distilled, tmp_path):
    fb, test = distilled["fastbert"], distilled["test"]
    fb.save(tmp_path)
    loaded = FastBERT.load(tmp_path, distilled["teacher"])
    for speed in (0.0, mixed_speed(fb, test), 1.0):
        a = predict_fastbert(fb, test, speed, CPU, 8, SEQ)
        b = predict_fastbert(loaded, test, speed, CPU, 8, SEQ)
        assert torch.equal(a.layers, b.layers) and torch.equal(a.labels, b.labels) and torch.equal(a.probs, b.probs)
    other = DHTForSequenceClassification(DHTConfig(**{**TINY, "num_labels": 2}))
    with pytest.raises(ValueError, match="num_labels"):
        FastBERT.load(tmp_path, other)


def test_bad_arguments(distilled):
    with pytest.raises(ValueError, match="speed"):
        predict_fastbert(distilled["fastbert"], distilled["test"], 1.5, CPU, 8, SEQ)
    with pytest.raises(ValueError, match="exit_layer"):
        exit_flops(0, SEQ, distilled["teacher"].config)
    with pytest.raises(ValueError, match="convention"):
        classifier_flops(SEQ, 48, LABELS, "thop")  # type: ignore[arg-type]


def test_pre_ln_exits_read_the_normalised_states():
    """With a pre-LN backbone every exit reads a layer's state through the teacher's final LayerNorm, in training
    (backbone_states) and in adaptive inference (predict_fastbert) alike."""
    torch.manual_seed(0)
    teacher = DHTForSequenceClassification(DHTConfig(**TINY, layer_norm="pre", residual_init_scale=0.5)).eval()
    with torch.no_grad():  # a trained-looking final LayerNorm (at init it is nearly the identity on these states)
        teacher.bert.final_layer_norm.weight.normal_(1.0, 0.5)
        teacher.bert.final_layer_norm.bias.normal_(0.0, 0.5)
    torch.manual_seed(1)
    fb = FastBERT(teacher).eval()
    data = make_data(24, seed=5)
    states, _, _ = fb.backbone_states(data.input_ids, data.attention_mask)
    with torch.no_grad():
        raw = teacher(input_ids=data.input_ids, attention_mask=data.attention_mask, output_hidden_states=True)
    for layer, state in enumerate(states):
        torch.testing.assert_close(state, teacher.bert.final_layer_norm(raw.hidden_states[layer + 1]))
        assert (state - raw.hidden_states[layer + 1]).abs().max() > 1e-2  # the norm is not a no-op here
    u = fb.uncertainties(data.input_ids, data.attention_mask)
    speed = float(u[:, 0].median())
    pred = predict_fastbert(fb, data, speed, CPU, 8, SEQ)
    assert torch.equal(pred.layers, expected_exits(u, speed))
    assert bool((pred.layers == 1).any()) and bool((pred.layers > 1).any())
