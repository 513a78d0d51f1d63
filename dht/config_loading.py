"""params.yaml read and resolved for one profile, then validated: :func:`load_config`, before any job runs.

`params.yaml` holds the default profile at its top level and, under `profiles:`, overlays that list only what
they change. :func:`load_config` deep-merges the chosen overlay, validates the structure with pydantic
(:class:`dht.config.Config`) and then runs the checks of :mod:`dht.config_checks`; every problem found is
reported at once.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dht.config import NOT_A_NAME, Config, ConfigError, is_name, with_entry_defaults
from dht.config_checks import (
    booleans_for_numbers,
    check_semantics,
    dataset_path_problems,
    format_validation_error,
)

PROFILE_KEY = "profile"
OVERLAYS_KEY = "profiles"
EXTENDS_KEY = "extends"  # a profile that starts from another one

# Keys renamed so that their names say what they are, by their old path ("*": any dataset): each is refused with
# its new name rather than accepted under two spellings. `seed` drew the data and, unless run.seeds was set, the
# training too; now data_seed draws the data and run.training_seeds lists the trainings' seeds.
RENAMED = {
    ("seed",): "data_seed (it draws the data: the validation split, the subsets, the embedded data, the arm "
               "features, the FlexiBERT search); the trainings' seeds are run.training_seeds",
    ("run", "seeds"): "run.training_seeds (a list, always set: [0] for one run)",
    ("datasets", "*", "seed"): "data_seed, as the top-level data_seed it replaces for this dataset",
}


def renamed_key_problems(resolved: Mapping[str, Any]) -> list[str]:
    """One message per key of :data:`RENAMED` written under its old name, naming the new one."""
    problems = []

    def walk(node: Any, path: tuple[str, ...], shown: str) -> None:
        for old, new in RENAMED.items():
            if len(old) == len(path) and all(o in ("*", p) for o, p in zip(old, path, strict=True)):
                problems.append(f"{shown}: renamed; write {new}")
        if isinstance(node, Mapping) and len(path) < max(map(len, RENAMED)):
            for key, value in node.items():
                walk(value, (*path, str(key)), f"{shown}.{key}".lstrip("."))

    walk(resolved, (), "")
    return problems


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; everything else in `overlay` replaces what `base` had."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (it would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` merges: later keys override them on purpose
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):  # an unhashable key is the base loader's error to report
                if key in first:
                    raise _DuplicateKey(
                        None, None,
                        f"key {key!r} is written twice in this mapping (first on line {first[key] + 1}); YAML would "
                        "keep the last one silently: delete one of them", key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """params.yaml as a mapping; invalid YAML and a key written twice are refused with the line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file. Run from the project root, or pass the path of params.yaml.")
    try:
        with path.open(encoding="utf-8") as fh:  # a stream, so that YAML's messages name the file
            data = yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except _DuplicateKey as err:
        mark = err.problem_mark
        raise ConfigError(f"{path}, line {mark.line + 1}, column {mark.column + 1}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of sections (profile, datasets, run, model, ...)")
    return data


def resolve_params(raw: Mapping[str, Any], profile: str | None = None) -> dict[str, Any]:
    """Apply the chosen profile's overlay to the top-level (default) sections.

    An overlay may start from another profile with ``extends: <profile>`` (resolved first, recursively): the
    ``tiny`` CI profile is the ``embedded`` profile made smaller, without restating it."""
    overlays = raw.get(OVERLAYS_KEY) or {}
    if not isinstance(overlays, Mapping):
        raise ConfigError(f"{OVERLAYS_KEY}: must be a mapping of profile name to overlay")
    problems = profile_name_problems(raw, profile)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) with profile names:\n" + "\n".join(f"  - {p}" for p in problems))
    name = profile if profile is not None else raw.get(PROFILE_KEY, "default")
    base = {k: v for k, v in raw.items() if k not in (OVERLAYS_KEY, PROFILE_KEY)}
    resolved = _apply_overlay(base, overlays, name, [])
    resolved[PROFILE_KEY] = name
    return resolved


def profile_name_problems(raw: Mapping[str, Any], profile: str | None = None) -> list[str]:
    """Profile names follow :data:`dht.config.NAME_PATTERN` (they reach every stage's command line as
    ``--profile``): the keys of `profiles:`, their `extends:`, the `profile:` selection and `profile`, the one
    asked for (``snakemake --config profile=NAME``, a stage's ``--profile``). One message per bad name."""
    problems: list[str] = []

    def check(key: str, value: Any, is_key: bool = False) -> None:
        if not is_name(value):
            shown = json.dumps(value, default=str)
            problems.append(f"{key}: key {shown}: {NOT_A_NAME}" if is_key else f"{key} = {shown}: {NOT_A_NAME}")

    if PROFILE_KEY in raw:
        check(PROFILE_KEY, raw[PROFILE_KEY])
    if profile is not None:
        check(f"{PROFILE_KEY} (the one asked for)", profile)
    overlays = raw.get(OVERLAYS_KEY) or {}
    for name, overlay in overlays.items() if isinstance(overlays, Mapping) else ():
        check(OVERLAYS_KEY, name, is_key=True)
        if isinstance(overlay, Mapping) and EXTENDS_KEY in overlay:
            check(f"{OVERLAYS_KEY}.{name}.{EXTENDS_KEY}", overlay[EXTENDS_KEY])
    return problems


def _apply_overlay(base: dict[str, Any], overlays: Mapping[str, Any], name: str, chain: list[str]) -> dict[str, Any]:
    if name not in overlays and name != "default":
        raise ConfigError(
            f"profile = {name!r}: unknown profile; allowed: {', '.join(sorted(overlays) or ['default'])}"
        )
    if name in chain:
        raise ConfigError(f"{OVERLAYS_KEY}: profiles extend each other in a cycle: {' -> '.join([*chain, name])}")
    overlay = overlays.get(name) or {}
    if not isinstance(overlay, Mapping):
        raise ConfigError(f"{OVERLAYS_KEY}.{name}: must be a mapping (use {{}} for no changes)")
    if PROFILE_KEY in overlay or OVERLAYS_KEY in overlay:
        raise ConfigError(f"{OVERLAYS_KEY}.{name}: an overlay cannot set '{PROFILE_KEY}' or '{OVERLAYS_KEY}'")
    parent = overlay.get(EXTENDS_KEY)
    if parent is not None:
        if not isinstance(parent, str) or parent not in overlays:
            raise ConfigError(
                f"{OVERLAYS_KEY}.{name}.{EXTENDS_KEY} = {parent!r}: must name another profile; allowed: "
                f"{', '.join(sorted(p for p in overlays if p != name))}"
            )
        base = _apply_overlay(base, overlays, parent, [*chain, name])
    return deep_merge(base, {k: v for k, v in overlay.items() if k != EXTENDS_KEY})


def load_config(
    path: str | Path = "params.yaml", profile: str | None = None, raw: Mapping[str, Any] | None = None
) -> Config:
    """Read, resolve and validate params.yaml for `profile` (default: its `profile:` key).

    Raises :class:`ConfigError` listing every problem found, each naming the key, the value and what is
    allowed.
    """
    if raw is None:
        raw = read_params(path)
    resolved = resolve_params(raw, profile)
    where = f"{Path(path).name} (profile '{resolved[PROFILE_KEY]}')"
    renamed = renamed_key_problems(resolved)
    if renamed:  # before validation, which would add "unknown key" and "required" for each of them
        raise ConfigError(f"{where} has {len(renamed)} problem(s):\n" + "\n".join(f"  - {p}" for p in renamed))
    booleans = booleans_for_numbers(Config, with_entry_defaults(resolved))  # a default's yes, where it lands
    try:
        cfg = Config.model_validate(resolved)
    except ValidationError as err:
        raise ConfigError(format_validation_error(where, err, resolved, booleans)) from None
    problems = booleans + check_semantics(cfg) + dataset_path_problems(cfg, Path(path).parent)
    if problems:
        raise ConfigError(f"{where} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def apply_overlay(base: Config, overlay: Mapping[str, Any], where: str) -> Config:
    """A resolved profile with `overlay` (a partial params.yaml) deep-merged into it, validated again as params.yaml
    is (structure, then the semantic checks): a study's setting (dht.studies). :class:`ConfigError` names `where`
    and every problem."""
    if not isinstance(overlay, Mapping):
        raise ConfigError(f"{where}: an overlay is a mapping of params.yaml sections, not {type(overlay).__name__}")
    data = deep_merge(base.model_dump(mode="json"), overlay)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(where, err, data, [])) from None
    if problems := check_semantics(cfg):
        raise ConfigError(f"{where} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg

