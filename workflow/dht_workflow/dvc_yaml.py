"""One source of truth for the DAG: the Snakemake workflow. `dvc.yaml` is generated from its jobs (`dht dvc-yaml`).

:func:`dht_workflow.snakemake_dag.snakemake_jobs` builds the workflow's DAG for a profile (every job, as if nothing
existed yet) through Snakemake's API; :func:`dvc_stages` turns each job into a DVC stage with the same command,
inputs (``deps``), outputs (``outs``) and tracked params, and writes the jobs of a rule whose stages differ only in
their wildcard values as one ``matrix:`` (or ``foreach:``) stage, which DVC expands back into them
(``train@sst2-t-dht``). The commands leave out Snakemake's ``--profile``: a stage then runs params.yaml's
``profile:`` (validated as a name before use), and every stage's params are read from the profile resolved by
:data:`PARAMS_STAGE`, so ``dvc exp run -S <key>=<value>`` runs an experiment of params.yaml's profile. dvc.yaml
lists one profile's jobs: another profile (``-S profile=tiny``) needs ``dht dvc-yaml --profile tiny`` first.

A stage's ``params:`` are the keys its job tracks, read by DVC from ``params.resolved.yaml``: the profile as the
stages see it, resolved (defaults filled in, overlays applied), written by a stage of DVC's own,
``resolve_params`` (:data:`PARAMS_STAGE`), from params.yaml. DVC compares the values of the keys a stage tracks,
as Snakemake does: params.yaml itself leaves defaults unwritten and spreads a profile over overlays, so its raw
keys could not say what a stage reads.

``tests/test_pipeline.py`` regenerates dvc.yaml and fails when it differs from the committed file.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dht.results import PAIRED_FILE, PAIRED_SEEDS_FILE
from dht_workflow.dvc_params import ITEM_SLOT, RESOLVED_PARAMS, expand_dvc_stages, fill_items
from dht_workflow.snakemake_dag import Job, snakemake_jobs
from dht_workflow.stage_code import module_code

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
    return {"cmd": PARAMS_CMD, "deps": module_code("dht.cli", root, top_level_only=True),
            "params": [{"params.yaml": None}], "outs": [RESOLVED_PARAMS]}


def render_dvc_yaml(root: str | Path = ".", profile: str = "default") -> str:
    stages = dvc_stages(snakemake_jobs(root, profile), profile)["stages"]
    if PARAMS_STAGE in stages:
        raise RuntimeError(f"a rule's stage is named {PARAMS_STAGE}, the name of DVC's resolved-params stage")
    return dvc_yaml_text({"stages": {PARAMS_STAGE: params_stage(root), **stages}}, profile)

