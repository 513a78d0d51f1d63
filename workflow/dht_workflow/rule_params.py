"""The params.yaml values a rule's jobs read, as Snakemake compares them, and the one `--config` a run may set.

Each stage's list of keys lives in the library, beside the code that reads them (dht.config.run_param_keys, ...);
a rule's `params: tracked=...` holds their resolved values, so Snakemake reruns a job whose values changed, and
`dht dvc-yaml` turns the keys into the DVC stage's `params:` (dht_workflow.dvc_yaml).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dht.config import Config, ConfigError
from dht.config_loading import PROFILE_KEY, read_params


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

