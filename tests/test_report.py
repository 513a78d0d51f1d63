"""Reports: the paper's values beside the measured ones, absolute on the paper's datasets, relative elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT, embedded_raw

from dht.comparison import compare_dataset
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
from dht.results import paired_path, write_paired

MODELS = ["vanilla-12", "t-dht", "s-dht", "f-dht", "p-dht"]
BASELINES = ["distil-3", "fastbert-0.5", "nas-prune-0.5"]
N_TEST = 80
TOKENS = 5 + np.arange(N_TEST) % 40  # 5..44 tokens, each length twice
CONTROL_RIGHT = np.arange(N_TEST) % 4 != 0  # the shallow control gets 3 samples in 4 right
BASE_RIGHT = np.arange(N_TEST) % 5 != 0  # every other model gets 4 in 5 right, the same ones ...
# ... except: t-dht also gets the first 6 of the others' wrong samples right, distil-3 the first 4 right ones wrong
EXTRA_RIGHT = {"t-dht": 6}
EXTRA_WRONG = {"distil-3": 4}


def synthetic_layers(model: str) -> np.ndarray:
    """Made-up depth choices: t-dht gives long samples 12 layers, s-dht gives 9 to what the control gets wrong,
    the other modes 6 everywhere, fixed modes their depth."""
    if model == "t-dht":
        return np.where(TOKENS > 30, 12, 3)
    if model == "s-dht":
        return np.where(CONTROL_RIGHT, 3, 9)
    fixed = {"vanilla-12": 12, "vanilla-6": 6, "vanilla-3": 3}
    return np.full(N_TEST, fixed.get(model, 6))


def correct_of(model: str) -> np.ndarray:
    """Which test samples a model gets right in write_predictions."""
    if model == "vanilla-3":
        return CONTROL_RIGHT.copy()
    correct = BASE_RIGHT.copy()
    correct[np.flatnonzero(~BASE_RIGHT)[:EXTRA_RIGHT.get(model, 0)]] = True
    correct[np.flatnonzero(BASE_RIGHT)[:EXTRA_WRONG.get(model, 0)]] = False
    return correct


def write_predictions(root, dataset, model, tokens=TOKENS):
    """A predictions.csv in the train/baseline stages' schema (`tokens`: each sample's length as the model saw it)."""
    label = np.arange(N_TEST) % 2
    pred = np.where(correct_of(model), label, 1 - label)
    prob = 0.5 + (np.arange(N_TEST) % 40) / 100
    lines = ["index,label,pred,prob,layers,n_tokens"]
    lines += [f"{i},{label[i]},{pred[i]},{prob[i]:.6f},{synthetic_layers(model)[i]},{tokens[i]}" for i in range(N_TEST)]
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
    """metrics.json of every model: the i-th in the list trains for 1 - 0.1 i of the reference's FLOPs and infers
    at 1 - 0.05 i; a baseline starts from the reference (trained for 1.0, 3 epochs) and trains 1 epoch."""
    for i, model in enumerate(models or MODELS + BASELINES + ["vanilla-3"]):
        path = root / "results" / dataset / model / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        acc = accuracy.get(model, 0.5)
        own, start = round(1.0 - 0.1 * i, 6), 1.0 if model in BASELINES else 0.0  # all built from the reference
        epochs = 1 if start else 3
        path.write_text(json.dumps({
            "accuracy": acc, "accuracy_ci95": [acc - 0.05, acc + 0.04], "macro_f1": 0.4, "train_flop_ratio": own,
            "start_flop_ratio": start, "train_flop_ratio_total": start + own, "epochs_own": epochs,
            "epochs_total": epochs + (3 if start else 0),
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


def write_data(cfg, root, models=None, accuracy=None):
    """Every dataset's metrics.json and predictions.csv of every model, the evaluation stage's paired.json, and
    meta.json."""
    for ds in cfg.run.datasets:
        write_results(root, ds, accuracy or {}, models)
        for model in dict.fromkeys([*depth_models(cfg), *cfg.run.models, *cfg.run.baselines]):
            write_predictions(root, ds, model)
        write_paired(root / paired_path(cfg, ds), compare_dataset(cfg, root, ds))
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
    rows = [line for line in index.split("## embedded-news")[1].splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| vanilla-6 |")  # the index's first row, after its header
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
    write_data(cfg, tmp_path, ["t-dht", "vanilla-6"])  # the reference is trained for the reports all the same
    t2 = write_table2(cfg, tmp_path / "reports/table2.md", root=tmp_path)
    row = [c.strip() for c in next(line for line in t2.splitlines() if line.startswith("| t-dht ")).split("|")]
    assert row[5] == "-"  # no measured reference to compare with
    t1 = write_table1(cfg, tmp_path / "reports/table1.md", root=tmp_path)
    assert "vanilla-3 wrong" not in t1 and "| confidence | Q4: " in t1


def cells_of(text: str, dataset: str, model: str, nth: int = 0) -> list[str]:
    """The cells of a model's `nth` row in a dataset's section (Table 2 has the model in two tables)."""
    section = text.split(f"## {dataset}\n")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| {model} |")]
    return [c.strip() for c in rows[nth].strip("|").split("|")]


def test_table1_charges_every_model_its_total_training_budget(cfg, tmp_path):
    write_data(cfg, tmp_path)
    t1 = write_table1(cfg, tmp_path / "reports/table1.md", root=tmp_path)
    header = cells_of(t1, "embedded-news", "model")
    assert header[6:] == ["training FLOPs: total", "paper: FLOPs, mean (range)", "own", "epochs: total (own)"]
    # distil-3 (6th in write_results: 0.5x of its own, 1 epoch) starts from the reference (1.0x, 3 epochs)
    distil = cells_of(t1, "embedded-news", "distil-3")
    assert (distil[6], distil[8], distil[9]) == ("1.50x", "0.50x", "4 (1)")
    t_dht = cells_of(t1, "embedded-news", "t-dht")  # from the initial weights: total = own
    assert (t_dht[6], t_dht[8], t_dht[9]) == ("0.90x", "0.90x", "3 (3)")
    # on a paper dataset the paper's training FLOPs stand beside the total
    ag = cells_of(t1, "ag_news", "nas-prune-0.5")
    assert ag[6:] == ["1.30x", "-", "-", "0.30x", "4 (1)"]
    assert "*Total* = the training of the model it starts from plus its own" in t1
    index = write_index(cfg, tmp_path / "reports/index.md", [], root=tmp_path)
    assert cells_of(index, "embedded-news", "distil-3")[3] == "1.50x (0.50x)"


def test_table2_pairs_every_model_with_the_reference_and_the_best_cheaper_baseline(cfg, tmp_path):
    # distil-3 (0.75x inference) is the most accurate baseline, nas-prune-0.5 (0.65x) the cheapest
    write_data(cfg, tmp_path, accuracy={"distil-3": 0.6, "fastbert-0.5": 0.55})
    t2 = write_table2(cfg, tmp_path / "reports/table2.md", root=tmp_path)
    header = cells_of(t2, "embedded-news", "model", 1)
    assert header[2:6] == ["vs vanilla-12: difference [95% CI]", "p", "discordant (model / vanilla-12)",
                           "best baseline at ≤ its FLOPs"]
    t_dht = cells_of(t2, "embedded-news", "t-dht", 1)
    # t-dht gets 6 samples right that the reference gets wrong, none the other way: 6/80, p = 2 / 2^6
    assert t_dht[1] == "0.95x" and t_dht[2].startswith("+0.075 [") and t_dht[3] == "0.031" and t_dht[4] == "6 / 0"
    lo, hi = (float(v) for v in t_dht[2].split("[")[1].rstrip("]").split(", "))
    assert 0 < lo < 0.075 < hi
    # distil-3 is wrong on 4 samples t-dht gets right, besides t-dht's 6: 10 / 0 against it
    assert t_dht[5] == "distil-3" and t_dht[6].startswith("+0.125 [") and t_dht[8] == "10 / 0"
    assert cells_of(t2, "embedded-news", "fastbert-0.5", 1)[5] == "nas-prune-0.5"  # the only cheaper one
    assert cells_of(t2, "embedded-news", "nas-prune-0.5", 1)[5:] == ["none", "-", "-", "-"]
    assert cells_of(t2, "embedded-news", "vanilla-12", 1)[2:5] == ["-", "-", "-"]
    assert "McNemar's exact test" in t2
    # one seed: the interval's half-width is stated, and that the seed's noise is not measured by this run
    settle = t2.split("## embedded-news\n")[1].split("How large a difference this run settles: ")[1].split("\n")[0]
    assert "every model was trained once (one seed)" in settle and "no run with several seeds is present" in settle
    assert "standard deviation" not in settle
    index = write_index(cfg, tmp_path / "reports/index.md", [], root=tmp_path)
    assert cells_of(index, "embedded-news", "t-dht")[6].endswith(", p 0.031")
    assert "How large a difference this run settles" in index.split("## embedded-news")[1]


def test_table2_names_the_missing_comparisons(cfg, tmp_path):
    write_data(cfg, tmp_path)
    (tmp_path / "results/ag_news/paired.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"results/ag_news/paired.json: missing; run its stage first"):
        write_table2(cfg, tmp_path / "reports/table2.md", root=tmp_path)


def test_a_training_budget_adds_the_start_to_the_own_part(tmp_path):
    from dht.results import read_start, training_budget

    reference = {"train_flop_ratio": 1.02, "train_flop_ratio_total": 1.02, "epochs_own": 2, "epochs_total": 2}
    assert training_budget(0.3, 1, reference) == {"train_flop_ratio": 0.3, "start_flop_ratio": 1.02,
                                                   "train_flop_ratio_total": pytest.approx(1.32),
                                                   "epochs_own": 1, "epochs_total": 3}
    scratch = training_budget(0.45, 2, None)
    assert scratch["start_flop_ratio"] == 0 and scratch["train_flop_ratio_total"] == 0.45
    assert scratch["epochs_total"] == 2
    old = tmp_path / "metrics.json"
    old.write_text(json.dumps({"train_flop_ratio": 1.0}))
    with pytest.raises(ValueError, match=r"no train_flop_ratio_total, epochs_total .*rerun its stage"):
        read_start(old)
    with pytest.raises(FileNotFoundError, match="missing; run its stage first"):
        read_start(tmp_path / "none.json")


def test_a_baselines_metrics_charge_it_the_reference_it_starts_from():
    from test_evaluation import CONF, SEQ, pattern, split_and_predictions

    from dht.results import baseline_metrics

    data, pred = split_and_predictions(*pattern(40))
    reference = {"train_flop_ratio_total": 0.98, "epochs_total": 2}
    m = baseline_metrics(pred, data, CONF, {"max_length": SEQ}, train_flops=30.0, reference_train_flops=100.0,
                         seconds=1.0, epochs=1, start=reference)
    assert m["train_flop_ratio"] == 0.3 and m["start_flop_ratio"] == 0.98
    assert m["train_flop_ratio_total"] == pytest.approx(1.28) and (m["epochs_own"], m["epochs_total"]) == (1, 3)
    alone = baseline_metrics(pred, data, CONF, {"max_length": SEQ}, 30.0, 100.0, 1.0, 12.5, None)  # FlexiBERT's
    assert alone["train_flop_ratio_total"] == 0.3 and alone["epochs_total"] == 12.5


def test_lengths_cut_at_max_length_are_said_not_tabulated(cfg, tmp_path):
    # ag_news's texts cut at its max_length (32, meta.json): 60 of the 80 test samples see 32 tokens, as DBpedia's
    # did in the default profile, where the "by length" rows were one meaningless group.
    write_data(cfg, tmp_path)
    cut = np.where(np.arange(N_TEST) % 4 != 0, 32, TOKENS % 32)
    for model in depth_models(cfg):
        write_predictions(tmp_path, "ag_news", model, tokens=cut)
    t1 = write_table1(cfg, tmp_path / "reports/table1.md", root=tmp_path)
    ag = t1.split("## ag_news\n")[1].split("\n## ")[0]
    assert "Not grouped by length: 60 of the 80 test samples (75%) reach the dataset's max_length, 32 tokens" in ag
    assert "| length |" not in ag and "| confidence |" in ag
    news = t1.split("## embedded-news\n")[1].split("\n## ")[0]
    assert "| length | Q1: " in news and "Not grouped by length" not in news  # the other dataset keeps its rows


def test_the_index_says_what_each_datasets_numbers_mean(cfg, tmp_path, monkeypatch):
    from dht.figures import pareto_front
    from dht.report import dominating, versus_text

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # write_results: the i-th model of MODELS + BASELINES + [vanilla-3] infers at 1 - 0.05 i of the reference
    accuracy = {"vanilla-12": 0.90, "t-dht": 0.85, "s-dht": 0.80, "distil-3": 0.82}
    write_data(cfg, tmp_path, accuracy=accuracy)
    index = write_index(cfg, tmp_path / "reports/index.md", [], root=tmp_path)
    assert "[docs/real-text.md](../docs/real-text.md)" in index
    for ds in cfg.run.datasets:
        section = index.split(f"## {ds}\n")[1].split("\n## ")[0]
        reading = section.strip().split("\n\n")[0]
        assert reading.startswith("**What it says.**")
        paired = json.loads((tmp_path / paired_path(cfg, ds)).read_text())
        names = [*cfg.run.models, *cfg.run.baselines]
        points = [(m, paired["models"][m]["infer_flop_ratio"], paired["models"][m]["accuracy"]) for m in names]
        front = pareto_front(points)
        # by construction: the cheapest of the 0.5 models (the control), distil-3, t-dht and the reference
        assert front == ["vanilla-3", "distil-3", "t-dht", "vanilla-12"]
        assert ("by increasing FLOPs: vanilla-3 (0.500 at 0.60x), distil-3 (0.820 at 0.75x), t-dht (0.850 at "
                "0.95x), vanilla-12 (0.900 at 1.00x).") in reading
        assert ("For scale, the reference (vanilla-12, 12 layers) reaches 0.900 at 1.00x and the shallow control "
                "(vanilla-3, 3 layers) 0.500 at 0.60x.") in reading
        # one line per DHT mode: its comparisons as paired.json has them, the control and where it stands
        lines = {line.split("**")[1]: line for line in reading.splitlines()[1:]}
        assert list(lines) == ["t-dht", "s-dht", "f-dht", "p-dht"]
        t_dht, s_dht = lines["t-dht"], lines["s-dht"]
        assert versus_text(paired["models"]["t-dht"]["vs_reference"]) in t_dht
        # t-dht gets 6 samples right that the reference gets wrong, and none the other way: McNemar's p = 2/2^6
        assert "against the reference +0.075 [" in t_dht and "beyond the test split's noise (McNemar p = 0.031)" in t_dht
        assert "the same prediction on every test sample" in s_dht  # s-dht predicts as the reference does
        assert f"against the control +0.350 (unpaired) for {0.95 / 0.60:.1f} times its FLOPs" in t_dht
        assert paired["models"]["t-dht"]["vs_best_baseline"]["against"] == "distil-3"
        assert "against distil-3, the best baseline at no more FLOPs, " in t_dht
        assert t_dht.endswith("; on the front.")
        assert dominating(points, "s-dht") == "distil-3"
        assert s_dht.endswith("; off the front: distil-3 (0.820 at 0.75x) is more accurate at no more FLOPs.")


def test_a_paired_comparison_in_words():
    from dht.report import versus_text

    run = {"difference": -0.02, "ci95_lo": -0.051, "ci95_hi": 0.01, "p_value": 0.21, "n_discordant": 9}
    one = {"against": "vanilla-6", "difference": -0.02, "per_seed": {"0": run}}
    assert versus_text(one) == "-0.020 [-0.051, +0.010], within the test split's noise (McNemar p = 0.210)"
    tiny_p = {**one, "per_seed": {"0": {**run, "p_value": 0.0004}}}
    assert versus_text(tiny_p).endswith("beyond the test split's noise (McNemar p <0.001)")
    seeds = {"against": "vanilla-6", "difference": 0.02, "difference_std": 0.01,
             "per_seed": {"0": {**run, "p_value": 0.01}, "1": {**run, "p_value": 0.3}, "2": {**run, "p_value": 0.04}}}
    assert versus_text(seeds) == "+0.020 ± 0.010 over 3 seeds (McNemar p < 0.05 in 2 of them)"
    same = {**one, "per_seed": {"0": {**run, "n_discordant": 0}}}
    assert versus_text(same) == "the same prediction on every test sample (no difference to measure)"
    assert versus_text({"against": None}) is None and versus_text(None) is None
