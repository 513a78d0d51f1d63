"""Reports: the paper's values beside the measured ones, absolute on the paper's datasets, relative elsewhere."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import ROOT

from dht.config import load_config, read_params
from dht.report import comparison_table, paper_dataset, paper_values, write_index, write_table1, write_table2

MODELS = ["vanilla-12", "t-dht", "s-dht", "f-dht", "p-dht"]
BASELINES = ["distil-3", "fastbert-0.5", "nas-prune-0.5"]


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
    raw = copy.deepcopy(read_params(ROOT / "params.yaml"))
    raw["datasets"]["ag_news"]["max_length"] = 32
    raw["datasets"]["my-ag"] = {"source": "csv", "path": "x", "fields": ["title", "description"], "max_length": 32,
                                "paper": "ag_news"}
    raw["run"].update(datasets=["embedded-news", "ag_news", "my-ag"], baselines=BASELINES)
    raw["profiles"]["tiny"]["run"]["baselines"] = BASELINES  # the overlay replaces the list
    return load_config(ROOT / "params.yaml", profile="tiny", raw=raw)


def write_results(root, dataset, accuracy):
    for i, model in enumerate(MODELS + BASELINES + ["vanilla-3"]):
        path = root / "results" / dataset / model / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "accuracy": accuracy.get(model, 0.5), "macro_f1": 0.4, "train_flop_ratio": 1.0 - 0.1 * i,
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
    assert cells[:5] == ["t-dht", "DHT T-DHT", "0.900", "0.945", "-0.045"]  # Table 1: T-DHT on Ag. News is 0.945
    assert cells[6:9] == ["0.90x", "0.42x", "+0.48"]  # measured training FLOPs, the paper's 0.42x, difference


def test_other_data_compare_relative_to_12_vabert(cfg, tmp_path):
    write_results(tmp_path, "embedded-news", {"vanilla-12": 0.60, "s-dht": 0.65})
    table = comparison_table(cfg, tmp_path, "embedded-news", MODELS, "table1")
    row = next(line for line in table.splitlines() if line.startswith("| s-dht "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "+0.050"  # F1 change vs 12-VaBERT on the same data
    assert cells[5].startswith("-0.008 (")  # the paper's mean change for S-DHT over its four datasets
    assert cells[7] == "0.33x (0.26x..0.39x)"  # the paper's training FLOP ratios for S-DHT


def write_data(cfg, root):
    for ds in cfg.run.datasets:
        write_results(root, ds, {})
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
