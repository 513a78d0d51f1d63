"""The accuracy's bootstrap interval (evaluate's `accuracy_ci95`, dht.statistics), the per-sample predictions
file and the depth analysis's groupings (dht.evaluation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dht.evaluation import (
    Predictions,
    SamplePredictions,
    SplitData,
    depth_analysis,
    evaluate,
    length_note,
    quartile_bins,
    read_predictions,
    write_predictions,
)
from dht.statistics import bootstrap_ci

CONF = {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 12, "num_hidden_layers": 12,
        "num_labels": 2}
SEQ = 16


def split_and_predictions(labels: list[int], preds: list[int], layers: list[int] | None = None,
                          lengths: list[int] | None = None) -> tuple[SplitData, Predictions]:
    n = len(labels)
    lengths = lengths or [SEQ] * n
    mask = torch.tensor([[1] * k + [0] * (SEQ - k) for k in lengths])
    data = SplitData(torch.ones(n, SEQ, dtype=torch.long), mask, torch.tensor(labels))
    pred_labels = torch.tensor(preds)
    # the predicted class gets probability 0.6 + 0.3 * (i % 2), the other class the rest
    top = torch.tensor([0.6 + 0.3 * (i % 2) for i in range(n)])
    probs = torch.zeros(n, 2)
    probs[torch.arange(n), pred_labels] = top
    probs[torch.arange(n), 1 - pred_labels] = 1 - top
    depth = torch.tensor(layers or [12] * n)
    heads = torch.zeros(n, 12, dtype=torch.long)
    for i, d in enumerate(depth.tolist()):
        heads[i, :d] = 12
    flops = torch.ones(n, dtype=torch.float64)
    return data, Predictions(pred_labels, probs, depth, heads, flops, flops, 0.1)


def metrics_for(labels: list[int], preds: list[int]) -> dict:
    data, pred = split_and_predictions(labels, preds)
    return evaluate(pred, data, CONF, SEQ, None)


def pattern(n: int, wrong_every: int = 5) -> tuple[list[int], list[int]]:
    """n samples, every `wrong_every`-th one predicted wrong: accuracy 1 - 1/wrong_every when n divides."""
    labels = [i % 2 for i in range(n)]
    return labels, [1 - y if i % wrong_every == 0 else y for i, y in enumerate(labels)]


def test_evaluate_gives_an_interval_around_the_accuracy_and_keeps_macro_f1():
    m = metrics_for(*pattern(200))
    assert m["accuracy"] == pytest.approx(0.8)
    lo, hi = m["accuracy_ci95"]
    assert lo < m["accuracy"] < hi
    # The binomial standard error at n = 200 is 0.028: a 95% interval is about +-0.055 wide, not 0 nor 0.5.
    assert 0.03 < m["accuracy"] - lo < 0.09 and 0.03 < hi - m["accuracy"] < 0.09
    assert "macro_f1" in m and 0 < m["macro_f1"] <= 1


def test_the_interval_is_deterministic():
    first, second = metrics_for(*pattern(200)), metrics_for(*pattern(200))
    assert first["accuracy_ci95"] == second["accuracy_ci95"]
    correct = np.arange(300) % 4 != 0
    assert bootstrap_ci(correct) == bootstrap_ci(correct.copy())


def test_the_interval_narrows_with_more_samples():
    small = metrics_for(*pattern(100))["accuracy_ci95"]
    large = metrics_for(*pattern(2500))["accuracy_ci95"]
    # Width shrinks as 1/sqrt(n): 5x fewer at 25x the samples; asserted with a wide margin.
    assert (large[1] - large[0]) < 0.4 * (small[1] - small[0])
    assert large[0] < 0.8 < large[1]


def test_perfect_and_hopeless_predictions_give_degenerate_intervals():
    labels = [i % 2 for i in range(50)]
    assert metrics_for(labels, labels)["accuracy_ci95"] == [1.0, 1.0]
    assert metrics_for(labels, [1 - y for y in labels])["accuracy_ci95"] == [0.0, 0.0]


def test_bootstrap_edge_cases_and_chunking():
    assert all(np.isnan(bootstrap_ci([])))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([True, False], level=1.5)
    # Large splits are resampled in chunks: still 1000 resamples, an interval around the accuracy.
    correct = np.arange(70_000) % 10 != 0
    lo, hi = bootstrap_ci(correct)
    assert lo < 0.9 < hi and hi - lo < 0.01


def test_predictions_file_round_trip(tmp_path):
    labels, preds = pattern(10)
    data, pred = split_and_predictions(labels, preds, layers=[3, 6, 9, 12, 3, 6, 9, 12, 3, 6],
                                       lengths=[4, 5, 6, 7, 8, 9, 10, 11, 12, 13])
    path = write_predictions(tmp_path / "results" / "predictions.csv", pred, data)
    assert path.read_text().splitlines()[:2] == ["index,label,pred,prob,layers,n_tokens", "0,0,1,0.600000,3,4"]
    back = read_predictions(path)
    assert back.label.tolist() == labels and back.pred.tolist() == preds
    assert back.layers.tolist() == [3, 6, 9, 12, 3, 6, 9, 12, 3, 6]
    assert back.n_tokens.tolist() == list(range(4, 14))
    np.testing.assert_allclose(back.prob, [0.6 + 0.3 * (i % 2) for i in range(10)])
    assert back.correct.tolist() == [i % 5 != 0 for i in range(10)]
    (tmp_path / "bad.csv").write_text("index,label\n0,1\n")
    with pytest.raises(ValueError, match="no column"):
        read_predictions(tmp_path / "bad.csv")


def test_quartile_bins_keep_equal_values_together():
    values = np.array([5] * 50 + [6, 7, 8, 9] * 5 + [20] * 10)
    bins = quartile_bins(values, "tokens")
    for b in bins:  # no value is split across groups
        assert not any(set(values[b.mask]) & set(values[o.mask]) for o in bins if o is not b)
    assert sum(b.n for b in bins) == values.size
    # The 50 fives reach past the median: Q1 holds them all, Q2 is empty and left out; the 75th percentile
    # (7.25) splits the rest.
    assert [(b.label, b.n) for b in bins] == [("Q1: 5 tokens", 50), ("Q3: 6-7 tokens", 10), ("Q4: 8-20 tokens", 20)]
    spread = quartile_bins(np.arange(100), "tokens")
    assert [b.n for b in spread] == [25, 25, 25, 25] and spread[1].label == "Q2: 25-49 tokens"
    # Confidences of a nearly constant model: ranges get the decimals that tell the groups apart.
    close = quartile_bins(0.25 + np.arange(8) / 10_000, "", digits=3)
    assert [b.label for b in close] == ["Q1: 0.2500-0.2501", "Q2: 0.2502-0.2503", "Q3: 0.2504-0.2505",
                                        "Q4: 0.2506-0.2507"]
    assert quartile_bins(np.array([0.1, 0.2, 0.3, 0.4]), "", digits=3)[0].label == "Q1: 0.100"


def sample_predictions(n: int, layers, correct, prob=None, n_tokens=None) -> SamplePredictions:
    label = np.arange(n) % 2
    pred = np.where(correct, label, 1 - label)
    return SamplePredictions(np.arange(n), label, pred, np.asarray(prob if prob is not None else np.full(n, 0.9)),
                             np.asarray(layers, dtype=float), np.asarray(n_tokens if n_tokens is not None else
                                                                         np.full(n, 10)))


def test_depth_analysis_groups_by_length_control_and_confidence():
    n = 80
    tokens = 5 + np.arange(n) % 40  # 5..44, each twice
    control_right = np.arange(n) % 4 != 0
    ref = sample_predictions(n, np.full(n, 12), np.ones(n, bool), prob=0.5 + (np.arange(n) % 40) / 100, n_tokens=tokens)
    control = sample_predictions(n, np.full(n, 3), control_right, n_tokens=tokens)
    by_length = sample_predictions(n, np.where(tokens > 30, 12, 3), np.ones(n, bool), n_tokens=tokens)
    by_control = sample_predictions(n, np.where(control_right, 3, 9), np.ones(n, bool), n_tokens=tokens)
    a = depth_analysis({"long": by_length, "hard": by_control}, ("vanilla-12", ref), ("vanilla-3", control))
    assert list(a.groupings) == ["length", "control", "confidence"]
    length = a.groupings["length"][1]
    assert a.mean_layers("long", length[0]) == 3 and a.mean_layers("long", length[-1]) == 12
    right, wrong = a.groupings["control"][1]
    assert (right.label, wrong.label) == ("vanilla-3 right", "vanilla-3 wrong")
    assert a.mean_layers("hard", right) == 3 and a.mean_layers("hard", wrong) == 9
    assert a.accuracy("vanilla-3", wrong) == 0 and a.accuracy("vanilla-3", right) == 1
    assert len(a.groupings["confidence"][1]) == 4 and "(vanilla-12)" in a.groupings["confidence"][0]
    without = depth_analysis({"long": by_length}, ("vanilla-12", ref), None)
    assert list(without.groupings) == ["length", "confidence"]
    other_split = sample_predictions(n - 1, np.full(n - 1, 3), np.ones(n - 1, bool))
    with pytest.raises(ValueError, match="not of the same test split"):
        depth_analysis({"short": other_split}, ("vanilla-12", ref), None)


def test_lengths_mostly_cut_at_max_length_are_not_grouped_and_the_report_says_why():
    # DBpedia at max_length 32: most articles are longer, so the model sees 32 tokens of most samples and their
    # quartiles would hold one group. 70 of 100 samples here sit at the cut, the rest spread below it.
    n = 100
    tokens = np.where(np.arange(n) < 70, 32, 10 + np.arange(n) % 20)
    note = length_note(tokens, max_length=32)
    assert note is not None and note.startswith("Not grouped by length: 70 of the 100 test samples (70%) reach the "
                                                "dataset's max_length, 32 tokens")
    assert len(quartile_bins(tokens, "tokens")) < 4  # what the note replaces: the quartiles collapse
    # without the dataset's max_length (the figures stage) the same decision, from the data alone
    assert "longest length the model saw, 32 tokens" in length_note(tokens)
    # many samples of one length below max_length: nothing was cut, and the note does not say so
    same = length_note(np.full(n, 12), max_length=64)
    assert same is not None and "have the same length, 12 tokens (below max_length 64: none was cut)" in same
    # spread lengths, or a minority at the cut: the quartiles separate them
    assert length_note(5 + np.arange(n) % 40, max_length=64) is None
    assert length_note(np.where(np.arange(n) < 50, 32, np.arange(n) % 30), max_length=32) is None
    assert length_note(np.array([], dtype=int), max_length=32) is None

    ref = sample_predictions(n, np.full(n, 12), np.ones(n, bool), prob=0.5 + (np.arange(n) % 40) / 100,
                             n_tokens=tokens)
    mode = sample_predictions(n, np.full(n, 6), np.ones(n, bool), n_tokens=tokens)
    a = depth_analysis({"t-dht": mode}, ("vanilla-12", ref), None, max_length=32)
    assert list(a.groupings) == ["confidence"] and a.notes == {"length": note}
    spread = sample_predictions(n, np.full(n, 12), np.ones(n, bool), n_tokens=5 + np.arange(n) % 40)
    kept = depth_analysis({"t-dht": spread}, ("vanilla-12", spread), None, max_length=32)
    assert "length" in kept.groupings and kept.notes == {}
