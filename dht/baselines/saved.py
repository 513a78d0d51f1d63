"""A baseline's model directory (``models/<dataset>/<baseline>/``): what the baseline stage writes beside the
kind's own files, and loading it back to predict with (``dht predict``, the benchmarks).

Each kind saves its model its own way, never as a pickle:

- ``distil-<k>``: ``save_pretrained`` (``config.json``, ``model.safetensors``), a DHT model every text runs whole;
- ``fastbert-<speed>``: the students only (``fastbert_students.safetensors``, ``fastbert.json``); their backbone
  is the teacher, the reference's own model directory, which ``baseline.json`` names (its path relative to this
  directory and the SHA-256 of its weights, so that students are never run on another teacher);
- ``nas-prune-<ratio>``: ``pruned_arch.json`` and ``pruned_model.pt`` (a state dict, read weights-only), the
  search in ``search/``;
- ``flexibert-<ratio>``: ``flexibert_config.json`` and ``model.safetensors``.

The stage then adds the tokenizer, ``baseline.json`` and, last, ``checksums.sha256``
(:func:`dht.baselines.finish_model_dir`). :func:`load_baseline` checks the checksums before it reads anything
(:mod:`dht.integrity`), then hands the directory to its kind's module, imported by name (``load(job) ->
Loaded``, :class:`dht.baselines.LoadJob`), which reads its own files back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import torch

from dht.baselines import BASELINE_FILE, KINDS, LoadJob
from dht.config import parse_baseline
from dht.evaluation import Predictions, SplitData
from dht.integrity import (
    IntegrityError,
    description,
    read_error,
    retrain_hint,
    verify_directory,
)
from dht.pretrained import sha256_file
from dht.results import POLICY_FILE


@dataclass
class SavedBaseline:
    """A baseline loaded from its model directory: what it is, its model, and its predictions on a split
    (``predict(data, batch_size, seq_len)``, in the pipeline's :class:`Predictions` format)."""

    name: str
    kind: str
    value: float
    info: dict[str, Any]
    model: Any
    predict: Callable[[SplitData, int, int], Predictions]
    vocab_size: int
    max_positions: int
    num_labels: int

    def summary(self) -> str:
        """What it is, for a user who expected a DHT model: the kind's title and what every text runs."""
        kind = KINDS[self.kind]
        return f"the baseline {self.name} ({kind.title}), not a DHT model: {kind.inference.format(value=self.value)}"


def teacher_dir(directory: Path, info: dict[str, Any]) -> Path:
    """The teacher a FastBERT baseline's students were distilled on, from its baseline.json."""
    recorded = info.get("teacher") or {}
    if "path" not in recorded:
        raise IntegrityError(f"{directory / BASELINE_FILE}: does not say where the teacher is (written before "
                             f"baselines recorded it); {retrain_hint(info)}")
    return Path(os.path.normpath(directory / recorded["path"]))


def load_baseline(directory: str | Path, device: torch.device, teacher: Any = None,
                  allow_unverified: bool = False, teacher_dir: str | Path | None = None) -> SavedBaseline:
    """The baseline saved in ``directory`` by the baseline stage, on ``device``, checked against its
    checksums.sha256 before anything in it is read (without one it is refused unless ``allow_unverified``).
    FastBERT's backbone is ``teacher`` when given (a loaded reference), else the teacher in ``teacher_dir`` (a
    copy of it elsewhere, as an MLflow model keeps it) or, by default, where its baseline.json says it is,
    checked the same way and against the SHA-256 of the weights the students were distilled on.
    Raises :class:`IntegrityError` (or FileNotFoundError when ``directory`` is not a baseline's) in one line."""
    directory = Path(directory)
    info_path = directory / BASELINE_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{directory}: not a baseline's model directory (no {BASELINE_FILE})")
    fix = retrain_hint(description(info_path))
    verify_directory(directory, fix, allow_unverified)  # before anything in it is read
    try:
        info = json.loads(info_path.read_text())
        name = info["model_name"]
        kind, value = parse_baseline(name)
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"{info_path}: not a baseline's description ({type(err).__name__}: {err}); {fix}") from err
    try:
        if teacher_dir is not None:
            info = {**info, "teacher": {**(info.get("teacher") or {}), "path": os.path.relpath(teacher_dir, directory)}}
        runs_on = _teacher(directory, device, teacher, info, fix, allow_unverified) if KINDS[kind].runs_on_teacher else None
        loaded = import_module(KINDS[kind].module).load(LoadJob(directory, device, value, fix, runs_on))
    except IntegrityError:
        raise
    except Exception as err:  # a missing or damaged file of the kind (each library raises its own types)
        raise read_error(directory, err, fix) from err
    return SavedBaseline(name, kind, value, info, loaded.model, loaded.predict, loaded.vocab_size,
                         loaded.max_positions, loaded.num_labels)


def _teacher(directory: Path, device: torch.device, teacher: Any, info: dict[str, Any], fix: str,
             allow_unverified: bool) -> Any:
    """The teacher a baseline that runs on it (FastBERT's students) was built on: `teacher` when given, else the
    model directory its baseline.json names, checked against its checksums and the SHA-256 of the weights the
    baseline was built on."""
    if teacher is not None:
        return teacher
    from dht.integrity import load_checked_model

    backbone = teacher_dir(directory, info)
    teacher_fix = retrain_hint(description(backbone / POLICY_FILE))
    teacher = load_checked_model(backbone, teacher_fix, allow_unverified).to(device).eval()
    expected = (info.get("teacher") or {}).get("sha256")
    if expected and sha256_file(backbone / "model.safetensors") != expected:
        raise IntegrityError(f"{backbone}: not the teacher the students of {directory} were distilled on (its "
                             f"weights changed since: retrained?); {fix}")
    return teacher
