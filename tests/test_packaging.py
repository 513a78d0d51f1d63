"""The library and the workflow's tooling as they are installed: `dht/` never imports `dht_workflow`
(workflow/dht_workflow), `pip install -e .` installs both, and the `dht` console script holds the commands of both."""

from __future__ import annotations

import ast
import tomllib

import pytest
from conftest import ROOT
from setuptools import find_packages

from dht_workflow.project import IMPORT_ROOTS
from dht_workflow.stage_code import PACKAGES


def imported_modules(path) -> set[str]:
    """The absolute module names a file imports anywhere in it (relative imports stay inside its own package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
    return names


def test_the_library_never_imports_the_workflow_tooling():
    """dht is the model library, usable without Snakemake or DVC; dht_workflow imports it, not the reverse."""
    files = sorted((ROOT / "dht").rglob("*.py"))
    assert len(files) > 30
    climbing = {f.relative_to(ROOT).as_posix(): sorted(m for m in imported_modules(f) if m.split(".")[0] == "dht_workflow")
                for f in files}
    assert not {f: m for f, m in climbing.items() if m}
    tooling = set().union(*map(imported_modules, (ROOT / "workflow/dht_workflow").glob("*.py")))
    assert any(m.split(".")[0] == "dht" for m in tooling)  # the check above looks at the right names


def test_an_install_holds_the_library_and_the_workflow_tooling():
    """pyproject.toml's package search finds both packages, each in the folder the stages' code list reads it from
    (dht_workflow.stage_code.PACKAGES) and the tests import it from (IMPORT_ROOTS); `dht` runs the tooling's CLI."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found = pyproject["tool"]["setuptools"]["packages"]["find"]
    assert tuple(found["where"]) == IMPORT_ROOTS
    folders = {package: f"{where}/{package.replace('.', '/')}".removeprefix("./")
               for where in found["where"] for package in find_packages(ROOT / where, include=found["include"])}
    assert {package: folders.get(package) for package in PACKAGES} == PACKAGES
    assert {"dht.baselines", "dht.baselines.nas_prune", "dht.flexibert"} <= set(folders)  # subpackages too
    assert not {p for p in folders if p.split(".")[0] not in PACKAGES}  # nothing else (the stage scripts are none)
    assert pyproject["project"]["scripts"]["dht"] == "dht_workflow.cli:main"


@pytest.mark.parametrize("argv, handler", [
    (["config", "validate"], "dht.cli._config_validate"),
    (["predict", "--model", "models/sst2/t-dht"], "dht.cli._predict"),
    (["dvc-yaml", "--check"], "dht_workflow.cli._dvc_yaml"),
    (["sync-snakemake", "train"], "dht_workflow.cli._sync_snakemake"),
    (["dvc-record", "--optional"], "dht_workflow.cli._dvc_record"),
])
def test_the_dht_command_holds_the_library_and_the_workflow_commands(argv, handler):
    from dht import cli as library
    from dht_workflow import cli

    func = cli.build_parser().parse_args(argv).func
    assert f"{func.__module__}.{func.__name__}" == handler
    if handler.startswith("dht_workflow."):  # `python -m dht.cli` (the library alone) has no workflow command
        with pytest.raises(SystemExit):
            library.build_parser().parse_args(argv)
