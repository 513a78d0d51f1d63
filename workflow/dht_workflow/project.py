"""A throw-away copy of the project as a fresh clone has it: tests and benchmarks run the pipeline there, never in
the working tree."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# What a fresh clone holds for the pipeline to run: the workflow, the library and the config (no outputs or stores);
# .gitignore too, so that a copy made a git repository (DVC wants one) keeps its outputs out of git, as a clone does.
PROJECT_FILES = ("Snakefile", "params.yaml", "dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore")
PROJECT_DIRS = ("workflow", "dht", ".dvc", "data/external")  # data/external: the shipped real text
# The folders the project's packages are imported from: dht from the root, dht_workflow from workflow/ (what
# pyproject.toml's packages.find `where` lists, so an installed checkout imports them from there).
IMPORT_ROOTS = (".", "workflow")


def copy_project(dest: str | Path, root: str | Path) -> Path:
    """A throw-away copy of the project at `root` as a fresh clone has it (tests and benchmarks run the pipeline
    there, never in the working tree)."""
    dest, root = Path(dest), Path(root)
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy2(root / name, dest / name)
    for name in PROJECT_DIRS:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(root / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    return dest


def python_path(root: str | Path) -> str:
    """A PYTHONPATH that imports the project's packages from `root` (a checkout or a copy of one) rather than from
    wherever the environment installed them."""
    return os.pathsep.join(str((Path(root) / folder).resolve()) for folder in IMPORT_ROOTS)
