"""dvc.yaml's stages as DVC reads them, and what each tracks: the small part of the DVC tooling
(:mod:`dht_workflow.dvc_yaml`) that the stage scripts use, kept apart so that editing the generator does not rerun
them.

The stages track their params in :data:`RESOLVED_PARAMS`, the resolved profile (:mod:`dht_workflow.dvc_yaml`).
Which keys a stage reads can depend on values (a mode's search: a fixed mode reads no bandit key;
dht.features.warmup_steps: the warm-up's train keys), and dvc.yaml lists them as they were when ``dht dvc-yaml``
wrote it. A changed value reruns the stage, since the value is itself tracked; :func:`check_dvc_keys` makes that
run stop, naming the fix, instead of recording the stage in dvc.lock under a list that misses keys it now reads.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

RESOLVED_PARAMS = "params.resolved.yaml"
# A `${item.<name>}` slot of a `matrix:` / `foreach:` stage (the name in group 1).
ITEM_SLOT = re.compile(r"\$\{item\.([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_items(value: Any, item: Mapping[str, str]) -> Any:
    """A templated stage body with `${item.<name>}` filled in for one item (as DVC does; `${profile}` stays)."""
    if isinstance(value, dict):
        return {fill_items(k, item): fill_items(v, item) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_items(v, item) for v in value]
    if isinstance(value, str):
        return ITEM_SLOT.sub(lambda m: item[m.group(1)] if m.group(1) in item else m.group(0), value)
    return value


def expand_dvc_stages(stages: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """dvc.yaml's `stages:` as DVC runs them: every `matrix:` / `foreach:` stage expanded into its
    `<stage>@<item>` stages (`${item.<name>}` filled in; `${profile}` left to DVC). For the stages this module
    writes: DVC's own reading of them is `dvc stage list --all`."""
    out: dict[str, dict[str, Any]] = {}
    for name, stage in stages.items():
        if "matrix" in stage:
            axes = stage["matrix"]
            body = {k: v for k, v in stage.items() if k != "matrix"}
            for combo in itertools.product(*axes.values()):
                item = dict(zip(axes, map(str, combo), strict=True))
                out[f"{name}@{'-'.join(item.values())}"] = fill_items(body, item)
        elif "foreach" in stage:
            for key, item in stage["foreach"].items():
                out[f"{name}@{key}"] = fill_items(stage["do"], {k: str(v) for k, v in item.items()})
        else:
            out[name] = stage
    return out


def dvc_stage_keys(root: str | Path, stage: str) -> list[str] | None:
    """The params keys dvc.yaml lists for `stage` (an expanded name, as DVC's ``DVC_STAGE`` gives it) from
    :data:`RESOLVED_PARAMS`; None when dvc.yaml has no such stage."""
    path = Path(root) / "dvc.yaml"
    if not path.is_file():
        return None
    body = expand_dvc_stages((yaml.safe_load(path.read_text()) or {}).get("stages") or {}).get(stage)
    if body is None:
        return None
    return [k for entry in body.get("params") or [] if isinstance(entry, dict) for k in entry.get(RESOLVED_PARAMS) or []]


def check_dvc_keys(root: str | Path, keys: Iterable[str], profile: str) -> str | None:
    """Under ``dvc repro`` (DVC sets ``DVC_STAGE``): a problem when dvc.yaml tracks other params for the running
    stage than `keys`, the ones it reads now. Which keys a stage reads can depend on values (a mode's search, a
    warm-up), and dvc.yaml lists them as they were when it was generated: a changed value reruns the stage (the
    value is tracked), and this makes that run stop instead of recording the stage under a list that misses keys.
    `profile`: the one the stage runs, which dvc.yaml must be generated for."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return None
    listed = dvc_stage_keys(root, stage)
    if listed is None or sorted(listed) == sorted(keys):
        return None
    missing, extra = sorted(set(keys) - set(listed)), sorted(set(listed) - set(keys))
    changes = [f"now reads {', '.join(missing)}, which dvc.yaml does not track" if missing else "",
               f"no longer reads {', '.join(extra)}" if extra else ""]
    return (f"dvc.yaml is out of date for stage {stage}: params.yaml changed what it reads (it "
            f"{' and '.join(c for c in changes if c)}). Regenerate dvc.yaml (dht dvc-yaml --profile {profile}), "
            "then dvc repro")
