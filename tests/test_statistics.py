"""Paired statistics (dht.statistics) on constructed predictions whose answer is known, and which baseline a model
is compared with (dht.comparison.best_baseline)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import ROOT, embedded_raw

from dht.comparison import best_baseline
from dht.config_loading import load_config
from dht.statistics import bootstrap_ci, mcnemar_exact, paired_difference


def exact_two_sided(k: int, n: int) -> float:
    """The two-sided exact binomial p-value at 1/2 by hand: twice the smaller tail, at most 1."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_identical_predictions_differ_by_nothing():
    correct = np.arange(200) % 3 != 0
    d = paired_difference(correct, correct.copy())
    assert d.difference == 0 and d.ci95 == (0.0, 0.0) and d.p_value == 1.0
    assert d.n_discordant == 0 and d.n == 200 and d.half_width == 0
    assert mcnemar_exact(0, 0) == 1.0


@pytest.mark.parametrize("k", [1, 3, 6, 10])
def test_a_model_right_on_k_more_samples_gets_the_exact_binomial_p(k):
    other = np.arange(100) % 4 != 0  # wrong on 25 samples
    model = other.copy()
    model[np.flatnonzero(~other)[:k]] = True  # right on k of them, wrong on nothing the other gets right
    d = paired_difference(model, other)
    assert d.difference == pytest.approx(k / 100)
    assert (d.only_a, d.only_b) == (k, 0)
    assert d.p_value == pytest.approx(min(1.0, 2 * 0.5**k))  # all k discordant pairs go one way
    assert d.ci95[0] <= d.difference <= d.ci95[1]


def test_mcnemar_counts_only_the_discordant_samples():
    other = np.zeros(300, dtype=bool)
    other[:150] = True  # 150 concordant right, then: the model alone right on 7, the other alone right on 2
    model = other.copy()
    model[150:157] = True
    model[:2] = False
    d = paired_difference(model, other)
    assert (d.only_a, d.only_b, d.n_discordant) == (7, 2, 9)
    assert d.p_value == pytest.approx(exact_two_sided(2, 9))  # 2 x (1 + 9 + 36) / 512
    assert d.difference == pytest.approx(5 / 300)
    # the same discordant pairs among more concordant samples: the same p-value (concordant ones carry nothing)
    more = paired_difference(np.concatenate([model, np.ones(500, bool)]), np.concatenate([other, np.ones(500, bool)]))
    assert more.p_value == d.p_value


def test_the_comparison_is_antisymmetric():
    rng = np.random.default_rng(3)
    a, b = rng.random(250) < 0.8, rng.random(250) < 0.7
    ab, ba = paired_difference(a, b), paired_difference(b, a)
    assert ab.difference == pytest.approx(-ba.difference) and ab.p_value == pytest.approx(ba.p_value)
    # the same resampled samples for both orders: the interval mirrors
    assert ab.ci95[0] == pytest.approx(-ba.ci95[1]) and ab.ci95[1] == pytest.approx(-ba.ci95[0])
    assert paired_difference(a, b) == ab  # a fixed seed: the same predictions give the same interval


def test_pairing_settles_what_two_separate_intervals_do_not():
    """Two models that share most errors: their accuracy intervals overlap, the paired one excludes 0."""
    other = np.arange(400) % 5 != 0  # 0.80
    model = other.copy()
    model[np.flatnonzero(~other)[:12]] = True  # 0.83, better on 12 samples, worse on none
    lo_m, hi_m = bootstrap_ci(model)
    lo_o, hi_o = bootstrap_ci(other)
    assert lo_m < hi_o  # the separate intervals overlap
    d = paired_difference(model, other)
    assert d.ci95[0] > 0 and d.p_value < 0.001


def test_bad_pairs_are_refused():
    with pytest.raises(ValueError, match="same test samples: 3 outcomes against 2"):
        paired_difference([True, False, True], [True, False])
    with pytest.raises(ValueError, match="no test samples"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="discordant counts"):
        mcnemar_exact(-1, 2)


@pytest.fixture
def cfg():
    raw = embedded_raw()
    raw["profiles"]["tiny"]["run"]["baselines"] = ["distil-3", "fastbert-0.5", "nas-prune-0.5", "flexibert-0.5"]
    return load_config(ROOT / "params.yaml", profile="tiny", raw=raw)


def test_the_best_baseline_is_the_most_accurate_at_no_more_inference_flops(cfg):
    measured = {
        "t-dht": {"accuracy": 0.80, "infer_flop_ratio": 0.50},
        "vanilla-3": {"accuracy": 0.70, "infer_flop_ratio": 0.20},
        "distil-3": {"accuracy": 0.79, "infer_flop_ratio": 0.25},
        "fastbert-0.5": {"accuracy": 0.85, "infer_flop_ratio": 0.50},  # as costly: still a candidate
        "nas-prune-0.5": {"accuracy": 0.90, "infer_flop_ratio": 0.55},  # more accurate, but dearer
        "flexibert-0.5": {"accuracy": 0.79, "infer_flop_ratio": 0.22},
    }
    assert best_baseline(cfg, "t-dht", measured) == "fastbert-0.5"
    # a baseline is not its own competitor; among equally accurate ones the cheaper wins
    assert best_baseline(cfg, "fastbert-0.5", measured) == "flexibert-0.5"
    # the control is no candidate, and nothing is as cheap as it
    assert best_baseline(cfg, "vanilla-3", measured) is None


def assert_the_evaluation_stage_paired_the_trained_models(project, dataset: str, models: list[str],
                                                         baselines: list[str], epochs: int,
                                                         distil: tuple[str, int] | None = None) -> None:
    """What the `compare` stage wrote after a real run (the end-to-end test's tiny DAG calls this): it pairs what
    train and baseline wrote, prediction by prediction, names each model's best baseline at no more FLOPs, and
    the baselines' metrics charge them the reference they start from. `distil`: a DistilBERT baseline of the run
    and its own epochs."""
    import json

    from dht.evaluation import read_predictions

    results = project / "results" / dataset
    paired = json.loads((results / "paired.json").read_text())
    metrics = {m: json.loads((results / m / "metrics.json").read_text()) for m in paired["models"]}
    assert list(paired["models"]) == [*models, *baselines]
    reference = models[0]
    assert paired["reference"] == reference and paired["seeds"] == [0]
    assert paired["n_test"] == metrics[reference]["n_test"]
    ref_predictions = read_predictions(results / reference / "predictions.csv")
    for model, row in paired["models"].items():
        mine = read_predictions(results / model / "predictions.csv")
        if model != reference:
            r = row["vs_reference"]["per_seed"]["0"]
            # the difference of the two models' own accuracies, and the discordant samples of their predictions
            assert r["difference"] == pytest.approx(metrics[model]["accuracy"] - metrics[reference]["accuracy"],
                                                    abs=2e-6)
            assert r["only_model"] == int((mine.correct & ~ref_predictions.correct).sum())
            assert r["only_other"] == int((ref_predictions.correct & ~mine.correct).sum())
            assert r["ci95_lo"] <= r["difference"] <= r["ci95_hi"] and 0 < r["p_value"] <= 1
        # the best baseline, recomputed from the metrics: the most accurate other one at no more inference FLOPs
        cheaper = [b for b in baselines if b != model
                   and metrics[b]["infer_flop_ratio"] <= metrics[model]["infer_flop_ratio"]]
        best = max(cheaper, key=lambda b: (metrics[b]["accuracy"], -metrics[b]["infer_flop_ratio"]), default=None)
        assert row["vs_best_baseline"]["against"] == best, model
    cheapest = min(baselines, key=lambda b: metrics[b]["infer_flop_ratio"])
    assert paired["models"][cheapest]["vs_best_baseline"]["against"] is None  # nothing else is as cheap
    # budgets: a baseline that starts from the reference is charged its training (its recorded total) and its own
    ref = metrics[reference]
    assert ref["start_flop_ratio"] == 0 and ref["train_flop_ratio_total"] == ref["train_flop_ratio"]
    assert ref["epochs_own"] == ref["epochs_total"] == epochs
    for baseline in baselines:
        m = metrics[baseline]
        assert m["start_flop_ratio"] in (0, ref["train_flop_ratio_total"]), baseline  # from scratch, or the reference
        assert m["train_flop_ratio_total"] == pytest.approx(m["start_flop_ratio"] + m["train_flop_ratio"], abs=2e-6)
    if distil is not None:
        name, own = distil
        assert metrics[name]["start_flop_ratio"] == ref["train_flop_ratio_total"]
        assert (metrics[name]["epochs_own"], metrics[name]["epochs_total"]) == (own, epochs + own)
    for model in models:  # the DHT modes and the fixed models start from the initial model: nothing to charge
        assert metrics[model]["train_flop_ratio_total"] == metrics[model]["train_flop_ratio"], model
    table2 = (project / "reports/table2.md").read_text()
    assert "best baseline at ≤ its FLOPs" in table2 and "How large a difference this run settles" in table2
