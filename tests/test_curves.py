"""The accuracy-FLOPs curves of the models with an inference dial (dht.curves, issue 28) in the reports: Table 2's
curves section and the Pareto figure, from the metrics.json files the train and baseline stages write."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, embedded_raw

from dht.config_loading import load_config
from dht.report import curves_text, front_at, read_curves
from dht.results import run_subdir

DATASET = "embedded-news"


def point(dial, val_acc, val_flops, acc, flops):
    return {"dial": dial, "val_accuracy": val_acc, "val_infer_flop_ratio": val_flops, "accuracy": acc,
            "infer_flop_ratio": flops, "infer_seconds": 1.0}


# one grid, two seeds: the mode's test accuracy differs by seed, FastBERT's speeds cost more for the same accuracy
MODE = {0: [point(0.0, 0.90, 0.95, 0.88, 0.95), point(0.02, 0.89, 0.55, 0.86, 0.55), point(0.1, 0.80, 0.35, 0.78, 0.35)],
        1: [point(0.0, 0.90, 0.95, 0.90, 0.95), point(0.02, 0.86, 0.50, 0.84, 0.50), point(0.1, 0.82, 0.30, 0.80, 0.30)]}
FAST = [point(0.2, 0.90, 0.90, 0.88, 0.90), point(0.5, 0.85, 0.65, 0.82, 0.65), point(0.8, 0.75, 0.40, 0.74, 0.40)]


def write(root, cfg, model, seed, curve, chosen, accuracy=0.85):
    path = root / "results" / run_subdir(cfg, DATASET, model, seed) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {"accuracy": accuracy, "accuracy_ci95": [accuracy - 0.05, accuracy + 0.05], "macro_f1": accuracy,
               "train_flop_ratio": 1.0, "train_flop_ratio_total": 1.0, "infer_flop_ratio": 0.5,
               "infer_flop_ratio_linear": 0.5, "infer_seconds": 1.0, "mean_layers": 6.0}
    if curve is not None:
        metrics.update({"curve": curve, "chosen": {"dial": chosen, "met": True, "rule": "fewest ..."}})
    path.write_text(json.dumps(metrics))


@pytest.fixture
def run(tmp_path):
    raw = embedded_raw()
    raw["run"]["training_seeds"] = [0, 1]
    raw["profiles"]["tiny"]["run"] = {"models": ["vanilla-12", "t-dht"], "control": None,
                                      "baselines": ["fastbert-0.5", "fastbert-0.8"]}
    cfg = load_config(ROOT / "params.yaml", profile="tiny", raw=raw)
    for seed in (0, 1):
        write(tmp_path, cfg, "vanilla-12", seed, None, None, 0.88)
        write(tmp_path, cfg, "t-dht", seed, MODE[seed], 0.02 if seed == 0 else 0.0)
        for name in ("fastbert-0.5", "fastbert-0.8"):  # one distilled model: the same curve in both
            write(tmp_path, cfg, name, seed, FAST, 0.2)
    return cfg, tmp_path


def test_the_curves_are_averaged_over_the_seeds_one_per_baseline_kind(run):
    cfg, root = run
    curves = read_curves(cfg, root, DATASET)
    assert list(curves) == ["t-dht", "fastbert-0.5"]  # fastbert-0.8 is the same model: one curve
    mode = curves["t-dht"]
    assert mode["dial"] == "price" and curves["fastbert-0.5"]["dial"] == "speed"
    assert [p["accuracy"] for p in mode["points"]] == pytest.approx([0.89, 0.85, 0.79])
    assert mode["points"][1]["accuracy_std"] == pytest.approx(((0.01 ** 2) * 2) ** 0.5)
    assert {s: c["dial"] for s, c in mode["chosen"].items()} == {0: 0.02, 1: 0.0}
    # the step front: the best mean test accuracy with at most x FLOPs
    assert front_at(mode["points"], 0.2) is None
    assert front_at(mode["points"], 0.6) == pytest.approx(0.85)
    assert front_at(curves["fastbert-0.5"]["points"], 0.6) == pytest.approx(0.74)


def test_table2s_curve_section_compares_the_curves_and_the_chosen_price_to_the_reference(run):
    cfg, root = run
    paired = {"models": {"t-dht": {"vs_reference": {
        "difference": -0.02, "per_seed": {"0": {"ci95_lo": -0.005}, "1": {"ci95_lo": -0.04}}}}}}
    text = "\n\n".join(curves_text(cfg, root, DATASET, paired))
    assert "**t-dht** (price chosen on validation: seed 0: 0.02, seed 1: 0" in text
    assert "| 0.02 | 0.875 | 0.53x | 0.850 ± 0.014 | 0.53x | 0 |" in text
    assert "within 0.01 (lower end >= -0.010, non-inferiority) for 1 of 2 seeds" in text
    row = next(line for line in text.splitlines() if line.startswith("| t-dht - fastbert-0.5 "))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    # 0.3x: FastBERT has no point that cheap; 0.4x and 0.5x: 0.79 (the mode's 0.325x) - 0.74; 0.6x: 0.85 - 0.74;
    # 0.7x: 0.85 - 0.82
    assert cells == ["-", "+0.050", "+0.050", "+0.110", "+0.030"]
    # nothing when no model has a curve
    for seed in (0, 1):
        for name in ("t-dht", "fastbert-0.5", "fastbert-0.8"):
            write(root, cfg, name, seed, None, None)
    assert curves_text(cfg, root, DATASET, paired) == []


def test_the_pareto_figure_draws_each_curve_with_the_values_chosen_on_validation(run):
    from dht.figures import pareto_figure

    cfg, root = run
    fig = pareto_figure(cfg, root, DATASET)
    infer_ax = fig.axes[0]
    drawn = {line.get_label(): line for line in infer_ax.get_lines()}
    mode = drawn["t-dht: curve over its price (test; chosen on val: 0, 0.02)"]
    assert list(mode.get_xdata()) == pytest.approx([0.325, 0.525, 0.95])  # by increasing FLOPs
    assert list(mode.get_ydata()) == pytest.approx([0.79, 0.85, 0.89])
    assert "fastbert: curve over its speed (test; chosen on val: 0.2)" in drawn
