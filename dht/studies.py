"""Studies: named overlays of a profile, trained and evaluated by the pipeline on the validation split.

A *study* (workflow/studies.yaml, :data:`STUDIES_FILE`) measures settings the paper leaves open (docs/real-text.md,
section 3; docs/pipeline.md, "Studies"). Each *setting* is the study's profile with one or more named *overlays*
applied: a setting's name is overlay names joined by ``+`` (``ucb_alpha-3+gamma-0.25`` merges both, left to right),
deep-merged into the resolved profile and validated again through the pydantic model and the semantic checks
(:func:`dht.config_checks.check_semantics`), so a typo in an overlay fails like a typo in params.yaml, before any job
runs. params.yaml is never edited and no profile is added to it.

Every run of a study is the pipeline's own train stage (workflow/scripts/train.py ``--overlay <the setting's
overlay, JSON> --study <study> --setting <setting>``, workflow/rules/studies.smk) evaluated on the **validation
split** (``--split val``): a study chooses settings, and a setting chosen on the test
split would make its test figures no longer measure what a user gets (docs/pipeline.md, "The validation split").
A chosen setting's test figures come from the pipeline (a mode in params.yaml, such as ``t-dht-val``). The reference
and the control train once per study, under the setting ``default`` (the empty overlay), on every dataset: the depth
analysis and the control-reference line of every setting compare with them, and a mode with ``init: reference``
(docs/training.md T30) starts from that reference.

This module is the file's model and the jobs it asks for; the study's tables are :mod:`dht.study_report`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from dht.config import ARM_FEATURE_KEYS, Config, ConfigError
from dht.config_checks import format_validation_error
from dht.config_loading import apply_overlay, deep_merge, load_config, read_params

STUDIES_FILE = "workflow/studies.yaml"
SPLIT = "val"  # what every study run is evaluated on (metrics.json's "split"); never the test split
DEFAULT_SETTING = "default"  # the empty overlay: the profile as it is; the reference and control train under it
JOIN = "+"  # joins overlay names into a setting name

# An overlay's or a study's name: a folder name and a Snakemake wildcard value, so no '/', '+', space or shell
# character (dht.config's rule for names, with '.' allowed: `lr-3e-5`, `price-0.02`). A setting name is such names
# joined by '+', which is safe in a path and a shell word too.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit"
# Sections a study's overlay may not change: the data, the tokenizer and the arm features are the profile's,
# built once by the pipeline's upstream stages and shared by every setting, and the runs (which models, which
# reference) are the study's own. A setting that needs other data is a profile of params.yaml.
UPSTREAM_KEYS = ("data_seed", "data", "datasets", "tokenizer", "run", "dht.fixed_layers", "dht.group_size",
                 *(f"dht.features.{k}" for k in ARM_FEATURE_KEYS))
# model.* is the arm_features stage's initial model, except the exit heads, which training sets (T29)
MODEL_KEYS_TRAINING_SETS = ("exit_heads",)


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid name ({NAME_RULE})")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExtraRuns(_Strict):
    """Runs beyond the study's settings x datasets x models: `models` under `setting` (e.g. a fixed 4-layer model
    to compare with, or the fixed modes at another epoch count), on `datasets` (default: the study's)."""

    setting: str
    models: list[str] = Field(min_length=1)
    datasets: list[str] | None = None


class Selection(_Strict):
    """The rule that chooses a setting (:func:`dht.study_report.select`), written before the study's runs are read:
    among the settings of `model` at no more than `flop_budget` x the reference's inference FLOPs on every dataset,
    the one furthest above the control-reference line on average."""

    model: str
    flop_budget: float = Field(gt=0)


class Readings(_Strict):
    """T25's and T27's readings (:func:`dht.study_report.readings`): the reward shares of the default setting's
    fixed models on `dataset` (a binary one) at each of `prices`, and the exit quartiles of `setting`'s `model`."""

    setting: str
    dataset: str
    model: str
    prices: list[float] = Field(min_length=1)


class Study(_Strict):
    """One study: `models` trained under each of `settings` on each of `datasets` (default: the profile's
    run.datasets), plus `runs`; the reference and control of `profile` under ``default``."""

    about: str
    profile: str
    datasets: list[str] | None = None
    models: list[str] = Field(min_length=1)
    settings: list[str] = Field(min_length=1)
    runs: list[ExtraRuns] = []
    select: Selection | None = None
    readings: Readings | None = None
    ladder: bool = False  # the exit ladder of every DHT run (dht.study_report.ladder_table)

    @field_validator("settings")
    @classmethod
    def _has_default(cls, settings: list[str]) -> list[str]:
        if DEFAULT_SETTING not in settings:
            raise ValueError(f"must list {DEFAULT_SETTING!r}: the reference and control train under it, and every "
                             "setting is read against them")
        if len(set(settings)) != len(settings):
            raise ValueError("lists a setting twice")
        return settings


class StudiesFile(_Strict):
    """workflow/studies.yaml: the named overlays (each a partial params.yaml) and the studies made of them."""

    overlays: dict[str, dict[str, Any]]
    studies: dict[str, Study]

    @field_validator("overlays", "studies")
    @classmethod
    def _names(cls, named: dict[str, Any]) -> dict[str, Any]:
        for name in named:
            _check_name(name)
        return named

    _source: str = PrivateAttr(default=STUDIES_FILE)

    def problems(self) -> list[str]:
        """What is wrong across the file's entries: settings naming no overlay, rules naming no setting or model."""
        out = [] if self.overlays.get(DEFAULT_SETTING) == {} else [
            f"overlays.{DEFAULT_SETTING} must be {{}} (the profile as it is)"]
        for name, study in self.studies.items():
            for setting in study_settings(study):
                out += [f"studies.{name}: setting {setting!r}: unknown overlay {a!r}; defined in overlays: "
                        f"{', '.join(self.overlays)}" for a in setting.split(JOIN) if a not in self.overlays]
            if study.readings and study.readings.setting not in study.settings:
                out.append(f"studies.{name}.readings.setting {study.readings.setting!r} is not one of its settings")
            if study.select and study.select.model not in study.models:
                out.append(f"studies.{name}.select.model {study.select.model!r} is not one of its models")
        return out

    def overlay(self, setting: str) -> dict[str, Any]:
        """The overlay of a setting name: its overlays merged left to right."""
        out: dict[str, Any] = {}
        for name in setting.split(JOIN):
            if name not in self.overlays:
                raise ConfigError(f"setting {setting!r}: unknown overlay {name!r}; defined: {', '.join(self.overlays)}")
            out = deep_merge(out, self.overlays[name])
        return out

    def study(self, name: str) -> Study:
        if name not in self.studies:
            raise ConfigError(f"no study {name!r} in {STUDIES_FILE}; defined: {', '.join(self.studies)}")
        return self.studies[name]


def study_settings(study: Study) -> list[str]:
    """Every setting a study trains under: its settings, then those only its extra runs name."""
    return list(dict.fromkeys([*study.settings, *(r.setting for r in study.runs)]))


def load_studies(path: str | Path = STUDIES_FILE) -> StudiesFile:
    """The studies file, validated (names, overlays known); :class:`ConfigError` naming the file and the key."""
    raw = read_params(path)  # YAML errors and a key written twice with their line and column
    try:
        studies = StudiesFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(str(path), err, raw, [])) from None
    if problems := studies.problems():
        raise ConfigError(f"{path} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    studies._source = str(path)
    return studies


def setting_config(base: Config, overlay: Mapping[str, Any], label: str) -> Config:
    """`base` (a resolved profile) with `overlay` deep-merged and validated as params.yaml is (structure, then
    semantics), and refused when it changes what the upstream stages built (:data:`UPSTREAM_KEYS`). `label` names
    the setting in the messages."""
    cfg = apply_overlay(base, overlay, label)  # what the train stage's --overlay applies again
    problems = []
    changed = [k for k in UPSTREAM_KEYS if cfg.section(k) != base.section(k)]
    changed += [f"model.{k}" for k in type(base.model).model_fields
                if k not in MODEL_KEYS_TRAINING_SETS and getattr(cfg.model, k) != getattr(base.model, k)]
    if changed:
        problems.append(f"changes {', '.join(changed)}, which the data and arm_features stages read (or which says "
                        "what runs): a study reuses its profile's data and arm features; make a profile in "
                        "params.yaml for that")
    if problems:
        raise ConfigError(f"{label} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


class Run(NamedTuple):
    """One training job of a study."""

    setting: str
    dataset: str
    model: str


class ResolvedStudy(NamedTuple):
    """A study with its profile and the configuration of each of its settings, all validated."""

    name: str
    study: Study
    profile: Config
    configs: dict[str, Config]
    overlays: dict[str, dict[str, Any]]

    @property
    def datasets(self) -> list[str]:
        return list(self.study.datasets or self.profile.run.datasets)

    def runs(self) -> list[Run]:
        """Every job: the reference and control under ``default``, then each setting's models, then the extra
        runs, each once, in that order."""
        fixed = [m for m in (self.profile.run.reference, self.profile.run.control) if m]
        out = [Run(DEFAULT_SETTING, d, m) for d in self.datasets for m in fixed]
        out += [Run(s, d, m) for s in self.study.settings for d in self.datasets for m in self.study.models]
        out += [Run(r.setting, d, m) for r in self.study.runs for d in (r.datasets or self.datasets) for m in r.models]
        return list(dict.fromkeys(out))

    def reference_run(self, dataset: str) -> Run:
        """The run a mode with ``init: reference`` of this study starts from: the default setting's reference."""
        return Run(DEFAULT_SETTING, dataset, self.profile.run.reference)

    def starts_from_reference(self, run: Run) -> bool:
        return self.configs[run.setting].dht.modes[run.model].init == "reference"


def resolve_study(studies: StudiesFile, name: str, params: str | Path = "params.yaml",
                  profile: Config | None = None) -> ResolvedStudy:
    """Study `name` with every setting's configuration resolved against its profile (read from `params` unless
    given) and every run checked (a mode of its setting, a dataset of the profile), before any job runs."""
    study = studies.study(name)
    base = profile if profile is not None else load_config(params, profile=study.profile)
    where = f"{studies._source}: study {name!r}"
    if base.profile != study.profile:
        raise ConfigError(f"{where} runs on profile {study.profile!r}, not {base.profile!r}; run it with "
                          f"--config profile={study.profile}")
    overlays = {s: studies.overlay(s) for s in study_settings(study)}
    configs = {s: setting_config(base, o, f"{where}, setting {s!r}") for s, o in overlays.items()}
    resolved = ResolvedStudy(name, study, base, configs, overlays)
    problems = [f"datasets: {d!r} is not in run.datasets of profile {base.profile!r} ({', '.join(base.run.datasets)}),"
                " whose data the pipeline builds" for d in resolved.datasets if d not in base.run.datasets]
    for extra in study.runs:
        problems += [f"runs: dataset {d!r} is not one of the study's datasets ({', '.join(resolved.datasets)})"
                     for d in extra.datasets or [] if d not in resolved.datasets]
    for run in resolved.runs():
        if run.model not in configs[run.setting].dht.modes:
            problems.append(f"setting {run.setting!r}: {run.model!r} is not a mode (dht.modes: "
                            f"{', '.join(configs[run.setting].dht.modes)})")
    if study.readings:
        r = study.readings
        if r.dataset not in resolved.datasets:
            problems.append(f"readings.dataset {r.dataset!r} is not one of the study's datasets")
        if (r.setting, r.model) not in {(x.setting, x.model) for x in resolved.runs()}:
            problems.append(f"readings: {r.setting}/{r.model} is not one of the study's runs")
    if problems:
        raise ConfigError(f"{where} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return resolved
