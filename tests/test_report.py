"""Reports: the paper's values beside the measured ones, absolute on the paper's datasets, relative elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT, embedded_raw

from dht.config import ConfigError
from dht.config_loading import load_config
from dht.report import (
    comparison_table,
    depth_models,
    paper_dataset,
    paper_values,
    reference_label,
    write_index,
    write_table1,
    write_table2,
)

MODELS = ["vanilla-12", "t-dht", "s-dht", "f-dht", "p-dht"]
BASELINES = ["distil-3", "fastbert-0.5", "nas-prune-0.5"]
N_TEST = 80
TOKENS = 5 + np.arange(N_TEST) % 40  # 5..44 tokens, each length twice
CONTROL_RIGHT = np.arange(N_TEST) % 4 != 0  # the shallow control gets 3 samples in 4 right


def synthetic_layers(model: str) -> np.ndarray:
    """Made-up depth choices: t-dht gives long samples 12 layers, s-dht gives 9 to what the control gets wrong,
    the other modes 6 everywhere, fixed modes their depth."""
    if model == "t-dht":
        return np.where(TOKENS > 30, 12, 3)
    if model == "s-dht":
        return np.where(CONTROL_RIGHT, 3, 9)
    fixed = {"vanilla-12": 12, "vanilla-6": 6, "vanilla-3": 3}
    return np.full(N_TEST, fixed.get(model, 6))


def write_predictions(root, dataset, model):
    """A predictions.csv in the train/baseline stages' schema."""
    label = np.arange(N_TEST) % 2
    correct = CONTROL_RIGHT if model == "vanilla-3" else np.arange(N_TEST) % 5 != 0
    pred = np.where(correct, label, 1 - label)
    prob = 0.5 + (np.arange(N_TEST) % 40) / 100
    lines = ["index,label,pred,prob,layers,n_tokens"]
    lines += [f"{i},{label[i]},{pred[i]},{prob[i]:.6f},{synthetic_layers(model)[i]},{TOKENS[i]}" for i in range(N_TEST)]
    path = root / "results" / dataset / model / "predictions.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_paper_values_are_complete_and_cite_their_rows():
    pv = paper_values()
    assert list(pv["datasets"]) == ["ag_news", "dbpedia", "yelp_polarity", "yelp_full"]
    assert set(pv["table1"]) == set(MODELS)
    assert {"distil-1", "distil-3", "distil-6", "fastbert-0.1", "fastbert-0.5", "fastbert-0.8"} < set(pv["table2"])
    for table in ("table1", "table2"):
        for model, row in pv[table].items():
            assert row["row"]
            for ds in pv["datasets"]:
                f1, flops = row[ds]
                assert 0.5 < f1 < 1 and 0 < flops <= 1, (table, model, ds)
    assert pv["table1"]["s-dht"]["yelp_polarity"] == [0.956, 0.26]  # spot checks against the paper's tables
    assert pv["table2"]["fastbert-0.8"]["yelp_full"] == [0.647, 0.46]


@pytest.fixture
def cfg():
    raw = embedded_raw()  # the 12-layer structure at the top level: tiny, which extends it, keeps these edits
    raw["datasets"]["ag_news"]["max_length"] = 32
    raw["datasets"]["my-ag"] = {"source": "csv", "path": "data/external/dbpedia", "fields": ["title", "description"], "max_length": 32,
                                "paper": "ag_news"}
    raw["run"].update(datasets=["embedded-news", "ag_news", "my-ag"], baselines=BASELINES)
    raw["profiles"]["tiny"]["run"]["baselines"] = BASELINES  # the overlay replaces the list
    return load_config(ROOT / "params.yaml", profile="tiny", raw=raw)


def write_results(root, dataset, accuracy, models=None):
    for i, model in enumerate(models or MODELS + BASELINES + ["vanilla-3"]):
        path = root / "results" / dataset / model / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        acc = accuracy.get(model, 0.5)
        path.write_text(json.dumps({
            "accuracy": acc, "accuracy_ci95": [acc - 0.05, acc + 0.04], "macro_f1": 0.4, "train_flop_ratio": 1.0 - 0.1 * i,
            "infer_flop_ratio": 1.0 - 0.05 * i, "infer_flop_ratio_linear": 1.0 - 0.05 * i, "infer_seconds": 2.0 + i,
            "mean_layers": 4.5, "accuracy_easy": 0.9, "mean_layers_easy": 3.0, "accuracy_hard": 0.4, "mean_layers_hard": 6.0,
        }))


def test_which_datasets_compare_with_the_paper(cfg):
    assert paper_dataset(cfg, "ag_news") == "ag_news"
    assert paper_dataset(cfg, "my-ag") == "ag_news"  # its `paper:` key
    assert paper_dataset(cfg, "embedded-news") is None


def test_paper_dataset_rows_carry_the_paper_value_and_the_difference(cfg, tmp_path):
    write_results(tmp_path, "ag_news", {"vanilla-12": 0.940, "t-dht": 0.900})
    table = comparison_table(cfg, tmp_path, "ag_news", MODELS, "table1")
    row = next(line for line in table.splitlines() if line.startswith("| t-dht "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # Table 1: T-DHT on Ag. News is 0.945; the accuracy with its 95% interval
    assert cells[:5] == ["t-dht", "DHT T-DHT", "0.900 [0.850, 0.940]", "0.945", "-0.045"]
    assert cells[6:9] == ["0.90x", "0.42x", "+0.48"]  # measured training FLOPs, the paper's 0.42x, difference


def test_other_data_compare_relative_to_12_vabert(cfg, tmp_path):
    write_results(tmp_path, "embedded-news", {"vanilla-12": 0.60, "s-dht": 0.65})
    table = comparison_table(cfg, tmp_path, "embedded-news", MODELS, "table1")
    row = next(line for line in table.splitlines() if line.startswith("| s-dht "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "+0.050"  # F1 change vs 12-VaBERT on the same data
    assert cells[5].startswith("-0.008 (")  # the paper's mean change for S-DHT over its four datasets
    assert cells[7] == "0.33x (0.26x..0.39x)"  # the paper's training FLOP ratios for S-DHT


def write_data(cfg, root, models=None):
    for ds in cfg.run.datasets:
        write_results(root, ds, {}, models)
        for model in depth_models(cfg):
            write_predictions(root, ds, model)
        meta = {"name": ds, "source": "x", "num_labels": 4, "max_length": 32, "vocab_size": 100, "has_difficulty": True,
                "difficulty_names": ["easy", "medium", "hard"],
                "splits": {s: {"n": 10, "mean_tokens": 5.0, "truncated_share": 0.0, "difficulty_counts": [4, 3, 3]}
                           for s in ("train", "test")}}
        (root / "data" / "processed" / ds).mkdir(parents=True)
        (root / "data" / "processed" / ds / "meta.json").write_text(json.dumps(meta))


def test_reports_name_every_model_and_the_paper_tables(cfg, tmp_path):
    write_data(cfg, tmp_path)
    t1 = write_table1(cfg, tmp_path / "reports/table1.md", root=tmp_path)
    t2 = write_table2(cfg, tmp_path / "reports/table2.md", root=tmp_path)
    assert "## The paper's Table 1" in t1 and "| BL1 12-VaBERT | 0.944 |" in t1 and "By difficulty" in t1
    for model in BASELINES + MODELS:
        assert f"| {model} |" in t2
    assert "## The paper's Table 2" in t2 and "| BL3 1-FastBERT |" in t2
    distil = next(line for line in t2.splitlines() if line.startswith("| distil-3 "))
    assert distil.rstrip().endswith("| 3.50x |")  # wall time: 7.0 s against 12-VaBERT's 2.0 s


def test_a_missing_result_names_its_stage(cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"results/ag_news/vanilla-12/metrics.json: missing; run its stage"):
        comparison_table(cfg, tmp_path, "ag_news", MODELS, "table2")


def test_the_index_links_each_model_to_its_mlflow_run_and_every_figure(cfg, tmp_path, monkeypatch):
    from dht.tracking import stage_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_data(cfg, tmp_path)
    figures = [f"reports/figures/pareto-{ds}.png" for ds in cfg.run.datasets]
    index = write_index(cfg, tmp_path / "reports/index.md", figures, root=tmp_path)
    assert "Profile `tiny`" in index and "[Table 1: training comparison](table1.md)" in index
    assert "not in the store" in index and "/#/experiments/" not in index  # no store yet: said, not invented
    assert "![pareto-my-ag](figures/pareto-my-ag.png)" in index
    with stage_run("ag_news", "t-dht", stage="train", profile="tiny", root=tmp_path) as run:
        pass
    with stage_run("ag_news", "s-dht", stage="train", profile="default", root=tmp_path):
        pass  # another profile's run is not this report's
    index = write_index(cfg, tmp_path / "reports/index.md", figures, root=tmp_path)
    ag = index.split("## ag_news")[1].split("## ")[0]
    t_dht = next(line for line in ag.splitlines() if line.startswith("| t-dht |"))
    assert t_dht.endswith(f"/runs/{run.info.run_id}) |")
    assert next(line for line in ag.splitlines() if line.startswith("| s-dht |")).endswith("not in the store |")


def test_accuracy_carries_its_interval_in_every_table(cfg, tmp_path):
    write_data(cfg, tmp_path)
    t1 = write_table1(cfg, tmp_path / "reports/table1.md", root=tmp_path)
    t2 = write_table2(cfg, tmp_path / "reports/table2.md", root=tmp_path)
    index = write_index(cfg, tmp_path / "reports/index.md", [], root=tmp_path)
    for text in (t1, t2):
        assert "95% percentile-bootstrap interval" in text and "accuracy (micro-F1) [95% CI]" in text
    for text in (t1, t2, index):
        assert "| t-dht | DHT T-DHT | 0.500 [0.450, 0.540] |" in text or "| t-dht | 0.500 [0.450, 0.540] |" in text
    # metrics.json written before the interval existed: the accuracy alone, no crash
    path = tmp_path / "results/ag_news/t-dht/metrics.json"
    old = json.loads(path.read_text())
    del old["accuracy_ci95"]
    path.write_text(json.dumps(old))
    table = comparison_table(cfg, tmp_path, "ag_news", MODELS, "table1")
    assert next(line for line in table.splitlines() if line.startswith("| t-dht ")).split("|")[3].strip() == "0.500"


def depth_rows(text: str, dataset: str) -> dict[tuple[str, str], dict[str, str]]:
    """The "Where the depth goes" table of a dataset in table1.md: (grouped by, samples) -> {column: cell}."""
    section = text.split(f"## {dataset}\n")[1].split("\n## ")[0]
    lines = section.split("Where the depth goes")[1].split("\n\n")[1].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        rows[(cells["grouped by"], cells["samples"])] = cells
    return rows


def test_where_the_depth_goes_on_data_without_difficulty(cfg, tmp_path):
    write_data(cfg, tmp_path)
    t1 = write_table1(cfg, tmp_path / "reports/table1.md", root=tmp_path)
    rows = depth_rows(t1, "ag_news")  # a hub dataset: no difficulty column, the depth table all the same
    length = [r for (by, _), r in rows.items() if by == "length"]
    assert [r["samples"].split(":")[0] for r in length] == ["Q1", "Q2", "Q3", "Q4"]
    # t-dht gives long samples (over 30 tokens) 12 layers, short ones 3: the top quartile runs more layers
    assert float(length[-1]["t-dht layers"]) == 12.0 and float(length[0]["t-dht layers"]) == 3.0
    # s-dht gives 9 layers to what the shallow control gets wrong, 3 to the rest
    assert rows[("control", "vanilla-3 wrong")]["s-dht layers"] == "9.0"
    assert rows[("control", "vanilla-3 right")]["s-dht layers"] == "3.0"
    assert rows[("control", "vanilla-3 wrong")]["vanilla-3 acc."] == "0.000"
    assert rows[("-", "all")]["n"] == str(N_TEST) and rows[("-", "all")]["f-dht layers"] == "6.0"
    confidence = [r for (by, _), r in rows.items() if by == "confidence"]
    assert len(confidence) == 4 and sum(int(r["n"]) for r in confidence) == N_TEST
    assert "vanilla-12 acc." in rows[("-", "all")] and "vanilla-12 layers" not in rows[("-", "all")]
    # the data with difficulty levels keep their table, and get this one too
    news = t1.split("## embedded-news\n")[1].split("\n## ")[0]
    assert "By difficulty" in news and "Where the depth goes" in news
    assert "reference (vanilla-12, 12 layers)" in t1 and "shallow control (vanilla-3, 3 layers)" in t1


def test_a_missing_predictions_file_names_its_stage(cfg, tmp_path):
    write_data(cfg, tmp_path)
    (tmp_path / "results/ag_news/vanilla-3/predictions.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"results/ag_news/vanilla-3/predictions.csv: missing; run its stage"):
        write_table1(cfg, tmp_path / "reports/table1.md", root=tmp_path)


def six_layer_raw() -> dict:
    """A 6-layer variant of the embedded profile (b = c = 3): its reference is vanilla-6, its control vanilla-3."""
    raw = embedded_raw()
    raw["model"]["num_hidden_layers"] = 6
    raw["dht"]["modes"] = {"vanilla-6": {"search": "fixed", "arms": ["6L12H"]},
                           "vanilla-3": {"search": "fixed", "arms": ["3L12H"]},
                           "t-dht": {"search": "tree", "layers": [3, 6], "heads": [8, 10, 12]}}
    raw["run"].update(datasets=["embedded-news", "ag_news"], models=["vanilla-6", "vanilla-3", "t-dht"],
                      baselines=["distil-3"], reference="vanilla-6", control="vanilla-3")
    raw["datasets"]["ag_news"]["max_length"] = 32
    raw["profiles"]["tiny"]["run"]["baselines"] = ["distil-3"]
    raw["profiles"]["tiny"]["dht"] = {}
    return raw


def test_the_reference_comes_from_the_configuration(tmp_path):
    cfg = load_config(ROOT / "params.yaml", profile="tiny", raw=six_layer_raw())
    assert reference_label(cfg) == "reference (vanilla-6, 6 layers)"
    assert depth_models(cfg) == ["t-dht", "vanilla-6", "vanilla-3"]
    models = ["vanilla-6", "vanilla-3", "t-dht", "distil-3"]
    write_data(cfg, tmp_path, models)
    write_results(tmp_path, "embedded-news", {"vanilla-6": 0.60, "t-dht": 0.65}, models)
    t1 = write_table1(cfg, tmp_path / "reports/table1.md", root=tmp_path)
    t2 = write_table2(cfg, tmp_path / "reports/table2.md", root=tmp_path)
    index = write_index(cfg, tmp_path / "reports/index.md", [], root=tmp_path)
    for text in (t1, t2):
        assert "reference (vanilla-6, 6 layers)" in text and "F1 change vs vanilla-6" in text
        assert "vanilla-12" not in text  # no such model here
    news = t1.split("## embedded-news\n")[1]
    t_dht = [c.strip() for c in next(line for line in news.splitlines() if line.startswith("| t-dht ")).split("|")]
    assert t_dht[5] == "+0.050"  # against vanilla-6 on the same data
    ref = [c.strip() for c in next(line for line in news.splitlines() if line.startswith("| vanilla-6 ")).split("|")]
    assert ref[2] == "BL1 12-VaBERT" and ref[5] == "+0.000"  # beside the paper's reference row
    assert t2.split("## embedded-news")[1].split("\n| ")[2].startswith("vanilla-6 |")  # Table 2's first row
    assert "| vanilla-6 |" in index.split("## embedded-news")[1].splitlines()[4]  # the index's first row
    assert "vanilla-6 acc." in t1 and "vanilla-3 wrong" in t1


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["run"].update(reference="t-dht"), "run.reference = 't-dht': must be a fixed mode"),
    (lambda r: r["run"].update(reference="vanilla-3"),
     "run.reference = 'vanilla-3': its arm 3L12H must run every layer with every head (6L12H"),
    (lambda r: r["run"].update(models=["vanilla-3", "t-dht"]),
     "run.reference = 'vanilla-6': the baselines are built from the trained reference, so run.models must"),
    (lambda r: r["run"].update(control="t-dht"), "run.control = 't-dht': must be a fixed mode of dht.modes"),
    (lambda r: r["run"].update(reference="vanilla-12"), "run.reference = 'vanilla-12': must be a fixed mode"),
])
def test_the_reference_and_the_control_are_checked(edit, message):
    raw = six_layer_raw()
    edit(raw)
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", profile="tiny", raw=raw)
    assert message in str(err.value)


def test_without_baselines_the_reference_may_stay_out_of_run_models(tmp_path):
    raw = six_layer_raw()
    raw["run"].update(models=["t-dht"], baselines=[], control=None)
    raw["profiles"]["tiny"]["run"]["baselines"] = []
    cfg = load_config(ROOT / "params.yaml", profile="tiny", raw=raw)
    assert depth_models(cfg) == ["t-dht", "vanilla-6"]  # the reference's predictions still feed the analysis
    write_data(cfg, tmp_path, ["t-dht"])
    t2 = write_table2(cfg, tmp_path / "reports/table2.md", root=tmp_path)
    row = [c.strip() for c in next(line for line in t2.splitlines() if line.startswith("| t-dht ")).split("|")]
    assert row[5] == "-"  # no measured reference to compare with
    t1 = write_table1(cfg, tmp_path / "reports/table1.md", root=tmp_path)
    assert "vanilla-3 wrong" not in t1 and "| confidence | Q4: " in t1
