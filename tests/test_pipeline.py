"""The pipeline as a user runs it: Snakemake (dry and real, in a throw-away copy of the project), dvc.yaml
generated from it, DVC on the same stages, and MLflow receiving every run."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import run_cli


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table as {rule: count}."""
    lines = output.split("Job stats:")[1].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def set_params(project: Path, edit) -> None:
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_dvc_yaml_is_generated_from_the_current_workflow(project):
    """Fails when dvc.yaml and the Snakefile disagree: regenerate with `dht dvc-yaml`."""
    proc = run_cli(["dht", "dvc-yaml", "--check"], cwd=project, check=False)
    assert proc.returncode == 0, proc.stderr


def test_drift_between_snakefile_and_dvc_yaml_is_detected(project):
    rules = project / "workflow" / "rules" / "report.smk"
    text = rules.read_text()
    assert 'tracked("run"' in text
    rules.write_text(text.replace('tracked("run"', 'tracked("seed", "run"'))
    proc = run_cli(["dht", "dvc-yaml", "--check"], cwd=project, check=False)
    assert proc.returncode == 1 and "out of date" in proc.stderr
    run_cli(["dht", "dvc-yaml"], cwd=project)
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert "seed" in stages["table1"]["params"]


def test_dvc_stages_mirror_snakemake_jobs(project):
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    names = list(stages)
    assert names[:6] == ["download-embedded-news", "download-embedded-sentiment", "tokenize-embedded-news",
                         "tokenize-embedded-sentiment", "arm_features-embedded-news", "arm_features-embedded-sentiment"]
    assert names[-2:] == ["table1", "table2"] and len(names) == 6 + 10 + 18 + 2
    assert {f"train-{d}-{m}" for d in ("embedded-news", "embedded-sentiment")
            for m in ("vanilla-12", "t-dht", "s-dht", "f-dht", "p-dht")} == set(names[6:16])
    assert "baseline-embedded-news-distil-3" in names and "baseline-embedded-sentiment-nas-prune-0.75" in names
    base = stages["baseline-embedded-news-fastbert-0.8"]
    assert "models/embedded-news/vanilla-12" in base["deps"] and "dht/baselines/fastbert.py" in base["deps"]
    train = stages["train-embedded-news-p-dht"]
    assert "dht.modes.p-dht" in train["params"] and "dht.modes.f-dht" in train["params"]  # its warm-up mode
    assert "models/embedded-news/p-dht" in train["outs"]
    assert train["metrics"] == [{"results/embedded-news/p-dht/metrics.json": {"cache": False}}]
    assert list(train["plots"][0]) == ["results/embedded-news/p-dht/loss.csv"]
    assert stages["arm_features-embedded-news"]["cmd"].endswith("--threads 1")  # the rule's threads
    tok = stages["tokenize-embedded-news"]
    assert tok["cmd"].startswith("python workflow/scripts/tokenize_data.py --profile ${profile} ")
    assert "data/raw/embedded-news/train.parquet" in tok["deps"] and "dht/tokenization.py" in tok["deps"]
    assert tok["params"] == ["profile", "tokenizer", "datasets.embedded-news", "profiles.${profile}"]
    assert "data/processed/embedded-news/tokenizer" in tok["outs"]


def test_dry_run_of_table1(project):
    proc = run_cli(["snakemake", "-n", "--cores", "1", "reports/table1.md"], cwd=project)
    assert job_counts(proc.stdout) == {"download": 2, "tokenize": 2, "arm_features": 2, "train": 10, "table1": 1}
    one = run_cli(["snakemake", "-n", "--cores", "1", "results/embedded-news/t-dht/metrics.json"], cwd=project)
    assert job_counts(one.stdout) == {"download": 1, "tokenize": 1, "arm_features": 1, "train": 1}
    base = run_cli(["snakemake", "-n", "--cores", "1", "results/embedded-news/distil-6/metrics.json"], cwd=project)
    assert job_counts(base.stdout) == {"download": 1, "tokenize": 1, "arm_features": 1, "train": 1, "baseline": 1}
    everything = run_cli(["snakemake", "-n", "--cores", "1"], cwd=project)
    assert job_counts(everything.stdout)["baseline"] == 18 and job_counts(everything.stdout)["table2"] == 1


def test_bad_params_fail_before_any_job(project):
    set_params(project, lambda r: r["dht"]["modes"]["t-dht"].__setitem__("layers", [3, 4]))
    proc = run_cli(["snakemake", "-n", "--cores", "1", "reports/table1.md"], cwd=project, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "dht.modes.t-dht.layers[1] = 4: (L - b) must be a multiple of c" in out
    assert not (project / "data").exists()


def test_only_profile_can_be_overridden_on_the_command_line(project):
    proc = run_cli(["snakemake", "-n", "--cores", "1", "--config", "seed=3"], cwd=project, check=False)
    assert proc.returncode != 0 and "--config seed: only `profile` can be set" in proc.stdout + proc.stderr
    bad = run_cli(["snakemake", "-n", "--cores", "1", "--config", "profile=huge"], cwd=project, check=False)
    assert bad.returncode != 0 and "profile = 'huge': unknown profile" in bad.stdout + bad.stderr


def mlflow_runs(project: Path) -> list[tuple[str, str]]:
    """(experiment, run name) of every run in the project's MLflow store."""
    with sqlite3.connect(project / "mlflow.db") as db:
        return db.execute(
            "SELECT e.name, r.name FROM runs r JOIN experiments e USING (experiment_id) ORDER BY e.name, r.name"
        ).fetchall()


@pytest.mark.slow
def test_tokenization_stage_runs_through_snakemake(project):
    run_cli(["snakemake", "--cores", "2", "data/processed/embedded-news/meta.json", "--config", "profile=tiny"],
            cwd=project)
    meta = json.loads((project / "data/processed/embedded-news/meta.json").read_text())
    assert meta["splits"]["train"]["n"] == 320 and meta["max_length"] == 40 and meta["num_labels"] == 4
    assert (project / "data/processed/embedded-news/tokenizer/tokenizer.json").is_file()
    assert ("embedded-news", "tokenize") in mlflow_runs(project)
    assert not (project / "data/processed/embedded-sentiment").exists()  # only what was asked for


@pytest.mark.slow
def test_end_to_end_tiny_then_noop(project):
    proc = run_cli(["snakemake", "--cores", "2", "--config", "profile=tiny"], cwd=project)
    table = (project / "reports/table1.md").read_text()
    assert "Profile `tiny`" in table
    assert "| embedded-news | embedded | 4 | 320 | 96 | 40 |" in table
    assert "| embedded-sentiment | embedded | 2 | 320 | 96 | 40 |" in table
    runs = set(mlflow_runs(project))
    for dataset in ("embedded-news", "embedded-sentiment"):
        for run in ("tokenize", "arm_features", "vanilla-12", "t-dht", "s-dht", "f-dht", "p-dht",
                    "distil-3", "fastbert-0.5", "nas-prune-0.5"):
            assert (dataset, run) in runs
    for baseline in ("distil-3", "fastbert-0.5", "nas-prune-0.5"):  # the DHT runs' metrics schema
        m = json.loads((project / f"results/embedded-news/{baseline}/metrics.json").read_text())
        assert {"accuracy", "macro_f1", "train_flop_ratio", "infer_flop_ratio", "infer_flop_ratio_linear",
                "mean_layers", "n_test", "accuracy_hard"} <= set(m)
    distil = json.loads((project / "results/embedded-news/distil-3/metrics.json").read_text())
    assert distil["mean_layers"] == 3 and 0.24 < distil["infer_flop_ratio"] < 0.27
    metrics = json.loads((project / "results/embedded-news/t-dht/metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "train_flop_ratio", "infer_flop_ratio", "infer_flop_ratio_linear",
                "mean_layers", "mean_heads", "train_seconds", "infer_seconds", "n_test", "accuracy_hard",
                "mean_layers_easy"):
        assert key in metrics
    assert metrics["n_test"] == 96 and 0 < metrics["infer_flop_ratio"] <= 1
    assert "| t-dht |" in table and "| vanilla-12 | " in table and "## The paper's Table 1" in table
    table2 = (project / "reports/table2.md").read_text()
    for model in ("vanilla-12", "distil-3", "fastbert-0.5", "nas-prune-0.5", "t-dht", "p-dht"):
        assert f"| {model} |" in table2
    predicted = run_cli(["dht", "predict", "--model", "models/embedded-news/t-dht", "--format", "jsonl",
                         "--input", "data/raw/embedded-news/meta.json"], cwd=project)
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert rows and all(r["label"] in ("world", "sports", "business", "scitech") and r["layers"] in (3, 6, 9, 12)
                        for r in rows)
    assert not (project / "checkpoints/embedded-news/t-dht/checkpoint.pt").exists()  # removed once done
    from dht.arm_features import load_arm_features

    feats = load_arm_features(project / "data/features/embedded-news")
    assert feats["ucb_l/3"].shape == (84,) and feats["ucb_h/8"].shape == (42,) and "ucb_cp/4L8H+2L12H" in feats
    assert (project / "data/features/embedded-news/init_model/config.json").is_file()
    again = run_cli(["snakemake", "-n", "--cores", "2", "--config", "profile=tiny"], cwd=project)
    assert "Nothing to be done" in again.stdout + again.stderr, proc.stdout[-2000:]
    # a changed parameter reruns exactly the jobs that read it
    set_params(project, lambda r: r["profiles"]["tiny"]["tokenizer"].__setitem__("vocab_size", 500))
    changed = run_cli(["snakemake", "-n", "--cores", "2", "--config", "profile=tiny"], cwd=project)
    assert job_counts(changed.stdout) == {"tokenize": 2, "arm_features": 2, "train": 10, "baseline": 6, "table1": 1,
                                          "table2": 1, "all": 1}


@pytest.mark.slow
def test_a_user_adds_a_local_zhang_csv_dataset(project):
    from test_data import AG_TEST, AG_TRAIN, write

    write(project / "data/external/agcsv/train.csv", AG_TRAIN * 10)
    write(project / "data/external/agcsv/test.csv", AG_TEST * 5)
    write(project / "data/external/agcsv/classes.txt", "World\nSports\nBusiness\nSci/Tech\n")

    def add(raw):
        raw["datasets"]["agcsv"] = {"source": "csv", "path": "data/external/agcsv", "fields": ["title", "description"],
                                    "max_length": 32}
        raw["run"]["datasets"] = ["agcsv"]
    set_params(project, add)
    run_cli(["snakemake", "--cores", "2", "data/processed/agcsv/meta.json"], cwd=project)
    meta = json.loads((project / "data/processed/agcsv/meta.json").read_text())
    assert meta["classes"] == ["World", "Sports", "Business", "Sci/Tech"]
    assert meta["splits"]["train"]["n"] == 40 and meta["splits"]["train"]["label_counts"] == [10, 10, 10, 10]


@pytest.mark.slow
def test_a_missing_csv_dataset_fails_with_a_clear_error(project):
    def add(raw):
        raw["datasets"]["mine"] = {"source": "csv", "path": "data/external/mine", "fields": ["text"], "max_length": 32}
        raw["run"]["datasets"] = ["mine"]
    set_params(project, add)
    proc = run_cli(["snakemake", "--cores", "1", "data/raw/mine/meta.json"], cwd=project, check=False)
    assert proc.returncode != 0
    assert "dataset 'mine': data/external/mine: no such directory" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_repro_runs_the_same_stages_on_the_tiny_profile(project):
    """DVC runs the generated stages (here up to one dataset's arm features; the full DAG is the same
    commands, checked by test_dvc_stages_mirror_snakemake_jobs)."""
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    set_params(project, lambda r: r.__setitem__("profile", "tiny"))
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=project, check=True)
    run_cli(["dvc", "repro", "arm_features-embedded-news"], cwd=project)
    assert (project / "data/features/embedded-news/arm_features.safetensors").is_file()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["tokenize-embedded-news"]["params"]["params.yaml"]["profile"] == "tiny"
    assert set(lock["stages"]) == {"download-embedded-news", "tokenize-embedded-news", "arm_features-embedded-news"}
    assert "up to date" in run_cli(["dvc", "status", "arm_features-embedded-news"], cwd=project).stdout
    metrics = json.loads((project / "data/processed/embedded-news/meta.json").read_text())
    assert metrics["splits"]["train"]["n"] == 320


@pytest.mark.slow
def test_a_killed_training_resumes_when_rerun_and_ends_with_the_same_metrics(project):
    import os
    import signal
    import time

    from conftest import BIN

    def tiny(raw):
        raw["profiles"]["tiny"]["train"].update({"epochs": 3, "checkpoint_every": 2})
    set_params(project, tiny)
    target = "results/embedded-news/f-dht/metrics.json"
    run_cli(["snakemake", "--cores", "2", "data/features/embedded-news/meta.json", "--config", "profile=tiny"], cwd=project)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DHT_NO_PROGRESS="1")
    proc = subprocess.Popen([str(BIN / "snakemake"), "--cores", "1", target, "--config", "profile=tiny"], cwd=project,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = project / "checkpoints/embedded-news/f-dht/checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists():
        assert proc.poll() is None, "training ended before a checkpoint was seen"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill: no cleanup runs
    proc.wait()
    assert not (project / target).exists()

    # what a user does after a kill: release Snakemake's lock, rerun the incomplete job
    run_cli(["snakemake", "--unlock", target, "--config", "profile=tiny"], cwd=project)
    rerun = run_cli(["snakemake", "--cores", "1", "--rerun-incomplete", target, "--config", "profile=tiny"], cwd=project)
    assert "f-dht: resuming at epoch" in rerun.stdout + rerun.stderr
    assert not checkpoint.exists()

    def timeless(path):
        m = json.loads(path.read_text())
        return {k: v for k, v in m.items() if not k.endswith("_seconds")}

    resumed = timeless(project / target)
    run_cli(["snakemake", "--cores", "1", "--forcerun", "train", target, "--config", "profile=tiny"], cwd=project)
    assert timeless(project / target) == resumed  # same seed, uninterrupted: identical metrics.json


def test_a_device_that_is_not_there_is_a_clear_error(project):
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error cannot happen here")
    set_params(project, lambda r: r.__setitem__("device", "cuda"))
    proc = subprocess.run([sys.executable, "workflow/scripts/arm_features.py", "--dataset", "embedded-news",
                           "--processed", "data/processed/embedded-news", "--out", "data/features/embedded-news"],
                          cwd=project, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "error: device = 'cuda' but no CUDA device is available here; set `device: auto`" in proc.stderr
    assert "Traceback" not in proc.stderr
