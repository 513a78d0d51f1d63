"""Studies (workflow/studies.yaml, dht.studies, dht.study_report, workflow/rules/studies.smk): named overlays of a
profile, trained by the pipeline's own train stage on the validation split, tracked in MLflow, rerun when their
overlay or code changes, summarised by the report code. The slow test runs a tiny study through Snakemake with the
arguments the rules pass; the others check the file's validation and the selection rule on runs written here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, TINY_DATASET, run_cli

from dht.config import ConfigError
from dht.config_loading import load_config
from dht.evaluation import SplitData, read_predictions
from dht.studies import STUDIES_FILE, Run, load_studies, resolve_study
from dht.study_report import LADDER, run_dir, select, summary
from dht.tokenization import load_processed

N_VAL, N_TEST = 32, 96  # the tiny profile's embedded-news validation and test splits (tests/test_validation.py)


def write_studies(path: Path, overlays: dict, studies: dict) -> Path:
    path.write_text(yaml.safe_dump({"overlays": {"default": {}, **overlays}, "studies": studies}, sort_keys=False))
    return path


def study(settings: list[str], profile: str = "default", **extra) -> dict:
    return {"about": "A test.", "profile": profile, "models": ["t-dht"], "settings": settings, **extra}


# --- the file: validated before any job ---------------------------------------------------------------------


def test_the_projects_studies_file_is_valid_and_lists_the_selection_studys_runs():
    """Every study of workflow/studies.yaml resolves on its profile; the selection study is the six T-DHT settings
    of docs/real-text.md section 4 plus the default's reference and control, on both datasets (16 runs)."""
    studies = load_studies(ROOT / STUDIES_FILE)
    for name, s in studies.studies.items():
        resolve_study(studies, name, ROOT / "params.yaml")
        assert s.profile
    sel = resolve_study(studies, "selection", ROOT / "params.yaml")
    runs = sel.runs()
    assert len(runs) == 16 and len(set(runs)) == 16
    assert {r.model for r in runs if r.setting == "default"} == {"vanilla-6", "vanilla-2", "t-dht"}
    assert {r.model for r in runs if r.setting != "default"} == {"t-dht"}
    # an overlay is applied: the chosen setting's T-DHT is t-dht-val of params.yaml, key for key
    cfg = sel.configs["path-exits+all-depths+difference+error-probability+memory-epoch+price-0.04"]
    mode, val = cfg.dht.modes["t-dht"], cfg.dht.modes["t-dht-val"]
    assert mode.exit_loss == val.exit_loss == "path" and mode.depth_memory == val.depth_memory == "epoch"
    assert cfg.dht.bandits.depth_price == 0.04 and cfg.dht.bandits.depth_loss == "error_probability"
    assert sel.starts_from_reference(Run("init-reference+path-exits", "sst2", "t-dht"))
    assert not sel.starts_from_reference(Run("default", "sst2", "t-dht"))


@pytest.mark.parametrize(("overlays", "settings", "expected"), [
    ({"typo": {"dht": {"bandits": {"ucb_alphaa": 1.0}}}}, ["default", "typo"], "dht.bandits.ucb_alphaa"),
    ({"bad": {"train": {"epochs": 0}}}, ["default", "bad"], "train.epochs"),
    ({"x": {}}, ["default", "x+missing"], "unknown overlay 'missing'"),
    ({"x": {}}, ["x"], "must list 'default'"),
    ({"../evil": {}}, ["default", "../evil"], "not a valid name"),
    ({"more-data": {"data": {"val_fraction": 0.2}}}, ["default", "more-data"], "changes data"),
])
def test_a_bad_overlay_or_setting_fails_with_the_key_named(tmp_path, overlays, settings, expected):
    path = write_studies(tmp_path / "studies.yaml", overlays, {"s": study(settings)})
    with pytest.raises(ConfigError, match=re.escape(expected)):
        resolve_study(load_studies(path), "s", ROOT / "params.yaml")


def test_a_study_runs_on_its_own_profile_only(tmp_path):
    path = write_studies(tmp_path / "studies.yaml", {}, {"s": study(["default"], profile="tiny")})
    with pytest.raises(ConfigError, match="--config profile=tiny"):
        resolve_study(load_studies(path), "s", ROOT / "params.yaml", profile=load_config(ROOT / "params.yaml"))


# --- the tables: read the validation split only -------------------------------------------------------------


def _val_run(root: Path, run: Run, accuracy: float, flops: float, split: str = "val") -> None:
    d = run_dir(root, run)
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"accuracy": accuracy, "infer_flop_ratio": flops, "split": split}))


def test_the_selection_reads_validation_runs_only_and_keeps_to_the_flop_budget(tmp_path):
    """The select rule (dht.study_report.select): the setting furthest above the control-reference line on the
    validation split, among those within the budget on every dataset; a missing run makes its setting ineligible,
    and a run scored on the test split is refused, never read."""
    names = ["deep", "near-line", "above", "missing"]
    path = write_studies(tmp_path / "studies.yaml", {n: {} for n in names},
                         {"s": study(["default", *names], select={"model": "t-dht", "flop_budget": 0.6})})
    resolved = resolve_study(load_studies(path), "s", ROOT / "params.yaml")
    root = tmp_path / "results"
    for dataset in resolved.datasets:
        _val_run(root, Run("default", dataset, "vanilla-6"), 0.90, 1.0)
        _val_run(root, Run("default", dataset, "vanilla-2"), 0.80, 1 / 3)
        _val_run(root, Run("deep", dataset, "t-dht"), 0.95, 0.9)        # most accurate, over the budget
        _val_run(root, Run("near-line", dataset, "t-dht"), 0.82, 0.4)   # within, just above the line
        _val_run(root, Run("above", dataset, "t-dht"), 0.86, 0.5)       # within, furthest above it
    chosen, table = select(resolved, root)
    assert chosen == "above"
    assert any(row.startswith("| missing | not run") for row in table)
    assert any(row.startswith("| deep |") and row.endswith("| no |") for row in table)
    # a metrics.json of the test split (no "split": "val") is an error naming the split, not a row
    (run_dir(root, Run("above", resolved.datasets[0], "t-dht")) / "metrics.json").write_text(
        json.dumps({"accuracy": 0.99, "infer_flop_ratio": 0.34, "split": "test"}))
    with pytest.raises(ValueError, match="validation split"):
        select(resolved, root)


# --- through Snakemake, on the tiny profile --------------------------------------------------------------------

TARGETS = [f"reports/studies/tiny/{t}.md" for t in ("summary", "selection", "ladder")]


def _dry_outputs(project: Path, rule: str) -> list[str]:
    """The first output (a run's metrics.json, a table) of each of `rule`'s jobs that a dry run would run now."""
    out = run_cli(["snakemake", "-n", "--cores", "1", *TARGETS, "--config", "profile=tiny"], cwd=project).stdout
    found, current = [], None
    for line in out.splitlines():
        head = line.strip()
        if re.fullmatch(r"(local)?rule \S+:", head):
            current = head.split()[-1].rstrip(":")
        elif head.startswith("output:") and current == rule:
            found.append(head.removeprefix("output:").split(",")[0].strip())
    return sorted(found)


@pytest.mark.slow
def test_a_study_runs_through_snakemake_on_the_validation_split_tracked_and_rerun_on_change(tiny_project):
    project = tiny_project
    params = project / "params.yaml"
    studies = yaml.safe_load((project / STUDIES_FILE).read_text())
    studies["studies"] = {"tiny": {
        "about": "Two settings of the tiny profile.", "profile": "tiny", "datasets": [TINY_DATASET],
        "models": ["t-dht"], "settings": ["default", "ucb_alpha-3"],
        "select": {"model": "t-dht", "flop_budget": 1.0}, "ladder": True}}
    (project / STUDIES_FILE).write_text(yaml.safe_dump(studies, sort_keys=False))

    run_cli(["snakemake", "--cores", "2", *TARGETS, "--config", "profile=tiny"], cwd=project, timeout=1200)

    # every run scored on the validation split, by the train stage's own script
    root = project / "results/studies/tiny"
    val = SplitData.from_arrays(load_processed(project / "data/processed" / TINY_DATASET, "val"))
    assert len(val) == N_VAL != N_TEST
    runs = [Run("default", TINY_DATASET, m) for m in ("vanilla-12", "vanilla-3", "t-dht")] + [
        Run("ucb_alpha-3", TINY_DATASET, "t-dht")]
    for run in runs:
        metrics = json.loads((run_dir(root, run) / "metrics.json").read_text())
        assert metrics["split"] == "val" and metrics["n_val"] == N_VAL and "n_test" not in metrics, run
        assert metrics["setting"] == run.setting and metrics["study"] == "tiny"
        predictions = read_predictions(run_dir(root, run) / "predictions.csv")
        assert np.array_equal(predictions.label, val.labels.numpy())
        assert metrics["accuracy"] == pytest.approx(predictions.correct.mean(), abs=1e-6)
        assert (project / "models/studies/tiny" / run.setting / run.dataset / run.model / "dht_policy.json").is_file()
    assert json.loads((run_dir(root, runs[-1]) / "metrics.json").read_text())["overlay"] == {
        "dht": {"bandits": {"ucb_alpha": 3.0}}}
    ladder = np.load(run_dir(root, runs[-1]) / LADDER)
    assert np.array_equal(ladder["label"], val.labels.numpy()) and ladder["probs"].shape[0] == N_VAL
    assert not (run_dir(root, runs[0]) / LADDER).exists()  # a fixed model has one exit

    # the tables: the summary's rows are the runs', as dht.study_report computes them from these files
    resolved = resolve_study(load_studies(project / STUDIES_FILE), "tiny", params)
    written = (project / "reports/studies/tiny/summary.md").read_text()
    assert written == summary(resolved, root) + "\n"
    assert "| ucb_alpha-3 | t-dht |" in written and "| default | t-dht |" in written
    assert "Chosen: " in (project / "reports/studies/tiny/selection.md").read_text()
    assert "| ucb_alpha-3 | t-dht |" in (project / "reports/studies/tiny/ladder.md").read_text()

    # MLflow: one experiment per study, the overlay among the params, tags study and setting
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"{TINY_DATASET}.study.tiny")
    found = {(r.data.tags["setting"], r.data.params["model_name"]): r
             for r in client.search_runs([exp.experiment_id])}
    assert set(found) == {(r.setting, r.model) for r in runs}
    lever = found[("ucb_alpha-3", "t-dht")]
    assert "validation accuracy" in lever.data.tags["mlflow.note.content"]
    assert lever.data.tags["study"] == "tiny" and lever.data.params["overlay.dht.bandits.ucb_alpha"] == "3.0"
    assert lever.data.params["dht.bandits.ucb_alpha"] == "3.0"
    assert found[("default", "t-dht")].data.params["dht.bandits.ucb_alpha"] != "3.0"
    assert lever.data.metrics["Summary/accuracy"] == pytest.approx(
        json.loads((run_dir(root, runs[-1]) / "metrics.json").read_text())["accuracy"])
    assert client.get_experiment_by_name(TINY_DATASET) is None  # the pipeline's own experiment is not touched

    # nothing left to do; the study's own code (which resolves the overlays, not what a run computes) rewrites
    # the tables only; a changed overlay reruns that setting's jobs, nothing else
    assert _dry_outputs(project, "study_train") == [] and _dry_outputs(project, "study_report") == []
    code = project / "dht/studies.py"
    code.write_text(code.read_text() + "\n# changed\n")
    assert _dry_outputs(project, "study_train") == []
    assert _dry_outputs(project, "study_report") == sorted(TARGETS)
    studies["overlays"]["ucb_alpha-3"] = {"dht": {"bandits": {"ucb_alpha": 2.0}}}
    (project / STUDIES_FILE).write_text(yaml.safe_dump(studies, sort_keys=False))
    assert _dry_outputs(project, "study_train") == [f"results/studies/tiny/ucb_alpha-3/{TINY_DATASET}/t-dht/metrics.json"]
    # a change to the code a run imports (the training loop) reruns every run
    code = project / "dht/trainer.py"
    code.write_text(code.read_text() + "\n# changed\n")
    assert _dry_outputs(project, "study_train") == sorted(f"{run_dir('results/studies/tiny', r)}/metrics.json"
                                                          for r in runs)

    # a typo in an overlay, or a setting naming no overlay: the run stops before any job, naming the problem
    for overlay, setting, expected in (({"dht": {"bandits": {"ucb_alfa": 2.0}}}, "ucb_alpha-3", "dht.bandits.ucb_alfa"),
                                       ({"dht": {"bandits": {"ucb_alpha": 2.0}}}, "ucb_alpha-3+nope", "'nope'")):
        bad = json.loads(json.dumps(studies))
        bad["overlays"]["ucb_alpha-3"] = overlay
        bad["studies"]["tiny"]["settings"] = ["default", setting]
        (project / STUDIES_FILE).write_text(yaml.safe_dump(bad, sort_keys=False))
        proc = run_cli(["snakemake", "--cores", "1", *TARGETS, "--config", "profile=tiny"], cwd=project, check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "invalid studies file" in output and expected in output, output[-2000:]
        assert "rule study_train" not in output
