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
(:mod:`dht.integrity`). It imports every kind's module, so the baseline stage, whose code is its kind's module
alone (``workflow/rules/baselines.smk``), does not import this one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dht.baselines import BASELINE_FILE
from dht.config import parse_baseline
from dht.evaluation import Predictions, SplitData
from dht.integrity import (
    IntegrityError,
    description,
    read_error,
    read_model,
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
        from dht.baselines import KINDS

        what = {"distil": f"every text runs its {int(self.value)} layers",
                "fastbert": f"a text leaves at the first layer whose student is surer than speed {self.value:g}",
                "nas-prune": "every text runs the same pruned architecture",
                "flexibert": "every text runs the same searched architecture"}[self.kind]
        return f"the baseline {self.name} ({KINDS[self.kind].title}), not a DHT model: {what}"


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
        model, run, dims = _LOADERS[kind](directory, device, value, teacher, info, fix, allow_unverified)
    except IntegrityError:
        raise
    except Exception as err:  # a missing or damaged file of the kind (each library raises its own types)
        raise read_error(directory, err, fix) from err
    return SavedBaseline(name, kind, value, info, model, run, *dims)


# ---- each kind: (model, predict(data, batch_size, seq_len), (vocab size, positions, labels)) ---------------------

Loaded = tuple[Any, Callable[[SplitData, int, int], Predictions], tuple[int, int, int]]


def _distil(directory: Path, device: torch.device, value: float, teacher: Any, info: dict[str, Any], fix: str,
            allow_unverified: bool) -> Loaded:
    from dht.baselines.distil import predict_student

    student = read_model(directory, fix).to(device).eval()
    c = student.config

    def run(data: SplitData, batch_size: int, seq_len: int) -> Predictions:
        return predict_student(student, data, device, batch_size, seq_len)

    return student, run, (c.vocab_size, c.max_position_embeddings, c.num_labels)


def _fastbert(directory: Path, device: torch.device, value: float, teacher: Any, info: dict[str, Any], fix: str,
              allow_unverified: bool) -> Loaded:
    from dht.baselines.fastbert import FastBERT, predict_fastbert
    from dht.integrity import load_checked_model

    if teacher is None:
        backbone = teacher_dir(directory, info)
        teacher_fix = retrain_hint(description(backbone / POLICY_FILE))
        teacher = load_checked_model(backbone, teacher_fix, allow_unverified).to(device).eval()
        expected = (info.get("teacher") or {}).get("sha256")
        if expected and sha256_file(backbone / "model.safetensors") != expected:
            raise IntegrityError(f"{backbone}: not the teacher the students of {directory} were distilled on (its "
                                 f"weights changed since: retrained?); {fix}")
    fastbert = FastBERT.load(directory, teacher)
    c = teacher.config

    def run(data: SplitData, batch_size: int, seq_len: int) -> Predictions:
        return predict_fastbert(fastbert, data, value, device, batch_size, seq_len)

    return fastbert, run, (c.vocab_size, c.max_position_embeddings, c.num_labels)


def _nas_prune(directory: Path, device: torch.device, value: float, teacher: Any, info: dict[str, Any], fix: str,
               allow_unverified: bool) -> Loaded:
    from dht.baselines.nas_prune import PrunedBert, predict_pruned

    pruned = PrunedBert.load(directory, device)  # its state dict read weights-only
    a = pruned.arch

    def run(data: SplitData, batch_size: int, seq_len: int) -> Predictions:
        return predict_pruned(pruned, data, device, batch_size, seq_len)

    return pruned, run, (a.vocab_size, a.max_position_embeddings, a.num_labels)


def _flexibert(directory: Path, device: torch.device, value: float, teacher: Any, info: dict[str, Any], fix: str,
               allow_unverified: bool) -> Loaded:
    from dht.baselines.flexibert import FlexiBertForSequenceClassification
    from dht.baselines.flexibert.search_stage import predictions

    flexi = FlexiBertForSequenceClassification.from_pretrained(directory, device=device)
    c = flexi.config

    def run(data: SplitData, batch_size: int, seq_len: int) -> Predictions:
        return predictions(flexi, data, batch_size, seq_len, device)

    return flexi, run, (c.vocab_size, c.max_len, c.num_labels)


_LOADERS: dict[str, Callable[..., Loaded]] = {"distil": _distil, "fastbert": _fastbert, "nas-prune": _nas_prune,
                                              "flexibert": _flexibert}
