"""One source of truth for the DAG: the Snakemake workflow. `dvc.yaml` is generated from its jobs.

:func:`snakemake_jobs` builds the workflow's DAG for a profile (every job, as if nothing existed yet) through
Snakemake's API; :func:`dvc_stages` turns each job into a DVC stage with the same command, inputs (``deps``),
outputs (``outs``) and tracked params, and writes the jobs of a rule whose stages differ only in their wildcard
values as one ``matrix:`` (or ``foreach:``) stage, which DVC expands back into them (``train@sst2-t-dht``). The
commands leave out Snakemake's ``--profile``: a stage then runs params.yaml's ``profile:`` (validated as a name
before use), and every stage's params are read from the profile resolved by :data:`PARAMS_STAGE`, so
``dvc exp run -S <key>=<value>`` runs an experiment of params.yaml's profile. dvc.yaml lists one profile's jobs:
another profile (``-S profile=tiny``) needs ``dht dvc-yaml --profile tiny`` first.

A stage's ``params:`` are the keys its job tracks, read by DVC from ``params.resolved.yaml``: the profile as the
stages see it, resolved (defaults filled in, overlays applied), written by a stage of DVC's own,
``resolve_params`` (:data:`PARAMS_STAGE`), from params.yaml. DVC compares the values of the keys a stage tracks,
as Snakemake does: params.yaml itself leaves defaults unwritten and spreads a profile over overlays, so its raw
keys could not say what a stage reads.

``tests/test_pipeline.py`` regenerates dvc.yaml and fails when it differs from the committed file.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dht.config import Config, ConfigError
from dht.config_loading import PROFILE_KEY, read_params
from dht.dvc_params import ITEM_SLOT, RESOLVED_PARAMS, expand_dvc_stages, fill_items
from dht.results import PAIRED_FILE, PAIRED_SEEDS_FILE

DVC_HEADER = (
    "# GENERATED from the Snakemake workflow by `dht dvc-yaml` (profile '{profile}'): do not edit by hand.\n"
    "# Edit Snakefile / workflow/rules/*.smk, then run `dht dvc-yaml`; tests fail when the two drift apart.\n"
)
# Run outputs DVC shows with `dvc metrics show` and `dvc plots show`. Every output is cached, metrics, plots and
# reports included: all of them are git-ignored, so `dvc pull` must be able to restore them (an uncached output
# is missing on a fresh clone, and `dvc status` would then call its stage stale).
# A model's metrics.json and a dataset's paired comparisons (the compare stage's).
METRICS_SUFFIXES = ("/metrics.json", f"/{PAIRED_FILE}", f"/{PAIRED_SEEDS_FILE}")
# `dvc plots show` shows the run's figures as images (DVC's image plots): the figures stage's, one per dataset and
# kind, its dataset in its title and one line or panel per model (Figure 3's loss curves among them), and the
# FlexiBERT search's. Not Vega-Lite charts of each model's loss.csv: DVC drew one chart per file, all under one
# title, and its HTML page loads Vega from a CDN for them (blank offline); a page of images loads nothing.
# loss.csv stays an output (`dvc plots show results/<dataset>/<model>/loss.csv -x step -y loss` draws one).
PLOT_SUFFIXES = (".png", ".svg")
# The resolved profile DVC reads the stages' params from, and the DVC-only stage that writes it from params.yaml
# (the configuration code is its code). Snakemake resolves params.yaml itself: the stage is not one of its jobs.
PARAMS_STAGE = "resolve_params"
# No `--profile ${profile}`: DVC would paste params.yaml's value into the shell unquoted (dvc_command); `config show`
# resolves params.yaml's own `profile:`, checked against the name rule first.
PARAMS_CMD = f"python -m dht.cli config show --out {RESOLVED_PARAMS}"


# What a fresh clone holds for the pipeline to run: the workflow, the library and the config (no outputs or stores);
# .gitignore too, so that a copy made a git repository (DVC wants one) keeps its outputs out of git, as a clone does.
PROJECT_FILES = ("Snakefile", "params.yaml", "dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore")
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
    return _code_closure(root, script_path, "", modules, top_level_only)


def module_code(module: str, root: str | Path = ".", top_level_only: bool = False) -> list[str]:
    """:func:`stage_code` of a module of the library (``dht.cli``) instead of a stage script: the module and the
    project files it imports, transitively (with `top_level_only`, its own function-level imports left out)."""
    root = Path(root)
    path = _module_file(root, module)
    if path is None or not module.startswith(f"{LIBRARY}."):
        raise ValueError(f"{module}: not a module of the {LIBRARY} package under {root}")
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
                cmd=squeeze_spaces(j.shellcmd),
                inputs=tuple(str(f) for f in j.input),
                outputs=tuple(str(f) for f in j.output),
                tracked=tuple(tracked.keys()) if isinstance(tracked, dict) else (),
            ))
    order = {name: i for i, name in enumerate(_rule_order(jobs))}
    return sorted(jobs, key=lambda j: (order[j.rule], j.wildcards))


# A single-quoted word (shlex.quote's, as Snakemake's `{x:q}` writes it), a double-quoted one, or a run of spaces.
_QUOTED_OR_SPACE = re.compile(r"""('[^']*'|"(?:[^"\\]|\\.)*")|\s+""")


def squeeze_spaces(cmd: str) -> str:
    """`cmd` on one line with single spaces between its words (a rule's command ends in a space when its last
    optional argument is empty), leaving the inside of quoted words as it is: `--log 'a  b'` keeps both spaces."""
    return _QUOTED_OR_SPACE.sub(lambda m: m.group(1) or " ", cmd).strip()


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


def dvc_command(cmd: str, profile: str) -> str:
    """A job's command as DVC runs it: without ``--profile <profile>``, so that the stage reads params.yaml's
    ``profile:`` (which ``dvc exp run -S profile=...`` sets). Not ``--profile ${profile}``: DVC pastes an
    interpolated value into the command unquoted, before any stage could check it, so a `profile:` holding
    ``x;touch PWNED`` would run in the shell."""
    return re.sub(rf" --profile {re.escape(shlex.quote(profile))}(?= |$)", "", cmd)


def _stage_body(job: Job, profile: str) -> dict[str, Any]:
    """The DVC stage of one Snakemake job: its command, inputs, tracked params and outputs."""
    outs: list[Any] = []
    metrics: list[Any] = []
    plots: list[Any] = []
    for out in job.outputs:
        if out.endswith(METRICS_SUFFIXES):
            metrics.append(out)
        elif out.endswith(PLOT_SUFFIXES):
            plots.append(out)
        else:
            outs.append(out)
    stage: dict[str, Any] = {"cmd": dvc_command(job.cmd, profile)}
    if job.inputs:
        stage["deps"] = list(dict.fromkeys(job.inputs))
    if job.tracked:  # read from the resolved profile: DVC compares the values the stage reads, as Snakemake does
        stage["params"] = [{RESOLVED_PARAMS: list(job.tracked)}]
    stage["outs"] = outs
    if metrics:
        stage["metrics"] = metrics
    if plots:
        stage["plots"] = plots
    return stage


# A wildcard value is written as `${item.<wildcard>}` only where it stands between separators: a whole command
# argument, path component or params key part, or one side of a '-' (`seed-{seed}`). `vanilla-2` inside
# `vanilla-2x` or `sst2` inside `sst2x` stay literal. Interpolations already there (`${profile}`) are skipped.
_SEPARATORS = r"\s/.=-"


def _template(value: Any, wildcards: Mapping[str, str]) -> Any:
    """`value` (a stage body, or part of one) with each wildcard value written as DVC's `${item.<name>}`."""
    if isinstance(value, dict):
        return {_template(k, wildcards): _template(v, wildcards) for k, v in value.items()}
    if isinstance(value, list):
        return [_template(v, wildcards) for v in value]
    if not isinstance(value, str) or not wildcards:
        return value
    by_value: dict[str, str] = {}
    for name, v in wildcards.items():
        by_value.setdefault(v, name)  # two wildcards with one value: the first one's name
    alternatives = "|".join(re.escape(v) for v in sorted(by_value, key=len, reverse=True) if v)
    if not alternatives:
        return value
    pattern = re.compile(rf"(\$\{{[^}}]*\}})|(?<![^{_SEPARATORS}])({alternatives})(?![^{_SEPARATORS}])")
    return pattern.sub(lambda m: m.group(1) or f"${{item.{by_value[m.group(2)]}}}", value)


def _refit(template: Any, constants: Mapping[str, str], body: Any, item: Mapping[str, str]) -> Any:
    """`template` (a group's stage, `constants` the wildcards with one value in the whole group) changed as
    little as needed to expand to `body` for a job with wildcard values `item` too: a slot `${item.x}` where
    the body holds the group's one value of x rather than the job's becomes that value again (seed 2 in
    `--threads 2` was a slot only by accident). None when no such template exists."""
    if isinstance(template, dict):
        if not isinstance(body, dict) or len(body) != len(template):
            return None
        pairs = [(_refit(tk, constants, bk, item), _refit(tv, constants, bv, item))
                 for (tk, tv), (bk, bv) in zip(template.items(), body.items(), strict=True)]
        return None if any(k is None or v is None for k, v in pairs) else dict(pairs)
    if isinstance(template, list):
        if not isinstance(body, list) or len(body) != len(template):
            return None
        values = [_refit(t, constants, b, item) for t, b in zip(template, body, strict=True)]
        return None if any(v is None for v in values) else values
    if not isinstance(template, str) or not isinstance(body, str):
        return template if template == body else None
    parts = ITEM_SLOT.split(template)  # literal, wildcard name, literal, ...
    pattern = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            pattern.append(re.escape(part))
        elif part not in item:
            return None
        else:  # the job's own value first: a slot stays a slot wherever it can
            alternatives = [f"(?P<t{i}>{re.escape(item[part])})"]
            if constants.get(part, item[part]) != item[part]:
                alternatives.append(f"(?P<l{i}>{re.escape(constants[part])})")
            pattern.append(f"(?:{'|'.join(alternatives)})")
    match = re.fullmatch("".join(pattern), body)
    if match is None:
        return None
    return "".join(
        part if i % 2 == 0 else constants[part] if match.group(f"t{i}") is None else f"${{item.{part}}}"
        for i, part in enumerate(parts))


@dataclass
class _Group:
    """Jobs of one rule and a template their stages are (None: a job that stays a plain stage)."""
    template: dict[str, Any] | None
    jobs: list[tuple[int, Job, dict[str, Any]]]  # (position in the DAG order, job, its plain stage)

    def add(self, entry: tuple[int, Job, dict[str, Any]]) -> bool:
        """Take the job in if one template, the group's with the fewest slots made literal, serves it too."""
        if self.template is None:
            return False
        items = [dict(job.wildcards) for _, job, _ in self.jobs]
        constants = {n: v for n, v in items[0].items() if all(item[n] == v for item in items)}
        _, job, body = entry
        template = _refit(self.template, constants, body, dict(job.wildcards))
        members = [*self.jobs, entry]
        if template is None or any(fill_items(template, dict(j.wildcards)) != b for _, j, b in members):
            return False
        self.template, self.jobs = template, members
        return True


def _group_jobs(jobs: list[tuple[int, Job, dict[str, Any]]]) -> list[_Group]:
    """Partition one rule's jobs into groups whose stages are one template expanded over their wildcards.

    A job starts a group with its stage with every whole wildcard value written as a slot (`_template`), and
    joins the first group whose template, with slots it contradicts made literal again, gives its stage too.
    A value that stands in a stage by accident (seed 2 in `--threads 2`) is thus a slot only until a job with
    another value shows it is not; a stage that differs otherwise (an extra param) starts a group of its own."""
    groups: list[_Group] = []
    for entry in jobs:
        _, job, body = entry
        if any(group.add(entry) for group in groups):
            continue
        template = _template(body, dict(job.wildcards))
        if fill_items(template, dict(job.wildcards)) != body:
            template = None  # a stage that already held `${item.` text: keep it plain
        groups.append(_Group(template, [entry]))
    return groups


def _common_prefix(values: list[str]) -> str:
    """The '-'-separated words every value starts with (`fastbert-0.5`, `fastbert-0.8`: `fastbert`)."""
    words = [v.split("-") for v in values]
    common: list[str] = []
    for parts in zip(*words, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return "-".join(common)


class _FlowList(list):
    """A list YAML writes on one line, as DVC's examples write a matrix (`dataset: [sst2, dbpedia-subset]`)."""


class _FlowDict(dict):
    """A mapping YAML writes on one line (a foreach item: `{dataset: sst2, model: t-dht}`)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
_Dumper.add_representer(_FlowDict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True))


def _group_stage(group: _Group, fixed: Iterable[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """A `matrix:` stage when the group's items are every combination of its wildcard values, else a
    `foreach:` over named items (named by their values joined by '-', as a matrix names them); with the names
    of its stages' items, in the jobs' order. Wildcards in `fixed` (one value in the whole group, and named in
    the stage's name) are written as that value instead of being an axis: `train-p-dht@sst2`."""
    items = [dict(job.wildcards) for _, job, _ in group.jobs]
    assert group.template is not None and all(list(item) == list(items[0]) for item in items)
    constants = {n: items[0][n] for n in fixed}
    assert all(item[n] == v for item in items for n, v in constants.items())
    template = fill_items(group.template, constants)
    items = [{n: v for n, v in item.items() if n not in constants} for item in items]
    keys = ["-".join(item.values()) for item in items]
    axes = {n: list(dict.fromkeys(item[n] for item in items)) for n in items[0]}
    combos = {tuple(item.values()) for item in items}
    if len(combos) == len(items) == math.prod(len(v) for v in axes.values()):
        return {"matrix": {n: _FlowList(v) for n, v in axes.items()}, **template}, keys
    return {"foreach": {k: _FlowDict(item) for k, item in zip(keys, items, strict=True)}, "do": template}, keys


def _group_names(rule: str, groups: list[_Group]) -> dict[int, tuple[str, list[str]]]:
    """A name for each of a rule's groups (keyed by id), and the wildcards written as a value rather than an
    axis of its stage. One group is named after the rule. Several are told apart by the wildcards whose values
    differ between them (the model, not the dataset): the rule's name and the words each group's values of
    those share (`train-p-dht`, `baseline-fastbert` for fastbert-0.5 and -0.8), numbered where two would share
    a name; such a wildcard with one value in the group is then written as that value (`train-p-dht@sst2`)."""
    if len(groups) <= 1:
        return {id(g): (rule, []) for g in groups}
    values = [[dict(job.wildcards) for _, job, _ in g.jobs] for g in groups]
    wildcards = list(values[0][0])
    apart = [n for n in wildcards if len({frozenset(v[n] for v in vs) for vs in values}) > 1]
    labels = ["-".join(p for n in apart if (p := _common_prefix([v[n] for v in vs]))) for vs in values]
    names = {}
    for i, (g, vs, label) in enumerate(zip(groups, values, labels, strict=True)):
        name = "-".join(filter(None, [rule, label]))
        fixed = [n for n in apart if len({v[n] for v in vs}) == 1]
        names[id(g)] = (name if labels.count(label) == 1 else f"{name}-{i + 1}", fixed)
    return names


def dvc_stages(jobs: list[Job], profile: str) -> dict[str, Any]:
    """dvc.yaml's stages for the jobs: one plain stage per job, except that the jobs of a rule whose stages
    differ only in their wildcard values become one `matrix:` or `foreach:` stage (`train`, run as
    `train@sst2-t-dht`); jobs whose stages differ otherwise (p-dht's warm-up mode among the params, each
    baseline kind's code) get a stage of their own, named by the values they share (`train-p-dht`)."""
    bodies = [(i, job, _stage_body(job, profile)) for i, job in enumerate(jobs)]
    rules = list(dict.fromkeys(job.rule for job in jobs))
    entries: list[tuple[int, str, dict[str, Any]]] = []
    for rule in rules:
        groups = _group_jobs([b for b in bodies if b[1].rule == rule])
        several = [g for g in groups if len(g.jobs) > 1 and g.template is not None]
        names = _group_names(rule, several)
        for group in groups:
            if any(g is group for g in several):
                name, fixed = names[id(group)]
                stage, keys = _group_stage(group, fixed)
                # The generator's own check: expanded as DVC expands it, the stage is every job's plain stage
                # (names included); a group that is not falls back to plain stages.
                expected = {f"{name}@{k}": body for k, (_, _, body) in zip(keys, group.jobs, strict=True)}
                if len(expected) == len(group.jobs) and expand_dvc_stages({name: stage}) == expected:
                    entries.append((group.jobs[0][0], name, stage))
                    continue
            entries += [(i, job.stage_name, body) for i, job, body in group.jobs]
    names = [name for _, name, _ in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RuntimeError(f"dvc.yaml would define these stages twice: {', '.join(duplicates)}")
    return {"stages": {name: stage for _, name, stage in sorted(entries, key=lambda e: e[0])}}


def dvc_yaml_text(stages: Mapping[str, Any], profile: str) -> str:
    """dvc.yaml's text for `dvc_stages`' result: the header, then the stages in order, matrix axes on one line."""
    return DVC_HEADER.format(profile=profile) + yaml.dump(stages, Dumper=_Dumper, sort_keys=False, width=1000)


def params_stage(root: str | Path = ".") -> dict[str, Any]:
    """The DVC-only stage :data:`PARAMS_STAGE`: params.yaml (all of it) resolved for its ``profile:`` into
    :data:`RESOLVED_PARAMS`, whose keys the other stages track. Its code is the configuration's (``dht config
    show`` and what it imports at the top), so a changed default reruns it too."""
    return {"cmd": PARAMS_CMD, "deps": module_code(f"{LIBRARY}.cli", root, top_level_only=True),
            "params": [{"params.yaml": None}], "outs": [RESOLVED_PARAMS]}


def render_dvc_yaml(root: str | Path = ".", profile: str = "default") -> str:
    stages = dvc_stages(snakemake_jobs(root, profile), profile)["stages"]
    if PARAMS_STAGE in stages:
        raise RuntimeError(f"a rule's stage is named {PARAMS_STAGE}, the name of DVC's resolved-params stage")
    return dvc_yaml_text({"stages": {PARAMS_STAGE: params_stage(root), **stages}}, profile)


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
    from dht.config_loading import load_config

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
    import os

    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _resolve_params(root: Path) -> None:
    """``dvc repro`` of :data:`PARAMS_STAGE` alone (a second; nothing when params.yaml is as dvc.lock has it), so
    that DVC compares every other stage's keys with params.yaml as it is now."""
    cmd = [_tool("dvc"), "repro", "--single-item", PARAMS_STAGE]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=_python_env())
    if done.returncode != 0:
        raise RuntimeError(f"`dvc repro {PARAMS_STAGE}` failed: {(done.stderr.strip() or done.stdout.strip())[-2000:]}")
