"""Baselines of Section 6.2 (Table 2): DistilBERT students (BL2), FastBERT (BL3), NAS pruning and FlexiBERT, behind
one registry.

A baseline is named ``<kind>-<value>`` (``distil-3``, ``fastbert-0.5``, ``nas-prune-0.5``, ``flexibert-0.5``;
:func:`dht.config.parse_baseline`). :data:`KINDS` (defined in :mod:`dht.config`, with the ``baselines:`` sections'
models it names) says, for every kind, the values its name takes, which ``baselines:`` section of params.yaml it
reads and which module builds it; :func:`run_baseline` builds one, with the same calling convention for every
kind: each module has ``run(value, job) -> BaselineRun`` (and ``load``, :mod:`dht.baselines.saved`). The modules
are imported by name, only for a job of their kind, so a job's code (``workflow/rules/baselines.smk``, which reads
the module and the keys from here) is its kind's module and not the others'. Shared by the kinds:
:mod:`dht.baselines.loop` (the training loop) and :mod:`dht.baselines.inference` (inference of a static
architecture). docs/baselines.md, "Adding a baseline", says how to add a kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dht.config import KINDS as KINDS  # the registry, here where the kinds are built
from dht.config import FlexiBERTConfig

if TYPE_CHECKING:
    import torch

    from dht.config import Config
    from dht.curves import Dial
    from dht.evaluation import Predictions, SplitData
    from dht.model import DHTForSequenceClassification


# The params.yaml keys the flexibert_search stage reads (workflow/scripts/flexibert_search.py,
# dht.baselines.flexibert.search_stage.run_search): the design space, BOSHNAS's settings and each query's brief training
# (every baselines.flexibert key but the retraining's epochs), the FLOP budgets (the flexibert-<ratio> names in
# run.baselines), the data seed (one search per dataset) and the device, the training batches and dropout it shares with
# the retraining, and the reference's name (its figure's FLOP axis, dht.baselines.flexibert.search_stage.reference_name).
FLEXIBERT_SEARCH_PARAMS: tuple[str, ...] = (
    "data_seed", "device", "run.baselines", "run.reference", "model.hidden_dropout_prob", "train.batch_size", "train.eval_batch_size",
    *(f"baselines.flexibert.{k}" for k in FlexiBERTConfig.model_fields if k != "epochs"),
)


# A baseline's model directory's description, written last before its checksums (:func:`finish_model_dir`).
BASELINE_FILE = "baseline.json"


class BaselineError(Exception):
    """A baseline cannot be built from what it was given (no search output, no architecture within the budget);
    the message says what to do."""


@dataclass(frozen=True)
class BaselineJob:
    """What every kind builds its baseline from."""

    cfg: Config
    teacher: DHTForSequenceClassification  # the trained reference (run.reference), in eval mode on `device`
    train: SplitData
    val: SplitData  # the validation split (empty without one): FlexiBERT's retraining reports its accuracy on it
    meta: dict[str, Any]  # the processed dataset's meta.json
    device: torch.device
    out_model: Path  # the model directory to write (absent)
    search: Path | None = None  # flexibert: the dataset's flexibert_search output directory

    @property
    def seq_len(self) -> int:
        """The padded length FLOPs are counted at."""
        return int(self.meta["max_length"])

    @property
    def reference_train_flops(self) -> float:
        """What training the reference on this split costs (full convention, every epoch): the 1.00x of a
        baseline's training FLOP ratio."""
        from dht.flops import full_model_flops

        return full_model_flops(self.seq_len, self.teacher.config, "full", "train") * len(self.train) * self.cfg.train.epochs


@dataclass
class BaselineRun:
    """What building a baseline gave: its inference (a split's predictions, with the baseline's own inference rule:
    FastBERT's exits, a pruned model's heads; the stage runs it on the test and the validation split), what its own
    training cost (FLOPs, full convention; the passes over the training split, `epochs`, as
    :func:`dht.results.training_budget` counts them), its training loss per epoch (``history``, kept in its model
    directory's baseline.json), its training curves per optimizer step (``curves``: MLflow metric name -> (step,
    value), ``train_loss`` on the step axis of the DHT runs' ``train_loss``), and parameters for the MLflow run
    beyond the job's."""

    predict: Callable[[SplitData], Predictions]
    train_flops: float
    epochs: float
    history: list[float]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    # an inference dial (FastBERT's speed): the stage traces its accuracy-FLOPs curve (dht.curves)
    dial: Dial | None = None


@dataclass(frozen=True)
class LoadJob:
    """What every kind loads its saved model from (``load(job) -> Loaded``, called by
    :func:`dht.baselines.saved.load_baseline` once the directory's checksums are checked): the model directory, the
    device, the name's value, what to do when a file of it is bad (`fix`, for an :class:`dht.integrity.IntegrityError`
    message) and, for a kind that runs on the teacher (``runs_on_teacher``), the loaded, checked teacher."""

    directory: Path
    device: torch.device
    value: float
    fix: str
    teacher: DHTForSequenceClassification | None = None


@dataclass(frozen=True)
class Loaded:
    """A kind's saved model loaded back: the model, its predictions on a split (``predict(data, batch_size,
    seq_len)``, the pipeline's :class:`Predictions`, with the kind's own inference rule), and the inputs it takes and
    the labels it gives (``dht predict`` checks a dataset against them)."""

    model: Any
    predict: Callable[[SplitData, int, int], Predictions]
    vocab_size: int
    max_positions: int
    num_labels: int


def load_reference(cfg: Config, dataset: str, directory: Path, device: torch.device) -> DHTForSequenceClassification:
    """The trained reference (``run.reference``) every baseline learns from and is measured against, from its model
    directory, checked against its checksums (:mod:`dht.integrity`), in eval mode on `device`. Raises
    :class:`BaselineError` for a directory of another mode (or none): its FLOPs are the 1.00x, so another model
    would measure every baseline against the wrong one."""
    import json

    from dht.integrity import IntegrityError, load_checked_model, retrain_hint
    from dht.results import POLICY_FILE, run_subdir

    policy_file = directory / POLICY_FILE
    trained_as = json.loads(policy_file.read_text()).get("mode_name") if policy_file.is_file() else None
    if trained_as != cfg.run.reference:
        raise BaselineError(
            f"{directory}: not the trained reference {cfg.run.reference!r} of run.reference ({policy_file} names "
            f"{trained_as!r}); train it first (snakemake --cores 4 results/{dataset}/{cfg.run.reference}/metrics.json)")
    results = f"results/{run_subdir(cfg, dataset, cfg.run.reference, cfg.training_seed)}"
    try:
        teacher = load_checked_model(directory, retrain_hint({"results": results}))
    except IntegrityError as err:
        raise BaselineError(f"{directory}: {err}") from err
    return teacher.to(device).eval()


def finish_model_dir(out_model: Path, tokenizer: Path, info: dict[str, Any], teacher: Path) -> None:
    """Complete a baseline's model directory once its kind has saved the model there: the dataset's tokenizer,
    :data:`BASELINE_FILE` (``info``: model_name, dataset, classes, max_length, results, history; plus the kind and
    value, where the teacher is relative to the directory and the SHA-256 of its weights, by which FastBERT's
    students find their backbone) and last the checksums of every file (:mod:`dht.integrity`).
    :func:`dht.baselines.saved.load_baseline` reads it back."""
    import json
    import os
    import shutil

    from dht.config import parse_baseline
    from dht.integrity import write_manifest
    from dht.pretrained import sha256_file

    shutil.copytree(tokenizer, out_model / "tokenizer", dirs_exist_ok=True)
    kind, value = parse_baseline(info["model_name"])
    described = {**info, "kind": kind, "value": value,
                 "teacher": {"path": os.path.relpath(teacher, out_model),
                             "sha256": sha256_file(teacher / "model.safetensors")}}
    (out_model / BASELINE_FILE).write_text(json.dumps(described, indent=2) + "\n")
    write_manifest(out_model)


def run_params(cfg: Config, dataset: str, name: str, device: torch.device) -> dict[str, Any]:
    """The MLflow params of a baseline run: what it is, and the params.yaml keys it reads (``KINDS[kind].params``,
    the list its rule tracks)."""
    from dht.config import parse_baseline

    kind, value = parse_baseline(name)
    return {**{key: cfg.section(key) for key in KINDS[kind].params}, "model_name": name, "dataset": dataset,
            "training_seed": cfg.training_seed, "device": str(device), "baseline.kind": kind, "baseline.value": value}


def run_baseline(kind: str, value: float, job: BaselineJob) -> BaselineRun:
    """Build the baseline ``<kind>-<value>`` (``parse_baseline``'s pair): train it on ``job.train`` and write it to
    ``job.out_model``; the result's ``predict`` runs it on a split. Raises :class:`BaselineError` when its inputs
    cannot give one."""
    return import_module(KINDS[kind].module).run(value, job)
