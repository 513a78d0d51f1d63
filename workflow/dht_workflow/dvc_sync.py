"""Snakemake's and DVC's records of one run kept in step, without running anything again.

- :func:`sync_snakemake` (``dht sync-snakemake``; ``make dvc-pull``): after ``dvc pull`` / ``dvc checkout``, the
  restored outputs recorded as current in Snakemake, when ``dvc status`` says they are.
- :func:`record_dvc_run` (``dht dvc-record``; ``make reproduce``): after a Snakemake run, its outputs recorded in DVC
  (dvc.lock, DVC's cache), when Snakemake has nothing left to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from dht.config_loading import load_config
from dht_workflow.dvc_yaml import PARAMS_STAGE, render_dvc_yaml


class SyncError(RuntimeError):
    """The outputs DVC restored are not current, so Snakemake must not be told they are."""


def _tool(name: str) -> str:
    """A console script of this environment (snakemake, dvc), also when the venv is not activated."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


def _dvc_stages_of(root: Path, targets: list[str]) -> dict[str, list[str]]:
    """The outputs (outs, metrics and plots) of dvc.yaml's stages as DVC reads them, by stage name: every stage,
    or those `targets` name (a stage such as `train@sst2-t-dht`, or a whole `matrix:`/`foreach:` stage such
    as `train`). DVC expands the matrix and foreach stages, so its names are the ones `dvc status` reports."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    # DVC reads a target (`dvc.yaml`, a stage name) against the working directory: be in the project
    with contextlib.chdir(root), Repo(".") as repo:
        found: dict[str, list[str]] = {}
        unknown = []
        for target in targets or ["dvc.yaml"]:
            try:
                collected = repo.stage.collect(target)
            except DvcException:
                unknown.append(target)
                continue
            for stage in collected:
                found[stage.addressing] = [str(out.def_path) for out in stage.outs]
    if unknown:
        raise SyncError(f"not stages of dvc.yaml: {', '.join(unknown)} (see `dvc stage list --all`)")
    return found


def sync_snakemake(root: str | Path = ".", stages: Iterable[str] = ()) -> list[str]:
    """After ``dvc pull`` or ``dvc checkout``: make Snakemake accept the restored outputs instead of retraining.

    A fresh clone has no ``.snakemake/`` records, and DVC writes files in its own order, so Snakemake's mtime
    rule sees inputs newer than outputs and would rerun the whole DAG. DVC knows better: ``dvc status`` compares
    every output with ``dvc.lock``, and ``dvc.lock`` with params.yaml and the code. When DVC reports the stages up
    to date, ``snakemake --touch`` on their outputs records them as current (file times and Snakemake's
    metadata, so later edits of params or code still rerun exactly the jobs they affect). When it does not, this
    refuses and names the stages (DVC's ``resolve_params`` stage first resolves params.yaml as it is, so that an
    edit names the stages whose keys it changed). `stages` are DVC's names (`train@sst2-t-dht`, or `train` for all of a
    `matrix:` stage); DVC itself expands dvc.yaml, so they are the stages `dvc status` knows. Returns the outputs
    touched.
    """
    root = Path(root)
    stages_of = _dvc_stages_of(root, list(stages))
    names = list(stages_of)
    try:  # an edit of params.yaml shows as the stages whose keys it changed, not as resolve_params alone
        _resolve_params(root)
    except RuntimeError as err:
        raise SyncError(str(err)) from None
    # --with-deps: `snakemake --touch --forceall` below records the named stages' upstream jobs as current too, so
    # their staleness must block the sync as well. Every stage: dvc.yaml as the one target, the same stages as
    # naming each (DVC collects each named target on its own: 5.5 s for a dozen names, 1.6 s for dvc.yaml).
    targets = names if stages else ["dvc.yaml"]
    proc = subprocess.run([_tool("dvc"), "status", "--with-deps", "--json", *targets], cwd=root, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SyncError(f"`dvc status` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    changed = json.loads(proc.stdout or "{}")
    if changed:
        raise SyncError(
            "DVC reports these stages not up to date with dvc.lock, params.yaml or the code: "
            f"{', '.join(sorted(changed))}. Restore them (`dvc pull` / `dvc checkout`) or rebuild them "
            "(`dvc repro` or snakemake), or sync only the stages that are current: dht sync-snakemake STAGE..."
        )
    outs = [out for n in names if n != PARAMS_STAGE for out in stages_of[n]]  # not a Snakemake job's
    # --forceall: touch (and record) every job behind the outputs, also when their times already look current,
    # so that Snakemake has params and code records to compare with later.
    cmd = [_tool("snakemake"), "--cores", "1", "--touch", "--forceall", *outs]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise SyncError(f"snakemake --touch failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return outs


class RecordError(RuntimeError):
    """Snakemake's outputs are not current, so DVC must not be told they are."""


class NotRecordable(RecordError):
    """DVC cannot version this run as the project stands (another profile than the one DVC runs, no git
    repository): nothing is wrong with the run, and ``make reproduce`` says so instead of failing."""


# dvc.yaml's first line names the profile it was generated for (DVC_HEADER).
_HEADER_PROFILE = re.compile(r"^# GENERATED .*\(profile '([^']*)'\)")


def _dvc_yaml_profile(root: Path) -> str | None:
    """The profile dvc.yaml was generated for, from its header; None without one."""
    path = root / "dvc.yaml"
    first = path.read_text().partition("\n")[0] if path.is_file() else ""
    match = _HEADER_PROFILE.match(first)
    return match.group(1) if match else None


def check_recordable(root: str | Path = ".", profile: str | None = None) -> str:
    """Whether DVC can record a Snakemake run of `profile` (default: params.yaml's) here, as :func:`record_dvc_run`
    would: returns the profile, or raises :class:`NotRecordable` naming the steps that make it recordable, or
    :class:`RecordError` when dvc.yaml is out of date with the workflow.

    DVC's stages run params.yaml's ``profile:`` (their commands carry no ``--profile``) and track its resolved keys,
    so a run of another profile (``make reproduce PROFILE=tiny`` beside ``profile: default``) would be recorded under
    values it was not made with; dvc.yaml lists one profile's jobs (``dht dvc-yaml --profile``); and DVC keeps
    dvc.lock in a git repository."""
    root = Path(root)
    dvc_profile = load_config(root / "params.yaml").profile
    profile = profile or dvc_profile
    if profile != dvc_profile:
        raise NotRecordable(
            f"this is a run of profile {profile}, but DVC runs params.yaml's `profile: {dvc_profile}` and would record "
            f"that profile's params beside its outputs. To version runs of {profile} in DVC: set `profile: {profile}` "
            f"in params.yaml, `dht dvc-yaml --profile {profile}`, then `dht dvc-record` (Snakemake has nothing to rerun "
            "then: its jobs read the same resolved profile)")
    try:
        in_git = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True,
                                text=True).stdout.strip() == "true"
    except FileNotFoundError:  # no git at all
        in_git = False
    if not in_git:
        raise NotRecordable(f"{root.resolve()} is not in a git repository, where DVC keeps dvc.lock (a clone is "
                            "one; else `git init`), then `dht dvc-record`")
    listed = _dvc_yaml_profile(root)
    if listed != profile:
        raise NotRecordable(f"dvc.yaml lists the stages of profile {listed}, not of {profile}, the one params.yaml "
                            f"runs: `dht dvc-yaml --profile {profile}`, then `dht dvc-record`")
    if (root / "dvc.yaml").read_text() != render_dvc_yaml(root, profile):
        raise RecordError(f"dvc.yaml is out of date with the Snakemake workflow: `dht dvc-yaml --profile {profile}`, "
                          "then `dht dvc-record`")
    return profile


def record_dvc_run(root: str | Path = ".", stages: Iterable[str] = (), profile: str | None = None) -> list[str]:
    """After a Snakemake run: record its outputs in DVC (dvc.lock and DVC's cache) as if ``dvc repro`` had made
    them, without running anything again; the inverse of :func:`sync_snakemake` (``dht dvc-record``, which
    ``make reproduce`` runs after Snakemake).

    Refuses (:func:`check_recordable`) unless `profile`, the run's (default: params.yaml's), is the one DVC runs and
    dvc.yaml is current for it; then unless Snakemake finds the outputs of the stages current (a dry run with
    nothing to do): what DVC records as current must be. Then DVC's own stage :data:`PARAMS_STAGE` writes the
    resolved profile (:func:`_resolve_params`), and ``dvc commit --force --no-relink`` records each stage's code,
    params and outputs as they are, copying the outputs into DVC's cache without rewriting them (Snakemake's
    file times stay as its run left them). `stages` are DVC's names, as in :func:`sync_snakemake` (default: every
    stage). Returns the stages recorded; ``dvc status`` then reports them up to date, ``dvc push`` sends their
    outputs to a remote, and after an edit of params.yaml (and ``dvc repro resolve_params``) or of the code
    ``dvc status`` names exactly the stages whose params or code changed, as Snakemake would rerun them."""
    root = Path(root)
    check_recordable(root, profile)
    named = list(stages)
    stages_of = _dvc_stages_of(root, named)
    outs = [out for name, paths in stages_of.items() if name != PARAMS_STAGE for out in paths]
    if outs:
        dry = subprocess.run([_tool("snakemake"), "-n", "--cores", "1", *outs], cwd=root, capture_output=True,
                             text=True)
        if dry.returncode != 0:
            raise RecordError(f"snakemake -n failed:\n{dry.stdout[-2000:]}\n{dry.stderr[-2000:]}")
        text = dry.stdout + dry.stderr
        if "Nothing to be done" not in text:
            rules = sorted(set(re.findall(r"^(?:local)?rule (\S+):", text, flags=re.MULTILINE)))
            raise RecordError(f"Snakemake would still run jobs of these rules: {', '.join(rules) or '?'} (see "
                              "`snakemake -n`); run them (snakemake, make reproduce), then record the run")
    try:
        _resolve_params(root)
    except RuntimeError as err:
        raise RecordError(str(err)) from None
    targets = [n for n in named if n != PARAMS_STAGE]
    if targets or not named:  # no targets: every stage (DVC collects each named target on its own, seconds apiece)
        cmd = [_tool("dvc"), "commit", "--force", "--no-relink", *targets]
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            raise RecordError(f"`dvc commit` failed: {(done.stderr.strip() or done.stdout.strip())[-2000:]}")
    return list(dict.fromkeys([PARAMS_STAGE, *stages_of]))


def _python_env() -> dict[str, str]:
    """The environment with this interpreter's scripts first on PATH: stage commands call `python` (the resolved
    params stage's included), and must find this environment's, as Snakemake's do (common.smk)."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _resolve_params(root: Path) -> None:
    """``dvc repro`` of :data:`PARAMS_STAGE` alone (a second; nothing when params.yaml is as dvc.lock has it), so
    that DVC compares every other stage's keys with params.yaml as it is now."""
    cmd = [_tool("dvc"), "repro", "--single-item", PARAMS_STAGE]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=_python_env())
    if done.returncode != 0:
        raise RuntimeError(f"`dvc repro {PARAMS_STAGE}` failed: {(done.stderr.strip() or done.stdout.strip())[-2000:]}")
