"""Section 3, the wall times of the pipeline and of the test suite: a cold `snakemake --cores 4 reports/table1.md`
in a throw-away copy of the project, then an immediate no-op rerun (goal < 10 s), and the test suite's duration
(`pytest -q`). Each runs once: minutes, not milliseconds, so there are no rounds."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, copy_project, fmt_seconds, table
from report import Section, shortfall_text

from sections.inputs import BenchmarkError

NOOP_GOAL = 10.0  # seconds for a no-op pipeline rerun


def venv_env() -> dict[str, str]:
    """The environment a stage sees under `make`: this venv's tools first, the project's own MLflow store."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               DHT_NO_PROGRESS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def timed_command(cmd: list[str], cwd: Path,
                  timeout: float | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=venv_env(), capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - start, proc


def time_suite(selection: list[str] | None = None) -> dict[str, Any]:
    """Wall time of `pytest -q` in the repository (or of a `selection` of it), pytest's summary line and its
    five slowest test phases."""
    cmd = [str(Path(sys.executable).parent / "pytest"), "-q", "--durations=5", "-p", "no:cacheprovider",
           *(selection or [])]
    seconds, proc = timed_command(cmd, REPO)
    out = proc.stdout.strip().splitlines()
    summary = next((line for line in reversed(out) if re.search(r"\b(passed|failed|errors?)\b", line)), "?")
    slowest = [line.strip() for line in out if re.match(r"^\s*\d+\.\d+s (call|setup|teardown)", line)][:5]
    return {"seconds": seconds, "summary": summary.strip("= "), "slowest": slowest, "returncode": proc.returncode}


def pipeline_times_section(args: argparse.Namespace) -> Section:
    title = "3. Pipeline and test suite"
    body: list[str] = []
    shortfalls: list[str] = []
    bin_dir = Path(sys.executable).parent
    if args.skip_pipeline:
        body += ["Pipeline runs: skipped (" + ("--quick" if args.quick else "--skip-pipeline") + ").", ""]
    else:
        profile = args.pipeline_profile
        cmd = [str(bin_dir / "snakemake"), "--cores", "4", "reports/table1.md"]
        if profile != "default":
            cmd += ["--config", f"profile={profile}"]
        shown = ("snakemake --cores 4 reports/table1.md"
                 + ("" if profile == "default" else f" --config profile={profile}"))
        workdir = Path(tempfile.mkdtemp(prefix="dht-bench-pipeline-"))
        try:
            project = copy_project(workdir / "project")
            print(f"[pipeline] cold `{shown}` in {project}", flush=True)
            cold_s, cold = timed_command(cmd, project)
            if cold.returncode != 0:
                raise BenchmarkError(f"the cold pipeline run failed ({cold.returncode}) in {project}:\n"
                                     f"{cold.stdout[-3000:]}\n{cold.stderr[-3000:]}")
            log = cold.stdout + cold.stderr
            steps = re.findall(r"(\d+) of (\d+) steps \(100%\) done", log)
            jobs = steps[-1][1] if steps else "?"
            print("[pipeline] no-op rerun", flush=True)
            noop_s, noop = timed_command(cmd, project)
            nothing = "Nothing to be done" in noop.stdout + noop.stderr
            startup_s, _ = timed_command([str(bin_dir / "snakemake"), "--version"], project)
            dry_s, _ = timed_command(cmd + ["-n"], project)
        finally:
            if args.keep_pipeline_copy:
                print(f"[pipeline] kept {workdir}", flush=True)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        rows = [
            [f"cold `{shown}` (fresh copy, profile {profile})", fmt_seconds(cold_s), f"{jobs} jobs", "—"],
            ["immediate no-op rerun, same command", fmt_seconds(noop_s),
             "nothing to do" if nothing else "**jobs reran**", "yes" if noop_s < NOOP_GOAL and nothing else "**no**"],
            ["of which: `snakemake --version` (interpreter + imports)", fmt_seconds(startup_s), "", ""],
            ["for comparison: dry run `-n`", fmt_seconds(dry_s), "", ""],
        ]
        body += [
            f"A throw-away copy of the project (what `tests/conftest.py` copies: workflow, library, config; no "
            f"data, models or stores), profile `{profile}`, `--cores 4` on {os.cpu_count()} logical cores.",
            "",
            table(["run", "wall time", "outcome", f"< {NOOP_GOAL:.0f} s"], rows),
            "",
        ]
        if not nothing:
            shortfalls.append("pipeline: the immediate rerun was not a no-op (Snakemake reran jobs); see its log")
        if noop_s >= NOOP_GOAL:
            shortfalls.append(
                f"pipeline: the no-op rerun took {noop_s:.1f} s (goal < {NOOP_GOAL:.0f} s): {startup_s:.1f} s is "
                f"starting Snakemake itself, the rest ({noop_s - startup_s:.1f} s) parsing the Snakefile (which "
                "validates params.yaml and imports dht) and checking every job's inputs, params and code")
    if args.skip_suite:
        body += ["Test suite: skipped (" + ("--quick" if args.quick else "--skip-suite") + ").", ""]
    else:
        print("[suite] pytest -q", flush=True)
        suite = time_suite()
        body += [
            f"`pytest -q` in the repository (slow tests included, in one process; `make test` shares them out "
            "to two pytest-xdist workers): "
            f"{fmt_seconds(suite['seconds'])} wall time; pytest's summary: `{suite['summary']}`.",
            "",
        ]
        if suite["slowest"]:
            body += ["Slowest test phases:", "", "\n".join(f"- `{line}`" for line in suite["slowest"]), ""]
        if suite["returncode"] != 0:
            shortfalls.append(f"test suite: pytest exited {suite['returncode']} ({suite['summary']})")
    body.append(shortfall_text(shortfalls, "pipeline goals"))
    return Section(title, "\n".join(body), shortfalls)
