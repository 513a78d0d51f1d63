"""`run.training_seeds`: every model trained once per seed, in its own directory, and the reports' mean ± std."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from conftest import ROOT, embedded_raw, run_cli
from test_pipeline import job_counts, set_params

from dht.config import ConfigError, run_param_keys
from dht.config_loading import load_config
from dht.evaluation import accuracy_text
from dht.report import comparison_table
from dht.results import aggregate, read_metrics, result_file, run_name, run_subdir, seeded
from dht_workflow.dvc_params import expand_dvc_stages


def tiny(seeds=None, data_seed=0):
    raw = embedded_raw()
    if seeds is not None:
        raw["run"]["training_seeds"] = seeds
    raw["data_seed"] = data_seed
    return load_config(ROOT / "params.yaml", profile="tiny", raw=raw)


def test_seeds_are_validated():
    assert tiny().training_seeds == [0] and not seeded(tiny())
    assert tiny([3]).training_seeds == [3] and not seeded(tiny([3]))
    assert tiny([0, 2]).training_seeds == [0, 2] and seeded(tiny([0, 2]))
    with pytest.raises(ConfigError, match=r"run.training_seeds.*seed 1 listed twice"):
        tiny([1, 0, 1])
    with pytest.raises(ConfigError, match=r"run.training_seeds.*at least 1 item"):
        tiny([])


def test_the_data_seed_and_a_runs_training_seed_are_apart():
    """data_seed draws the data, whatever the training seeds; a run's training seed is one of run.training_seeds,
    chosen per run (a stage's --training-seed), and with several a run must choose."""
    cfg = tiny([3], data_seed=7)
    assert (cfg.data_seed, cfg.training_seed) == (7, 3)
    several = tiny([0, 2], data_seed=7)
    with pytest.raises(ValueError, match=r"trains seeds \[0, 2\]: choose the run's"):
        _ = several.training_seed
    run = several.for_training_seed(2)
    assert (run.training_seed, run.data_seed, run.training_seeds) == (2, 7, [0, 2])
    assert several.model_dump() == run.model_dump()  # the profile is the same: the seed is the run's
    with pytest.raises(ValueError, match=r"5 is not a training seed of profile 'tiny'"):
        several.for_training_seed(5)
    # one seed: no seed level in the paths, so a run tracks run.training_seeds (a new seed reruns it); several: each
    # seed is its own job and path, and adding one must not rerun the others
    assert "run.training_seeds" in run_param_keys(cfg, "t-dht")
    assert not [k for k in run_param_keys(several, "t-dht") if k.startswith("run.")]


def test_one_seed_keeps_the_paths_several_get_a_level_each():
    assert run_subdir(tiny(), "sst2", "t-dht") == "sst2/t-dht"
    assert run_subdir(tiny([0, 2]), "sst2", "t-dht", 2) == "sst2/t-dht/seed-2"
    assert run_name(tiny([0, 2]), "t-dht", 2) == "t-dht/seed-2" and run_name(tiny([5]), "t-dht", 5) == "t-dht"
    with pytest.raises(ValueError, match="name the seed"):
        run_subdir(tiny([0, 2]), "sst2", "t-dht")


def test_aggregate_is_the_mean_and_the_sample_std():
    runs = {0: {"accuracy": 0.80, "accuracy_ci95": [0.7, 0.9], "infer_flop_ratio": 0.4, "n_test": 500, "tag": "x"},
            1: {"accuracy": 0.84, "accuracy_ci95": [0.7, 0.9], "infer_flop_ratio": 0.5, "n_test": 500, "tag": "y"},
            2: {"accuracy": 0.88, "accuracy_ci95": [0.7, 0.9], "infer_flop_ratio": 0.6, "n_test": 500, "tag": "z"}}
    m = aggregate(runs)
    assert m["accuracy"] == pytest.approx(0.84) and m["accuracy_std"] == pytest.approx(0.04)  # n - 1
    assert m["infer_flop_ratio_std"] == pytest.approx(0.1) and m["n_test_std"] == 0
    assert m["seeds"] == [0, 1, 2] and m["per_seed"]["2"] == {"accuracy": 0.88}
    assert "accuracy_ci95" not in m  # one run's interval is not the seeds' spread
    assert m["tag"] == "x"
    assert accuracy_text(m) == "0.840 ± 0.040 (3 seeds)"
    assert aggregate({0: runs[0]}) == runs[0] and accuracy_text(runs[0]) == "0.800 [0.700, 0.900]"


def write_metrics(root, cfg, dataset, model, seed, accuracy, flops):
    path = root / "results" / run_subdir(cfg, dataset, model, seed) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"accuracy": accuracy, "accuracy_ci95": [accuracy - 0.05, accuracy + 0.05],
                                "macro_f1": accuracy, "train_flop_ratio": flops, "infer_flop_ratio": flops,
                                "infer_flop_ratio_linear": flops, "infer_seconds": 1.0, "mean_layers": 6.0}))


def test_the_tables_show_mean_and_std_over_seeds(tmp_path):
    cfg = tiny([0, 1])
    models = ["vanilla-12", "t-dht"]
    for seed, (ref, dht, flops) in {0: (0.80, 0.70, 0.40), 1: (0.82, 0.76, 0.50)}.items():
        write_metrics(tmp_path, cfg, "embedded-news", "vanilla-12", seed, ref, 1.0)
        write_metrics(tmp_path, cfg, "embedded-news", "t-dht", seed, dht, flops)
    assert read_metrics(cfg, tmp_path, "embedded-news", "t-dht")["accuracy"] == pytest.approx(0.73)
    table = comparison_table(cfg, tmp_path, "embedded-news", models, "table2")
    assert "accuracy (micro-F1) (mean ± std over seeds)" in table
    row = next(line for line in table.splitlines() if line.startswith("| t-dht "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    std = math.sqrt(2 * 0.03**2)
    assert cells[2] == f"0.730 ± {std:.3f} (2 seeds)"
    assert cells[4] == "-0.080"  # against the reference's mean, 0.81
    assert cells[6] == f"0.45x ± {math.sqrt(2 * 0.05**2):.2f}"
    ref = next(line for line in table.splitlines() if line.startswith("| vanilla-12 "))
    assert "| 1.00x |" in ref  # a ratio without spread shows none
    # a seed's missing run names its file and the command
    (tmp_path / "results/embedded-news/t-dht/seed-1/metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"results/embedded-news/t-dht/seed-1/metrics.json: missing"):
        read_metrics(cfg, tmp_path, "embedded-news", "t-dht")
    assert result_file(cfg, tmp_path, "embedded-news", "t-dht", "metrics.json").parent.name == "seed-0"


N_PAIRED = 40


def write_seed_predictions(root, cfg, dataset, model, seed, wrong):
    """A predictions.csv of one seed's run: wrong on the samples `wrong`, right on the others."""
    label = np.arange(N_PAIRED) % 2
    pred = np.where(np.isin(np.arange(N_PAIRED), wrong), 1 - label, label)
    rows = [f"{i},{label[i]},{pred[i]},0.7,6,10" for i in range(N_PAIRED)]
    path = root / "results" / run_subdir(cfg, dataset, model, seed) / "predictions.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("index,label,pred,prob,layers,n_tokens\n" + "\n".join(rows) + "\n")


def two_seed_comparison(root, cfg):
    """Two seeds of the reference, t-dht and distil-3 on embedded-news, where pairing matters: t-dht's seed 0
    gets 4 samples right that the reference's seed 0 gets wrong; its seed 1 predicts as the reference's seed 1,
    which is wrong on other samples than seed 0's (pairing seed 1 with seed 0 would give another difference)."""
    wrong = {("vanilla-12", 0): list(range(10)), ("t-dht", 0): list(range(4, 10)),
             ("vanilla-12", 1): list(range(20, 28)), ("t-dht", 1): list(range(20, 28)),
             ("distil-3", 0): list(range(12)), ("distil-3", 1): list(range(30, 40))}
    for (model, seed), w in wrong.items():
        accuracy = 1 - len(w) / N_PAIRED
        write_metrics(root, cfg, "embedded-news", model, seed, accuracy, 0.3 if model == "distil-3" else 0.6)
        write_seed_predictions(root, cfg, "embedded-news", model, seed, w)


def test_several_seeds_pair_each_seeds_runs_and_report_the_difference_per_seed(tmp_path):
    from dht.comparison import compare_dataset
    from dht.report import paired_cells, settle_text

    raw = embedded_raw()
    raw["run"]["training_seeds"] = [0, 1]
    raw["profiles"]["tiny"]["run"] = {"models": ["vanilla-12", "t-dht"], "baselines": ["distil-3"], "control": None}
    cfg = load_config(ROOT / "params.yaml", profile="tiny", raw=raw)
    two_seed_comparison(tmp_path, cfg)
    paired = compare_dataset(cfg, tmp_path, "embedded-news")
    assert paired["seeds"] == [0, 1] and paired["n_test"] == N_PAIRED
    versus = paired["models"]["t-dht"]["vs_reference"]
    assert versus["per_seed"]["0"]["difference"] == pytest.approx(4 / N_PAIRED)
    assert (versus["per_seed"]["0"]["only_model"], versus["per_seed"]["0"]["only_other"]) == (4, 0)
    assert versus["per_seed"]["1"]["difference"] == 0 and versus["per_seed"]["1"]["p_value"] == 1
    assert versus["difference"] == pytest.approx(2 / N_PAIRED)
    assert versus["difference_std"] == pytest.approx(4 / N_PAIRED / math.sqrt(2), abs=1e-6)  # n - 1, 6 digits
    # the baseline is chosen once (mean accuracy and FLOPs over the seeds) and paired seed by seed
    best = paired["models"]["t-dht"]["vs_best_baseline"]
    assert best["against"] == "distil-3"
    assert best["per_seed"]["1"]["difference"] == pytest.approx((10 - 8) / N_PAIRED)
    diff, p, counts = paired_cells(versus)
    assert diff == f"+0.050 ± {4 / N_PAIRED / math.sqrt(2):.3f} (per seed: +0.100, +0.000)"
    assert p == "0.125, 1.000" and counts == "4 / 0, 0 / 0"
    text = settle_text(cfg, tmp_path, "embedded-news", paired)
    assert "across the 2 training seeds" in text and "t-dht 0.071" in text


def test_a_one_seed_report_quotes_the_seed_spread_of_a_seeds_run_when_present(tmp_path):
    """The main job (one seed) states what a run with several seeds measured on the same data, read from its
    paired-seeds.json when one is there, and says that none is otherwise."""
    from dht.comparison import compare_dataset
    from dht.report import settle_text
    from dht.results import paired_path, write_paired

    raw = embedded_raw()
    raw["profiles"]["tiny"]["run"] = {"models": ["vanilla-12", "t-dht"], "baselines": ["distil-3"], "control": None}
    one = load_config(ROOT / "params.yaml", profile="tiny", raw=raw)
    raw["run"]["training_seeds"] = [0, 1]
    several = load_config(ROOT / "params.yaml", profile="tiny", raw=raw)
    two_seed_comparison(tmp_path, several)
    for model, wrong in {"vanilla-12": range(10), "t-dht": range(6, 10), "distil-3": range(12)}.items():
        write_metrics(tmp_path, one, "embedded-news", model, 0, 1 - len(wrong) / N_PAIRED, 0.5)
        write_seed_predictions(tmp_path, one, "embedded-news", model, 0, list(wrong))
    mine = compare_dataset(one, tmp_path, "embedded-news")
    write_paired(tmp_path / paired_path(one, "embedded-news"), mine)
    assert paired_path(one, "embedded-news") == "results/embedded-news/paired.json"
    absent = settle_text(one, tmp_path, "embedded-news", mine)
    assert "no run with several seeds is present" in absent and "standard deviation" not in absent
    seeds_file = tmp_path / paired_path(several, "embedded-news")
    assert seeds_file.name == "paired-seeds.json"  # beside the one-seed file, not over it
    write_paired(seeds_file, compare_dataset(several, tmp_path, "embedded-news"))
    present = settle_text(one, tmp_path, "embedded-news", mine)
    assert "the run with seeds 0, 1 in `results/embedded-news/paired-seeds.json`" in present
    # the median over the models: t-dht 0.071, distil-3 0 (2 samples worse than the reference in either seed)
    assert f"standard deviation of {(4 / N_PAIRED / math.sqrt(2)) / 2:.3f}" in present
    assert "(t-dht 0.071, distil-3 0.000)" in present
    # a seeds run against another reference says nothing about this one
    other = json.loads(seeds_file.read_text())
    other["reference"] = "vanilla-6"
    seeds_file.write_text(json.dumps(other))
    assert "no run with several seeds is present" in settle_text(one, tmp_path, "embedded-news", mine)


def seeded_tiny(raw, seeds=(0, 1)):
    raw["profiles"]["tiny"].setdefault("run", {})["training_seeds"] = list(seeds)


def test_dry_run_trains_every_model_once_per_seed(project):
    set_params(project, seeded_tiny)
    proc = run_cli(["snakemake", "-n", "-p", "--cores", "1", "reports/table2.md", "--config", "profile=tiny"],
                   cwd=project)
    counts = job_counts(proc.stdout)
    cfg = load_config(project / "params.yaml", profile="tiny")
    n_data = len(cfg.run.datasets)
    assert counts["train"] == 2 * n_data * len(cfg.run.models)  # each model once per seed
    assert counts["baseline"] == 2 * n_data * len(cfg.run.baselines)
    assert counts["arm_features"] == n_data and counts["flexibert_search"] == n_data  # drawn once, with data_seed
    # one comparison per dataset over every seed's runs, beside a one-seed run's paired.json, not over it
    assert counts["compare"] == n_data and "--out results/embedded-news/paired-seeds.json " in proc.stdout
    out = proc.stdout
    assert "--model t-dht --training-seed 1 " in out and "--results results/embedded-news/t-dht/seed-1 " in out
    assert "--out-model models/embedded-news/t-dht/seed-1 " in out
    # each seed's baseline learns from the reference trained with the same seed
    assert ("--model distil-3 --training-seed 1 --processed data/processed/embedded-news "
            "--teacher models/embedded-news/vanilla-12/seed-1 ") in out
    # a seed that is not listed has no job
    none = run_cli(["snakemake", "-n", "--cores", "1", "results/embedded-news/t-dht/seed-7/metrics.json",
                    "--config", "profile=tiny"], cwd=project, check=False)
    assert none.returncode != 0
    # dvc.yaml follows: one stage per seed (the seed is an axis of the train matrix)
    run_cli(["dht", "dvc-yaml", "--profile", "tiny"], cwd=project)
    written = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert written["train"]["matrix"]["seed"] == ["0", "1"]
    stages = expand_dvc_stages(written)
    assert "train@embedded-news-t-dht-1" in stages
    assert "results/embedded-news/t-dht/seed-1/metrics.json" in stages["train@embedded-news-t-dht-1"]["metrics"]
    assert "--training-seed 1 " in stages["train@embedded-news-t-dht-1"]["cmd"]


@pytest.mark.slow
def test_two_seeds_train_two_different_runs_through_the_pipeline(tiny_project):
    """The real stages: two seeds of one fixed model on the tiny profile, each in its own directory, its own
    MLflow run and its own checkpoint directory, with training that differs (the seed reaches the trainer).
    The data and arm features come built (conftest.tiny_project): the seeds do not change them."""
    project = tiny_project
    set_params(project, seeded_tiny)
    targets = [f"results/embedded-news/vanilla-3/seed-{s}/loss.csv" for s in (0, 1)]
    run_cli(["snakemake", "--cores", "2", *targets, "--config", "profile=tiny"], cwd=project, timeout=900)
    losses = [(project / t).read_text() for t in targets]
    assert losses[0].splitlines()[0] == losses[1].splitlines()[0] == "step,epoch,loss,layers"
    assert losses[0] != losses[1]  # other batches, other dropout: other losses
    from test_pipeline import mlflow_runs

    runs = set(mlflow_runs(project))
    assert {("embedded-news", "vanilla-3/seed-0"), ("embedded-news", "vanilla-3/seed-1")} <= runs
    assert (project / "models/embedded-news/vanilla-3/seed-1/model.safetensors").is_file()
    # a model of a profile with several seeds loads as its own seed's run (its saved config lists them all)
    (project / "texts.txt").write_text("a text about the market\n")
    answer = run_cli(["dht", "predict", "--model", "models/embedded-news/vanilla-3/seed-1", "--input", "texts.txt",
                      "--format", "jsonl"], cwd=project).stdout.strip().splitlines()
    assert len(answer) == 1 and json.loads(answer[0])["layers"] == 3
    policy_file = json.loads((project / "models/embedded-news/vanilla-3/seed-1/dht_policy.json").read_text())
    assert policy_file["training_seed"] == 1
    # a seed outside run.training_seeds is refused by the stage itself, before any work
    bad = run_cli(["python", "workflow/scripts/train.py", "--profile", "tiny", "--dataset", "embedded-news",
                   "--model", "vanilla-3", "--training-seed", "9", "--processed", "x", "--features", "x", "--results", "x",
                   "--out-model", "x"], cwd=project, check=False)
    assert bad.returncode != 0 and "--training-seed 9 is not a training seed" in bad.stderr


def test_a_saved_models_training_seed_comes_from_its_file_then_its_directory(tmp_path):
    from dht.trainer import _saved_training_seed

    assert _saved_training_seed({"training_seed": 2}, tmp_path / "seed-0", [0, 1, 2]) == 2
    assert _saved_training_seed({}, tmp_path / "seed-1", [0, 1, 2]) == 1  # saved before the key: the layout
    assert _saved_training_seed({}, tmp_path / "t-dht", [3, 4]) == 3

