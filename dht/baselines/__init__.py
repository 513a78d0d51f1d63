"""Baselines of Section 6.2 (Table 2): DistilBERT students (BL2), FastBERT (BL3), NAS pruning and FlexiBERT, behind
one registry.

A baseline is named ``<kind>-<value>`` (``distil-3``, ``fastbert-0.5``, ``nas-prune-0.5``, ``flexibert-0.5``;
:func:`dht.config.parse_baseline`). :data:`KINDS` says, for every kind, which ``baselines:`` section of
params.yaml it reads and which module builds it; :func:`run_baseline` builds one, with the same calling
convention for every kind: each module has ``run(value, job) -> BaselineRun``. The modules are imported by
name, only for a job of their kind, so a job's code (``workflow/rules/baselines.smk``, which reads the module and
the keys from here) is its kind's module and not the others'. Shared by the kinds: :mod:`dht.baselines.loop`
(the training loop) and :mod:`dht.baselines.inference` (inference of a static architecture).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from dht.config import Config
    from dht.evaluation import Predictions, SplitData
    from dht.model import DHTForSequenceClassification


@dataclass(frozen=True)
class Baseline:
    """One kind of baseline: its ``baselines:`` section in params.yaml, the module whose ``run`` builds it, and
    the other sections it reads."""

    kind: str
    section: str
    module: str
    also_reads: tuple[str, ...] = ()

    @property
    def params(self) -> list[str]:
        """The params.yaml keys a job of this kind reads (Snakemake reruns it when they change; DVC tracks them)."""
        return ["seed", "device", "train", f"baselines.{self.section}", *self.also_reads]


KINDS: dict[str, Baseline] = {b.kind: b for b in (
    Baseline("distil", "distil", "dht.baselines.distil"),
    Baseline("fastbert", "fastbert", "dht.baselines.fastbert"),
    Baseline("nas-prune", "nas_prune", "dht.baselines.nas_prune"),
    # The retrained architecture's dropout is the model section's.
    Baseline("flexibert", "flexibert", "dht.baselines.flexibert", also_reads=("model",)),
)}


class BaselineError(Exception):
    """A baseline cannot be built from what it was given (no search output, no architecture within the budget);
    the message says what to do."""


@dataclass(frozen=True)
class BaselineJob:
    """What every kind builds its baseline from."""

    cfg: Config
    teacher: DHTForSequenceClassification  # the trained reference (run.reference), in eval mode on `device`
    train: SplitData
    test: SplitData
    meta: dict[str, Any]  # the processed dataset's meta.json
    device: torch.device
    out_model: Path  # the model directory to write (absent)
    search: Path | None = None  # flexibert: the dataset's flexibert_search output directory

    @property
    def seq_len(self) -> int:
        """The padded length FLOPs are counted at."""
        return int(self.meta["max_length"])


@dataclass
class BaselineRun:
    """What building a baseline gave: its predictions on the test split, what the training cost (FLOPs, full
    convention), its training loss per epoch, and parameters for the MLflow run beyond the job's."""

    predictions: Predictions
    train_flops: float
    history: list[float]
    params: dict[str, Any] = field(default_factory=dict)


def run_baseline(kind: str, value: float, job: BaselineJob) -> BaselineRun:
    """Build the baseline ``<kind>-<value>`` (``parse_baseline``'s pair): train it, write it to ``job.out_model``
    and predict ``job.test``. Raises :class:`BaselineError` when its inputs cannot give one."""
    return import_module(KINDS[kind].module).run(value, job)
