"""A stage's code as inputs: the files its script really imports, transitively, so that editing any of them reruns
the stage in Snakemake (by modification time) and in DVC (by hash). `code(...)` in workflow/rules/common.smk lists
them as every rule's inputs, and dvc.yaml's stages carry them as ``deps``."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable
from pathlib import Path

# The project's own packages, by the folder each lives in: the library, and this tooling (which the stage scripts
# import for dvc.yaml's check of their params, dht_workflow.dvc_params). Their files are a stage's code; every
# other import (torch, snakemake) is an installed package's.
PACKAGES = {"dht": "dht", "dht_workflow": "workflow/dht_workflow"}
SCRIPTS_DIR = "workflow/scripts"


def _in_folder(folder: Path, module: str) -> Path | None:
    """The file of dotted `module` under `folder` (a module file or a package's __init__.py), or None."""
    base = folder / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_file(root: Path, module: str) -> Path | None:
    """The file of a module of the project's packages (dht.x.y, dht_workflow.x), or None."""
    top, _, rest = module.partition(".")
    if top not in PACKAGES:
        return None
    return _in_folder(root / PACKAGES[top], rest) if rest else _in_folder(root, PACKAGES[top])


def _not_ours(module: str, root: Path) -> ValueError:
    return ValueError(f"{module}: not a module of the project's packages ({', '.join(PACKAGES)}) under {root}")


def _imports(path: Path, package: str, top_level_only: bool = False) -> list[str]:
    """Module names a file imports (absolute; relative imports resolved against `package`), with every
    ``from pkg import name`` also listed as ``pkg.name`` in case `name` is a submodule."""
    stat = path.stat()
    return list(_file_imports(path.resolve(), stat.st_mtime_ns, stat.st_size, package, top_level_only))


@functools.cache
def _file_imports(path: Path, mtime_ns: int, size: int, package: str, top_level_only: bool) -> tuple[str, ...]:
    """:func:`_imports` of one version of a file (its time and size are part of the key, so an edited file is
    read again). The Snakefile asks stage_code once per rule, and the rules share most of the library: parsing
    each file once takes a third of a second off every Snakemake start."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return tuple(names)


def stage_code(script: str, *modules: str, root: str | Path = ".", top_level_only: bool = False) -> list[str]:
    """A stage's code, as the files its script really imports: the script, the project modules it imports
    (``dht.*``, ``dht_workflow.*`` and the scripts' own helpers such as ``_stage``), and everything those import in turn, lazy
    imports inside functions included, plus the packages' ``__init__.py`` files an import runs. `modules` adds
    modules the script imports for one job only (``dht.baselines.distil`` for a distil-<n> job), and
    `top_level_only` then leaves the script's own function-level imports out. Snakemake and DVC take this list
    as the stage's inputs (`code(...)` in workflow/rules/common.smk), so editing any of it reruns the stage;
    ``tests/test_pipeline.py`` checks it against the modules a stage really loads."""
    root = Path(root)
    script_path = root / SCRIPTS_DIR / script
    if not script_path.is_file():
        raise ValueError(f"{script_path}: no such stage script")
    return _code_closure(root, script_path, "", modules, top_level_only)


def module_code(module: str, root: str | Path = ".", top_level_only: bool = False) -> list[str]:
    """:func:`stage_code` of a module of the library (``dht.cli``) instead of a stage script: the module and the
    project files it imports, transitively (with `top_level_only`, its own function-level imports left out)."""
    root = Path(root)
    path = _module_file(root, module)
    if path is None:
        raise _not_ours(module, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return _code_closure(root, path, package, (), top_level_only)


def _code_closure(root: Path, script_path: Path, package: str, modules: Iterable[str],
                  top_level_only: bool) -> list[str]:
    """The first file, then the project files it and `modules` import, transitively, sorted (:func:`stage_code`)."""
    found: dict[Path, None] = {script_path: None}
    todo: list[tuple[Path, str, bool]] = [(script_path, package, top_level_only)]

    def visit(name: str, importer: Path) -> bool:
        """Queue the project files an import of `name` runs (a package's __init__.py files included)."""
        parts = name.split(".")
        if parts[0] in PACKAGES:
            prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]  # dht, dht.flexibert, ...
            files = [(f, p) for p in prefixes if (f := _module_file(root, p))]
        elif importer.parent == root / SCRIPTS_DIR and (f := _in_folder(root / SCRIPTS_DIR, name)):
            files = [(f, "")]
        else:
            return False
        for file, module in files:
            if file not in found:
                found[file] = None
                todo.append((file, module if file.name == "__init__.py" else module.rpartition(".")[0], False))
        return bool(files)

    for m in modules:
        if _module_file(root, m) is None or not visit(m, script_path):
            raise _not_ours(m, root)
    while todo:
        path, package, shallow = todo.pop()
        for name in _imports(path, package, shallow):
            visit(name, path)
    first = [script_path]
    rest = sorted((f for f in found if f != script_path), key=lambda f: f.relative_to(root).as_posix())
    return [f.relative_to(root).as_posix() for f in first + rest]
