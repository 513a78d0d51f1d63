"""Figures (the paper's Figures 2-3, the Pareto and difficulty plots) from synthetic results: no training."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import ROOT, embedded_raw
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.text import Text
from test_report import N_TEST, six_layer_raw
from test_report import write_predictions as write_predictions_csv

from dht.config_loading import load_config
from dht.figures import (
    depth_figure,
    figure_paths,
    loss_figure,
    model_family,
    moving_average,
    pareto_figure,
    pareto_front,
    place_labels,
    selection_shares,
    smoothing_text,
    smoothing_window,
    write_figures,
)
from dht.report import depth_models

MODELS = ["vanilla-12", "t-dht"]
BASELINES = ["distil-3"]
DATASETS = ["embedded-news", "ag_news"]  # embedded: difficulty levels; hub: none
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def raw_params() -> dict:
    raw = embedded_raw()  # the 12-layer structure at the top level: tiny, which extends it, keeps these edits
    raw["datasets"]["ag_news"]["max_length"] = 32  # the tiny model has 40 positions
    raw["run"].update(datasets=DATASETS, models=MODELS, baselines=BASELINES)
    raw["profiles"]["tiny"]["run"]["baselines"] = BASELINES  # the tiny overlay sets its own list
    return raw


@pytest.fixture
def cfg():
    return load_config(ROOT / "params.yaml", profile="tiny", raw=raw_params())


def write_results(root, dataset, epochs=3, steps_per_epoch=40, difficulty=True):
    """What the train and baseline stages write, with made-up numbers in their schema."""
    rng = np.random.default_rng(0)
    accuracy = {"vanilla-12": 0.80, "t-dht": 0.78, "distil-3": 0.70}
    flops = {"vanilla-12": 1.0, "t-dht": 0.45, "distil-3": 0.25}
    # training: the reference 1.0, t-dht 0.45 from the initial weights, distil-3 0.2 of its own after the reference
    start = {"vanilla-12": 0.0, "t-dht": 0.0, "distil-3": 1.0}
    own = {"vanilla-12": 1.0, "t-dht": 0.45, "distil-3": 0.2}
    for model in MODELS + BASELINES:
        run = root / "results" / dataset / model
        run.mkdir(parents=True, exist_ok=True)
        layers = 12.0 if model == "vanilla-12" else 5.0
        metrics = {"accuracy": accuracy[model], "accuracy_ci95": [accuracy[model] - 0.03, accuracy[model] + 0.02],
                   "macro_f1": accuracy[model] - 0.05,
                   "infer_flop_ratio": flops[model], "infer_flop_ratio_linear": flops[model],
                   "mean_layers": layers, "mean_heads": 11.0, "infer_seconds": 1.0,
                   "train_flop_ratio": own[model], "start_flop_ratio": start[model],
                   "train_flop_ratio_total": start[model] + own[model]}
        if difficulty:
            for i, level in enumerate(["easy", "medium", "hard"]):
                metrics[f"accuracy_{level}"] = accuracy[model] - 0.1 * i
                metrics[f"mean_layers_{level}"] = min(12.0, layers + 2 * i)
        (run / "metrics.json").write_text(json.dumps(metrics))
        if model in BASELINES:
            continue
        if model == "vanilla-12":
            sel = {str(e): {"layers/12": 100, "heads/12": 300, "arm/12L12H": 100} for e in range(epochs)}
        else:  # 3 layers take over as training goes on, as in the paper's Figure 2
            sel = {str(e): {"layers/3": 10 + 30 * e, "layers/6": 30, "layers/9": 30 - 10 * e, "layers/12": 30 - 20 * e,
                            "heads/8": 40, "heads/10": 20 + e, "heads/12": 50, "head_g0/0": 7}
                   for e in range(epochs)}
        (run / "selections.json").write_text(json.dumps(sel))
        lines = ["step,epoch,loss,layers"]
        for step in range(1, epochs * steps_per_epoch + 1):
            loss = 1.4 * math.exp(-step / 40) + 0.1 * rng.random()
            lines.append(f"{step},{(step - 1) // steps_per_epoch + 1},{loss:.6f},{layers}")
        (run / "loss.csv").write_text("\n".join(lines) + "\n")


def write_all(cfg, root):
    for dataset in cfg.run.datasets:
        write_results(root, dataset, difficulty=cfg.datasets[dataset].source == "embedded")
        for model in depth_models(cfg):  # t-dht, the reference vanilla-12 and the control vanilla-3
            write_predictions_csv(root, dataset, model)


# --- the declared outputs -----------------------------------------------------------------------------------


def test_figure_paths_come_from_the_config_alone(cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty directory: no results, no data, no meta.json
    assert figure_paths(cfg) == [
        "reports/figures/selection-embedded-news.png",
        "reports/figures/loss-embedded-news.png",
        "reports/figures/pareto-embedded-news.png",
        "reports/figures/difficulty-embedded-news.png",  # embedded data have difficulty levels
        "reports/figures/depth-embedded-news.png",  # where the depth goes: any data, with a DHT mode to run
        "reports/figures/selection-ag_news.png",
        "reports/figures/loss-ag_news.png",
        "reports/figures/pareto-ag_news.png",  # a hub dataset has none: no difficulty figure
        "reports/figures/depth-ag_news.png",
    ]
    assert figure_paths(cfg, out_dir="out/") == [p.replace("reports/figures/", "out/") for p in figure_paths(cfg)]


def test_the_default_profiles_figures():
    paths = figure_paths(load_config(ROOT / "params.yaml"))
    # two CSV datasets without difficulty levels: four figures each, no difficulty figure
    assert paths == [f"reports/figures/{name}-{ds}.png" for ds in ("sst2", "dbpedia-subset")
                     for name in ("selection", "loss", "pareto", "depth")]
    embedded = figure_paths(load_config(ROOT / "params.yaml", profile="embedded"))
    assert len(embedded) == 10 and len(set(embedded)) == 10  # two embedded datasets, five figures each
    assert "reports/figures/difficulty-embedded-sentiment.png" in embedded
    assert "reports/figures/depth-embedded-sentiment.png" in embedded


def test_write_figures_writes_exactly_the_declared_pngs(cfg, tmp_path):
    write_all(cfg, tmp_path)
    written = write_figures(cfg, tmp_path / "reports" / "figures", root=tmp_path)
    assert written == [tmp_path / p for p in figure_paths(cfg)]
    assert sorted(os.listdir(tmp_path / "reports" / "figures")) == sorted(p.rsplit("/", 1)[1] for p in figure_paths(cfg))
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path
        image = imread(path)
        height, width = image.shape[:2]
        assert height >= 300 and width >= 500, (path, image.shape)
        assert float(image[..., :3].std()) > 0.02, f"{path} is (nearly) blank"


def test_the_stage_script_writes_the_figures_or_names_the_missing_file(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params()))
    cmd = [sys.executable, str(ROOT / "workflow" / "scripts" / "figures.py"), "--profile", "tiny",
           "--out-dir", "reports/figures"]
    missing = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "error: results/embedded-news/t-dht/selections.json: missing; run its stage first "
        "(snakemake --cores 4 results/embedded-news/t-dht/selections.json)"
    )
    cfg = load_config(tmp_path / "params.yaml", profile="tiny")
    write_all(cfg, tmp_path)
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"figure -> {p}" for p in figure_paths(cfg)]
    assert all((tmp_path / p).is_file() for p in figure_paths(cfg))


@pytest.mark.parametrize("missing", ["distil-3/metrics.json", "t-dht/selections.json", "vanilla-12/loss.csv"])
def test_a_missing_result_names_the_file_and_its_command(cfg, tmp_path, missing):
    write_all(cfg, tmp_path)
    path = tmp_path / "results" / "ag_news" / missing
    path.unlink()
    with pytest.raises(FileNotFoundError) as err:
        write_figures(cfg, tmp_path / "figures", root=tmp_path)
    assert str(err.value) == f"{path}: missing; run its stage first (snakemake --cores 4 {path})"


# --- the pure parts -----------------------------------------------------------------------------------------


def test_pareto_front_keeps_the_undominated_points_by_increasing_flops():
    points = [
        ("a", 0.2, 0.80),
        ("e", 1.0, 0.90),  # b is cheaper with the same accuracy
        ("b", 0.5, 0.90),
        ("f", 0.3, 0.80),  # a is cheaper with the same accuracy
        ("d", 0.5, 0.88),  # b has the same FLOPs and more accuracy
        ("c", 0.4, 0.85),
        ("g", 0.2, 0.80),  # identical to a: neither dominates, both stay, in input order
        ("h", 0.1, 0.70),
    ]
    assert pareto_front(points) == ["h", "a", "g", "c", "b"]
    assert sorted(pareto_front(list(reversed(points)))) == ["a", "b", "c", "g", "h"]


def test_pareto_front_edge_cases():
    assert pareto_front([]) == []
    assert pareto_front([("only", 0.5, 0.5)]) == ["only"]
    assert pareto_front([("cheap", 0.1, 0.9), ("dear", 0.9, 0.5)]) == ["cheap"]
    assert pareto_front([("x", 0.3, 0.6), ("y", 0.3, 0.6), ("z", 0.3, 0.59)]) == ["x", "y"]
    # A metric that could not be computed is left out, and does not remove the others.
    assert pareto_front([("nan", float("nan"), 0.99), ("ok", 0.5, 0.5)]) == ["ok"]


def test_moving_average_is_trailing_and_window_is_a_share_of_the_run():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([4.0, 0.0, 2.0], 1).tolist() == [4.0, 0.0, 2.0]
    assert moving_average([3.0, 6.0], 10).tolist() == [3.0, 4.5]  # a window longer than the run
    assert moving_average([], 3).size == 0
    with pytest.raises(ValueError, match="window = 0"):
        moving_average([1.0], 0)
    # 10% of the steps: the default profile's 96-step runs were "smoothed" over 1 step by the old steps // 50
    assert [smoothing_window(n) for n in (1, 14, 15, 96, 500)] == [1, 1, 2, 10, 50]
    assert smoothing_text([10, 10]) == "trailing mean over 10% of each run's steps: 10 steps"
    assert smoothing_text([8, 10]) == "trailing mean over 10% of each run's steps: 8-10 steps"
    assert smoothing_text([1, 1]) == smoothing_text([]) == "raw (too few steps to smooth)"


def test_selection_shares_per_epoch_sorted_numerically():
    selections = {
        "1": {"layers/12": 1, "layers/3": 3, "heads/8": 2, "heads/12": 2},
        "0": {"layers/3": 1, "layers/12": 1, "layers/6": 2},  # every sample ran 3 layers + ... but no head decision
    }
    epochs, options, shares = selection_shares(selections, "layers")
    assert epochs == [1, 2]
    assert options == ["3", "6", "12"]  # numeric order, not text order ("12" < "3")
    np.testing.assert_allclose(shares, [[0.25, 0.75], [0.5, 0.0], [0.25, 0.25]])
    _, heads, head_shares = selection_shares(selections, "heads")
    assert heads == ["8", "12"]
    np.testing.assert_allclose(head_shares, [[0.0, 0.5], [0.0, 0.5]])  # epoch 1 made no head choice
    _, arms, _ = selection_shares({"0": {"arm/6L8H": 1, "arm/12L8H": 1, "layers/6": 2}}, "arm")
    assert arms == ["12L8H", "6L8H"]


def test_model_families_for_the_pareto_styles(cfg):
    models = ["vanilla-12", "vanilla-3", "t-dht", "distil-3", "fastbert-0.5", "nas-prune-0.5", "xyz"]
    assert [model_family(cfg, m) for m in models] == [
        "reference", "control", "dht", "distil", "fastbert", "nas-prune", "other"]


def test_model_families_follow_the_configured_reference_and_control():
    raw = six_layer_raw()
    raw["dht"]["modes"]["vanilla-4"] = {"search": "fixed", "arms": ["4L12H"]}
    six = load_config(ROOT / "params.yaml", profile="tiny", raw=raw)
    assert [model_family(six, m) for m in ["vanilla-6", "vanilla-3", "vanilla-4", "t-dht"]] == [
        "reference", "control", "fixed", "dht"]


def scattered(ax) -> dict[str, tuple[float, float]]:
    """The points of a Pareto panel by their annotation: model -> (FLOP ratio, accuracy)."""
    return {t.get_text(): tuple(round(float(v), 6) for v in t.xy) for t in ax.texts if hasattr(t, "xy")}


def front_of(ax) -> list[tuple[float, float]]:
    line = next(line for line in ax.get_lines() if line.get_label() == "Pareto front")
    return [(round(float(x), 6), round(float(y), 6)) for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)]


def test_the_pareto_figure_names_the_reference_and_draws_the_intervals(cfg, tmp_path):
    write_all(cfg, tmp_path)
    fig = pareto_figure(cfg, tmp_path, "ag_news")
    ax = fig.axes[0]
    assert "reference (vanilla-12, 12 layers)" in ax.get_xlabel() and "inference FLOPs" in ax.get_xlabel()
    assert "reference (vanilla-12, 12 layers)" in [t.get_text() for t in fig.legends[0].get_texts()]
    # one error bar per model: t-dht's spans its interval [0.75, 0.80]
    spans = sorted(tuple(np.round(seg[:, 1], 6)) for coll in ax.collections if hasattr(coll, "get_segments")
                   for seg in coll.get_segments())
    assert (0.75, 0.8) in spans and len(spans) == 3


def test_the_pareto_figures_second_panel_charges_the_total_training(cfg, tmp_path):
    write_all(cfg, tmp_path)
    infer, train = pareto_figure(cfg, tmp_path, "ag_news").axes[:2]
    assert "training FLOPs in total" in train.get_xlabel()
    assert scattered(infer)["distil-3"] == (0.25, 0.7) and scattered(train)["distil-3"] == (1.2, 0.7)
    assert scattered(train)["t-dht"] == (0.45, 0.78)
    # cheapest to infer, distil-3 is on the inference front; charged the reference it starts from, it is dominated
    # by t-dht in training: the training front is t-dht, then the reference
    assert (0.25, 0.7) in front_of(infer)
    assert [x for x, _ in front_of(train)][:2] == [0.45, 1.0]


def test_the_depth_figure_shows_where_the_layers_go(cfg, tmp_path):
    write_all(cfg, tmp_path)
    fig = depth_figure(cfg, tmp_path, "ag_news")
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert [ax.get_xlabel() for ax in panels] == ["length quartile", "the control's prediction", "confidence quartile"]
    length = panels[0]
    t_dht = next(line for line in length.get_lines() if line.get_label() == "t-dht")
    layers = t_dht.get_ydata()
    # write_predictions gives t-dht 12 layers on samples over 30 tokens and 3 on the rest
    assert layers[0] == 3 and layers[-1] == 12 and layers[-1] > layers[0]
    assert [t.get_text().split("\n")[0] for t in length.get_xticklabels()][0].startswith("Q1: 5-")
    labels = {line.get_label() for line in panels[1].get_lines()}
    assert {"t-dht", "vanilla-12 (12 layers)", "vanilla-3 (3 layers)"} <= labels


def test_the_loss_figure_smooths_over_a_share_of_each_run_and_says_so(cfg, tmp_path):
    write_all(cfg, tmp_path)  # 3 epochs of 40 steps: a 12-step window
    fig = loss_figure(cfg, tmp_path, "ag_news")
    overlay, t_dht_panel = fig.axes[0], fig.axes[2]
    assert overlay.get_title(loc="left") == "all models, trailing mean over 10% of each run's steps: 12 steps"
    raw = next(line for line in t_dht_panel.get_lines() if line.get_label() == "raw").get_ydata()
    smoothed = next(line for line in overlay.get_lines() if line.get_label() == "t-dht").get_ydata()
    np.testing.assert_allclose(smoothed, moving_average(raw, 12))
    # smoothed: its step-to-step changes are a fraction of the raw curve's noise
    assert np.abs(np.diff(smoothed)).mean() < 0.3 * np.abs(np.diff(raw)).mean()
    assert "trailing mean, 12 steps (10% of 120)" in [line.get_label() for line in t_dht_panel.get_lines()]
    write_results(tmp_path, "ag_news", epochs=1, steps_per_epoch=10, difficulty=False)  # too short to smooth
    short = loss_figure(cfg, tmp_path, "ag_news")
    assert short.axes[0].get_title(loc="left") == "all models, raw (too few steps to smooth)"


# DBpedia-like results: a dozen models within two points of accuracy, several at nearly the same FLOPs.
CROWD = {  # model: (inference FLOPs, accuracy)
    "vanilla-12": (1.0, 0.962), "vanilla-3": (0.27, 0.905), "t-dht": (0.55, 0.951), "s-dht": (0.56, 0.953),
    "f-dht": (0.57, 0.950), "p-dht": (0.55, 0.952), "distil-3": (0.27, 0.941), "fastbert-0.5": (0.50, 0.955),
    "fastbert-0.8": (0.31, 0.948), "nas-prune-0.5": (0.50, 0.944), "flexibert-0.5": (0.49, 0.910),
}


def crowded(tmp_path):
    raw = raw_params()
    raw["run"].update(models=[m for m in CROWD if "vanilla" in m or "dht" in m],
                      baselines=[m for m in CROWD if "vanilla" not in m and "dht" not in m])
    raw["profiles"]["tiny"]["run"]["baselines"] = raw["run"]["baselines"]
    cfg = load_config(ROOT / "params.yaml", profile="tiny", raw=raw)
    for model, (flops, acc) in CROWD.items():
        run = tmp_path / "results" / "ag_news" / model
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({
            "accuracy": acc, "accuracy_ci95": [acc - 0.02, acc + 0.02], "infer_flop_ratio": flops,
            "train_flop_ratio_total": flops + (1.0 if model[0] in "dfn" else 0.0)}))
    return cfg


def text_box(text, renderer):
    """A label's own box, without its leader line."""
    return Text.get_window_extent(text, renderer)


def test_the_pareto_figure_styles_the_control_apart_and_its_labels_never_overlap(tmp_path):
    cfg = crowded(tmp_path)
    fig = pareto_figure(cfg, tmp_path, "ag_news")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"reference (vanilla-12, 12 layers)", "shallow control (vanilla-3, 3 layers)", "DHT modes"} <= set(legend)
    infer = fig.axes[0]
    marker = {c.get_label(): c.get_paths()[0].vertices.tolist() for c in infer.collections if c.get_label()}
    assert marker["shallow control (vanilla-3, 3 layers)"] != marker["DHT modes"]  # its own marker, not a DHT mode's
    fig.canvas.draw()  # as savefig lays it out
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:2]:
        labels = {t.get_text(): t for t in ax.texts if hasattr(t, "xy")}
        assert set(labels) == set(CROWD)
        boxes = {name: text_box(t, renderer) for name, t in labels.items()}
        frame = ax.get_window_extent(renderer)
        names = sorted(boxes)
        for i, a in enumerate(names):
            assert frame.x0 <= boxes[a].x0 and boxes[a].x1 <= frame.x1 and frame.y0 <= boxes[a].y0 <= boxes[a].y1 <= frame.y1, a
            for b in names[i + 1:]:
                assert not boxes[a].overlaps(boxes[b]), (a, b)
            for other, t in labels.items():  # nor does a label cover a point's centre
                assert not boxes[a].contains(*ax.transData.transform(t.xy)), (a, other)


def test_labels_go_where_nothing_else_is():
    fig = Figure(figsize=(4, 3), dpi=100)
    ax = fig.add_subplot()
    points = [(f"m{i}", 0.5, 0.5) for i in range(4)] + [("far", 0.9, 0.1)]  # four identical points
    for _, x, y in points:
        ax.scatter([x], [y], s=60)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw_without_rendering()
    boxes = place_labels(ax, points, {}, renderer)
    assert list(boxes) == ["m0", "m1", "m2", "m3", "far"]  # by x, then y, then name: the same picture every time
    assert all(not a.overlaps(b) for i, a in enumerate(boxes.values()) for b in list(boxes.values())[i + 1:])
    again = place_labels(ax, points, {}, renderer)
    assert [b.bounds for b in again.values()] == [b.bounds for b in boxes.values()]


def test_the_depth_figure_says_why_it_has_no_length_groups(cfg, tmp_path):
    write_all(cfg, tmp_path)
    cut = np.where(np.arange(N_TEST) % 4 != 0, 32, 5 + np.arange(N_TEST) % 20)  # 60 of 80 at the longest length
    for model in depth_models(cfg):
        write_predictions_csv(tmp_path, "ag_news", model, tokens=cut)
    fig = depth_figure(cfg, tmp_path, "ag_news")
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert [ax.get_xlabel() for ax in panels] == ["length quartile", "the control's prediction", "confidence quartile"]
    length = panels[0]
    assert not length.get_lines()  # no groups drawn ...
    note = " ".join(t.get_text() for t in length.texts).replace("\n", " ")
    assert "Not grouped by length: 60 of the 80 test samples (75%) have the longest length the model saw, 32 tokens" in note
    assert panels[1].get_lines() and panels[2].get_lines()  # ... the other groupings are
