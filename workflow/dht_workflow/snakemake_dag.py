"""The Snakemake workflow's DAG as a list of jobs, read through Snakemake's API: every job of a profile as if
nothing existed yet, with its command, inputs, outputs and tracked params keys (what dht_workflow.dvc_yaml turns
into DVC stages)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dht.config_loading import PROFILE_KEY


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

