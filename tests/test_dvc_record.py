"""A Snakemake run recorded in DVC (`dht dvc-record`, which `make reproduce` runs): when DVC can version a run at
all, dvc.yaml's plots, and the end-to-end round trip on the tiny profile's whole DAG (:func:`record_and_round_trip`,
run by tests/test_pipeline.py's end-to-end test on its own Snakemake run rather than by a second full run)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import yaml
from conftest import ROOT, run_cli

GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
# README's `dvc exp show`: the params set in params.yaml that differ between the rows, with the accuracy and FLOP
# ratios that moved, instead of DVC's 600 columns of every metric, dependency and key of the resolved profile.
EXP_SHOW_DROP = r"^(?!Experiment$|params\.yaml:|.*metrics\.json:(accuracy|infer_flop_ratio|train_flop_ratio)$)"


def git_commit(project: Path, message: str) -> None:
    subprocess.run([*GIT, "add", "-A"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=project, check=True)


def set_profile(project: Path, profile: str) -> None:
    from test_pipeline import set_params

    set_params(project, lambda raw: raw.__setitem__("profile", profile))


def test_dvc_plots_are_the_runs_figures_as_images():
    """`dvc plots show` draws the figures stage's images (one per dataset and kind, titled in the image by its
    dataset, a line per model) and the FlexiBERT search's: DVC's page then loads no plotting library from a CDN.
    Each model's loss.csv is an ordinary cached output, no longer one Vega chart per file under one title."""
    from dht.config_loading import load_config
    from dht.figures import figure_paths
    from dht_workflow.dvc_params import expand_dvc_stages

    stages = expand_dvc_stages(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    plots = [p for body in stages.values() for p in body.get("plots", [])]
    assert all(isinstance(p, str) and p.endswith(".png") for p in plots), plots  # images, no Vega properties
    cfg = load_config(ROOT / "params.yaml")
    assert set(figure_paths(cfg)) | {f"results/{d}/flexibert-search/search.png" for d in cfg.run.datasets} == set(plots)
    assert "reports/figures/loss-sst2.png" in stages["figures"]["plots"]
    assert "results/sst2/t-dht/loss.csv" in stages["train@sst2-t-dht"]["outs"]


def test_a_run_dvc_cannot_version_is_refused_with_the_steps_that_make_it_recordable(project):
    """Checked before anything is recorded: a git repository, the run's profile being the one DVC runs
    (params.yaml's), dvc.yaml listing that profile's stages and current with the workflow. `--optional` (make
    reproduce) turns the first three into a note and exit 0; a stale dvc.yaml stays an error. (A run that passes
    them is recorded in record_and_round_trip.)"""

    def record(*args):
        return run_cli(["dht", "dvc-record", *args], cwd=project, check=False)

    no_git = record()
    assert no_git.returncode == 1 and "is not in a git repository" in no_git.stderr and "git init" in no_git.stderr
    optional = record("--optional")
    assert optional.returncode == 0 and "note: the run is not recorded in DVC" in optional.stdout
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)

    other = record("--profile", "tiny")  # make reproduce PROFILE=tiny beside params.yaml's profile: default
    assert other.returncode == 1
    assert ("this is a run of profile tiny, but DVC runs params.yaml's `profile: default`" in other.stderr
            and "set `profile: tiny` in params.yaml, `dht dvc-yaml --profile tiny`, then `dht dvc-record`"
            in other.stderr), other.stderr

    set_profile(project, "tiny")  # ... and dvc.yaml still lists the default profile's datasets
    listed = record("--optional")
    assert listed.returncode == 0 and "dvc.yaml lists the stages of profile default, not of tiny" in listed.stdout

    run_cli(["dht", "dvc-yaml", "--profile", "tiny"], cwd=project)
    path = project / "dvc.yaml"
    path.write_text(path.read_text().replace("--threads 1", "--threads 3", 1))  # edited by hand
    stale = record("--optional")
    assert stale.returncode == 1
    assert "dvc.yaml is out of date with the Snakemake workflow: `dht dvc-yaml --profile tiny`" in stale.stderr


def test_make_reproduce_records_the_whole_dag_only():
    """`make reproduce` ends with the record (optional: a run DVC cannot version is said, not failed); a partial
    TARGET is not recorded, since `dvc status` could not be clean."""
    def dry(*args):
        return subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), "reproduce", *args], capture_output=True, text=True,
                              check=True).stdout.splitlines()

    full = dry("PROFILE=tiny")
    run = next(i for i, line in enumerate(full) if "snakemake --workflow-profile" in line)
    assert full[run + 1].endswith("dht dvc-record --profile tiny --optional")
    partial = dry("TARGET=reports/table1.md")
    assert not any("dvc-record --profile" in line for line in partial) and "not recorded in DVC" in partial[-1]


def _files(root: Path, outs: list[str]) -> dict[str, str]:
    """sha256 of every file of `outs` (files or directories) under `root`, by path; Snakemake's marker left out."""
    found = {}
    for out in outs:
        path = root / out
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file() and f.name != ".snakemake_timestamp":
                found[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


def record_and_round_trip(project: Path, tmp: Path, datasets: list[str], bandit_modes: list[str]) -> None:
    """After Snakemake ran the tiny profile's whole DAG in `project` (params.yaml's `profile: tiny`): `dht
    dvc-record` makes `dvc status` clean without disturbing Snakemake; a changed bandit parameter marks exactly the
    trainings of the DHT modes with a bandit (`bandit_modes`) in DVC, the jobs Snakemake finds its params changed for; `dvc exp show` with README's
    columns shows that one param; `dvc plots show` writes a page that loads nothing from the network; and `dvc push`
    to a local remote, then `git clone`, `dvc pull` and `dht sync-snakemake` give back every output byte for byte
    with nothing for Snakemake or DVC to rerun."""
    from test_pipeline import set_params, summary

    from dht_workflow.dvc_params import expand_dvc_stages
    from dht_workflow.dvc_yaml import PARAMS_STAGE

    run_cli(["dht", "dvc-yaml", "--profile", "tiny"], cwd=project)  # the tiny profile's datasets
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    git_commit(project, "the project")
    recorded = run_cli(["dht", "dvc-record"], cwd=project)
    assert "`dvc status` is clean" in recorded.stdout
    assert json.loads(run_cli(["dvc", "status", "--json"], cwd=project).stdout) == {}
    dry = run_cli(["snakemake", "-n", "--cores", "1"], cwd=project)
    assert "Nothing to be done" in dry.stdout + dry.stderr  # the record rewrote no output
    stages = expand_dvc_stages(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(stages)
    git_commit(project, "the run, recorded")

    # a bandit parameter: DVC names exactly the stages that read it, as Snakemake does
    stage_of = {out: name for name, body in stages.items()
                for out in [*body.get("outs", []), *body.get("metrics", []), *body.get("plots", [])]}
    saved = {name: (project / name).read_bytes() for name in ("params.yaml", "params.resolved.yaml", "dvc.lock")}
    set_params(project, lambda raw: raw["dht"]["bandits"].__setitem__("ucb_alpha", 2.0))
    assert set(json.loads(run_cli(["dvc", "status", "--json"], cwd=project).stdout)) == {PARAMS_STAGE}
    run_cli(["dvc", "repro", "--single-item", PARAMS_STAGE], cwd=project)  # README: resolve, then dvc status
    stale = set(json.loads(run_cli(["dvc", "status", "--json"], cwd=project).stdout))
    assert stale == {stage_of[f"models/{d}/{m}"] for d in datasets for m in bandit_modes}
    changed = {stage_of[out] for out, (status, _) in summary(project).items() if status == "params changed"}
    assert stale == changed
    shown = run_cli(["dvc", "exp", "show", "--no-pager", "--only-changed", "--csv", "--drop", EXP_SHOW_DROP],
                    cwd=project).stdout
    # the workspace and HEAD; not DVC's 600 columns (the csv leaves the rows' names in a column the regex drops)
    assert shown.splitlines() == ["params.yaml:dht.bandits.ucb_alpha", "2.0", "1.0"]
    for name, data in saved.items():
        (project / name).write_bytes(data)
    assert json.loads(run_cli(["dvc", "status", "--json"], cwd=project).stdout) == {}

    # the figures as DVC draws them: images, the page loads no script (readable offline)
    run_cli(["dvc", "plots", "show", "-o", str(tmp / "plots")], cwd=project)
    page = (tmp / "plots/index.html").read_text()
    assert "<script" not in page and "http" not in page
    for dataset in datasets:
        assert f"<p>reports/figures/loss-{dataset}.png</p>" in page
        assert (tmp / f"plots/static/workspace_reports_figures_loss-{dataset}.png").stat().st_size > 10_000

    # push to a remote, then a fresh clone pulls every output back
    run_cli(["dvc", "remote", "add", "-d", "local", str(tmp / "remote")], cwd=project)
    git_commit(project, "a remote")
    run_cli(["dvc", "push"], cwd=project)
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    outs = [out for body in lock.values() for out in (o["path"] for o in body.get("outs", []))]
    assert not any((clone / out).exists() for out in outs)
    run_cli(["dvc", "pull"], cwd=clone)
    restored = _files(clone, outs)
    assert restored == _files(project, outs) and any(path.startswith("models/") for path in restored)
    run_cli(["dht", "sync-snakemake"], cwd=clone)  # make dvc-pull
    again = run_cli(["snakemake", "-n", "--cores", "1"], cwd=clone)
    assert "Nothing to be done" in again.stdout + again.stderr
    assert json.loads(run_cli(["dvc", "status", "--json"], cwd=clone).stdout) == {}
    shutil.rmtree(clone)
