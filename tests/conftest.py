"""Shared fixtures: a throw-away copy of the project for pipeline tests, and small datasets on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dht import pipeline

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def copy_project(dest: Path) -> Path:
    """The workflow, library and config, without outputs or stores: what a fresh clone has."""
    return pipeline.copy_project(dest, ROOT)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests run tiny models: one intra-op thread. On a shared 2-core machine OpenMP threads stall at
    barriers under load (a model test file took 90 s with 2 threads, 6 s with 1). Pipeline tests start
    subprocesses, which set their own threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


def run_cli(args: list[str], cwd: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a console script of this environment (snakemake, dvc, dht) with the venv first on PATH."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc
