"""One source of truth for the DAG: the Snakemake workflow. `dvc.yaml` is generated from its jobs.

:func:`snakemake_jobs` builds the workflow's DAG for a profile (every job, as if nothing existed yet) through
Snakemake's API; :func:`dvc_stages` turns each job into a DVC stage with the same command, inputs (``deps``),
outputs (``outs``) and tracked params. The profile in commands and params is written as ``${profile}``, so
``dvc exp run -S profile=tiny`` runs the same stages on the tiny profile (profiles that share dataset names,
as default and tiny do). A profile with other datasets (paper) needs ``dht dvc-yaml --profile paper`` first.

``tests/test_pipeline.py`` regenerates dvc.yaml and fails when it differs from the committed file.
"""

from __future__ import annotations

import ast
import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dht.config import OVERLAYS_KEY, PROFILE_KEY, Config, ConfigError, read_params

DVC_HEADER = (
    "# GENERATED from the Snakemake workflow by `dht dvc-yaml` (profile '{profile}'): do not edit by hand.\n"
    "# Edit Snakefile / workflow/rules/*.smk, then run `dht dvc-yaml`; tests fail when the two drift apart.\n"
)
# Run outputs DVC shows with `dvc metrics show` and `dvc plots show`. Every output is cached, metrics, plots and
# reports included: all of them are git-ignored, so `dvc pull` must be able to restore them (an uncached output
# is missing on a fresh clone, and `dvc status` would then call its stage stale).
METRICS_SUFFIX = "/metrics.json"
PLOTS = {"/loss.csv": {"x": "step", "y": "loss", "title": "training loss (Figure 3)"}}


# What a fresh clone holds for the pipeline to run: the workflow, the library and the config (no outputs or stores).
PROJECT_FILES = ("Snakefile", "params.yaml", "dvc.yaml", "pyproject.toml", ".dvcignore")
PROJECT_DIRS = ("workflow", "dht", ".dvc", "data/external")  # data/external: the shipped real text


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


LIBRARY = "dht"
SCRIPTS_DIR = "workflow/scripts"


def _module_file(root: Path, module: str) -> Path | None:
    """The file of a module of the project (dht.x.y or a stage script's sibling such as _stage), or None."""
    base = root / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, package: str, top_level_only: bool = False) -> list[str]:
    """Module names a file imports (absolute; relative imports resolved against `package`), with every
    ``from pkg import name`` also listed as ``pkg.name`` in case `name` is a submodule."""
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
    return names


def stage_code(script: str, *modules: str, root: str | Path = ".", top_level_only: bool = False) -> list[str]:
    """A stage's code, as the files its script really imports: the script, the project modules it imports
    (``dht.*`` and the scripts' own helpers such as ``_stage``), and everything those import in turn, lazy
    imports inside functions included, plus the packages' ``__init__.py`` files an import runs. `modules` adds
    modules the script imports for one job only (``dht.baselines.distil`` for a distil-<n> job), and
    `top_level_only` then leaves the script's own function-level imports out. Snakemake and DVC take this list
    as the stage's inputs (`code(...)` in workflow/rules/common.smk), so editing any of it reruns the stage;
    ``tests/test_pipeline.py`` checks it against the modules a stage really loads."""
    root = Path(root)
    script_path = root / SCRIPTS_DIR / script
    if not script_path.is_file():
        raise ValueError(f"{script_path}: no such stage script")
    found: dict[Path, None] = {script_path: None}
    todo: list[tuple[Path, str, bool]] = [(script_path, "", top_level_only)]

    def visit(name: str, importer: Path) -> bool:
        """Queue the project files an import of `name` runs (a package's __init__.py files included)."""
        parts = name.split(".")
        if parts[0] == LIBRARY:
            prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]  # dht, dht.flexibert, ...
            files = [(f, p) for p in prefixes if (f := _module_file(root, p))]
        elif importer.parent == root / SCRIPTS_DIR and (f := _module_file(root / SCRIPTS_DIR, name)):
            files = [(f, "")]
        else:
            return False
        for file, module in files:
            if file not in found:
                found[file] = None
                todo.append((file, module if file.name == "__init__.py" else module.rpartition(".")[0], False))
        return bool(files)

    for m in modules:
        if not m.startswith(f"{LIBRARY}.") or _module_file(root, m) is None or not visit(m, script_path):
            raise ValueError(f"{m}: not a module of the {LIBRARY} package under {root}")
    while todo:
        path, package, shallow = todo.pop()
        for name in _imports(path, package, shallow):
            visit(name, path)
    first = [script_path]
    rest = sorted((f for f in found if f != script_path), key=lambda f: f.relative_to(root).as_posix())
    return [f.relative_to(root).as_posix() for f in first + rest]


class TrackedParams(dict):
    """The resolved values of the params.yaml keys a job reads, keyed by dotted key.

    As a rule's `params:` entry, its string form (canonical JSON) changes exactly when a value does, which is
    what Snakemake's params rerun-trigger compares; its keys become the DVC stage's `params:`.
    """

    def __str__(self) -> str:
        return json.dumps(self, sort_keys=True, separators=(",", ":"))

    __repr__ = __str__


def tracked_params(cfg: Config, keys: Iterable[str]) -> TrackedParams:
    return TrackedParams({key: cfg.section(key) for key in keys})


def check_cli_overrides(config: Mapping[str, Any], params_file: str | Path) -> None:
    """Only `profile` may be set with `snakemake --config`: everything else lives in params.yaml, which DVC
    and every stage script read as well, so another override would silently apply to Snakemake alone."""
    raw = read_params(params_file)
    changed = sorted(k for k in config if k != PROFILE_KEY and config.get(k) != raw.get(k))
    if changed:
        raise ConfigError(
            f"--config {', '.join(changed)}: only `profile` can be set on the command line (e.g. --config "
            "profile=tiny); edit params.yaml for anything else, so that Snakemake, DVC and the stage scripts "
            "read the same values"
        )


@dataclass(frozen=True)
class Job:
    rule: str
    wildcards: tuple[tuple[str, str], ...]
    cmd: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tracked: tuple[str, ...]

    @property
    def stage_name(self) -> str:
        return "-".join([self.rule, *(v for _, v in self.wildcards)])


def snakemake_jobs(root: str | Path = ".", profile: str | None = None, targets: Iterable[str] = ("all",)) -> list[Job]:
    """Every job Snakemake would run to build `targets` from nothing, in dependency order."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        OutputSettings,
        Quietness,
        ResourceSettings,
    )

    root = Path(root).resolve()
    config = {PROFILE_KEY: profile} if profile else {}
    jobs: list[Job] = []
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        wf_api = api.workflow(
            # Many cores, so `{threads}` in a command is the rule's declared number, not a machine's limit.
            resource_settings=ResourceSettings(cores=256),
            config_settings=ConfigSettings(config=config),
            snakefile=root / "Snakefile",
            workdir=root,
        )
        dag_api = wf_api.dag(DAGSettings(targets=set(targets), forceall=True))
        workflow = dag_api.workflow_api._workflow
        # Snakemake's own dry-run path (Workflow.printdag) uses these two calls to build the DAG.
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        for j in workflow.dag.jobs:
            if j.rule.norun:  # target-only rules such as `all`
                continue
            tracked = getattr(j.params, "tracked", None)
            jobs.append(Job(
                rule=j.rule.name,
                wildcards=tuple((k, str(v)) for k, v in j.wildcards_dict.items()),
                cmd=" ".join(j.shellcmd.split()),
                inputs=tuple(str(f) for f in j.input),
                outputs=tuple(str(f) for f in j.output),
                tracked=tuple(tracked.keys()) if isinstance(tracked, dict) else (),
            ))
    order = {name: i for i, name in enumerate(_rule_order(jobs))}
    return sorted(jobs, key=lambda j: (order[j.rule], j.wildcards))


def _rule_order(jobs: list[Job]) -> list[str]:
    """Rules ordered so that a rule comes after every rule whose outputs it reads."""
    produced = {out: j.rule for j in jobs for out in j.outputs}
    deps: dict[str, set[str]] = {j.rule: set() for j in jobs}
    for j in jobs:
        for path in j.inputs:
            for out, rule in produced.items():
                if rule != j.rule and (path == out or path.startswith(out.rstrip("/") + "/")):
                    deps[j.rule].add(rule)
    ordered: list[str] = []
    while deps:
        ready = sorted(r for r, d in deps.items() if d <= set(ordered))
        if not ready:
            raise RuntimeError(f"cycle among rules {sorted(deps)}")
        ordered += ready
        for r in ready:
            del deps[r]
    return ordered


def _templated(text: str, profile: str) -> str:
    """Write the concrete profile of a command as DVC's `${profile}` (from params.yaml)."""
    return text.replace(f"--profile {shlex.quote(profile)}", "--profile ${profile}")


def dvc_stages(jobs: list[Job], profile: str) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for job in jobs:
        outs: list[Any] = []
        metrics: list[Any] = []
        plots: list[Any] = []
        for out in job.outputs:
            if out.endswith(METRICS_SUFFIX):
                metrics.append(out)
            elif any(out.endswith(suffix) for suffix in PLOTS):
                spec = next(v for k, v in PLOTS.items() if out.endswith(k))
                plots.append({out: dict(spec)})
            else:
                outs.append(out)
        stage: dict[str, Any] = {"cmd": _templated(job.cmd, profile)}
        if job.inputs:
            stage["deps"] = list(dict.fromkeys(job.inputs))
        stage["params"] = [PROFILE_KEY, *job.tracked, f"{OVERLAYS_KEY}.${{{PROFILE_KEY}}}"]
        stage["outs"] = outs
        if metrics:
            stage["metrics"] = metrics
        if plots:
            stage["plots"] = plots
        stages[job.stage_name] = stage
    return {"stages": stages}


def render_dvc_yaml(root: str | Path = ".", profile: str = "default") -> str:
    stages = dvc_stages(snakemake_jobs(root, profile), profile)
    body = yaml.safe_dump(stages, sort_keys=False, width=1000)
    return DVC_HEADER.format(profile=profile) + body


def write_dvc_yaml(root: str | Path = ".", profile: str = "default") -> Path:
    path = Path(root) / "dvc.yaml"
    path.write_text(render_dvc_yaml(root, profile))
    return path


class SyncError(RuntimeError):
    """The outputs DVC restored are not current, so Snakemake must not be told they are."""


def _tool(name: str) -> str:
    """A console script of this environment (snakemake, dvc), also when the venv is not activated."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


def sync_snakemake(root: str | Path = ".", stages: Iterable[str] = ()) -> list[str]:
    """After ``dvc pull`` or ``dvc checkout``: make Snakemake accept the restored outputs instead of retraining.

    A fresh clone has no ``.snakemake/`` records, and DVC writes files in its own order, so Snakemake's mtime
    rule sees inputs newer than outputs and would rerun the whole DAG. DVC knows better: ``dvc status`` compares
    every output with ``dvc.lock``, and ``dvc.lock`` with params.yaml and the code. When DVC reports the stages up
    to date, ``snakemake --touch`` on their outputs records them as current (file times and Snakemake's
    metadata, so later edits of params or code still rerun exactly the jobs they affect). When it does not, this
    refuses and names the stages. Returns the outputs touched.
    """
    root = Path(root)
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    names = list(stages) or list(dvc_yaml)
    unknown = [n for n in names if n not in dvc_yaml]
    if unknown:
        raise SyncError(f"not stages of dvc.yaml: {', '.join(unknown)} (see `dvc stage list`)")
    proc = subprocess.run([_tool("dvc"), "status", "--json", *names], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SyncError(f"`dvc status` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    changed = json.loads(proc.stdout or "{}")
    if changed:
        raise SyncError(
            "DVC reports these stages not up to date with dvc.lock, params.yaml or the code: "
            f"{', '.join(sorted(changed))}. Restore them (`dvc pull` / `dvc checkout`) or rebuild them "
            "(`dvc repro` or snakemake), or sync only the stages that are current: dht sync-snakemake STAGE..."
        )
    outs = [next(iter(o)) if isinstance(o, dict) else o
            for n in names for kind in ("outs", "metrics", "plots") for o in dvc_yaml[n].get(kind, [])]
    # --forceall: touch (and record) every job behind the outputs, also when their times already look current,
    # so that Snakemake has params and code records to compare with later.
    cmd = [_tool("snakemake"), "--cores", "1", "--touch", "--forceall", *outs]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise SyncError(f"snakemake --touch failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return outs
