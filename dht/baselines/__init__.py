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

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dht.config import FlexiBERTConfig

if TYPE_CHECKING:
    import torch

    from dht.config import Config
    from dht.evaluation import Predictions, SplitData
    from dht.model import DHTForSequenceClassification


@dataclass(frozen=True)
class Baseline:
    """One kind of baseline: its ``baselines:`` section in params.yaml, the module whose ``run`` builds it, whether
    its weights start from the trained reference (its training budget then includes the reference's,
    :func:`dht.results.training_budget`), and the params.yaml keys of its own that a job of the kind reads
    (``reads``; default: its whole section)."""

    kind: str
    section: str
    module: str
    title: str  # what it is, in words (dht predict says it of a baseline's model directory)
    starts_from_reference: bool
    reads: tuple[str, ...] = ()
    runs_on_teacher: bool = False  # its model directory runs on the teacher's (FastBERT's students on its backbone)

    @property
    def params(self) -> list[str]:
        """The params.yaml keys a job of this kind reads (workflow/scripts/baseline.py, this package, the kind's
        module): the device; train.epochs (the reference's training FLOPs, the 1.00x of its training
        FLOP ratio), train.batch_size and train.eval_batch_size (its training and test batches); and its own
        keys. Not the `model:` section (the kind reads the trained reference, an input), nor train.log_model
        (MLflow only). Its training seed is not a key (the job's --training-seed, one of run.training_seeds, in its
        MLflow params as training_seed). Snakemake reruns a job when their values change and DVC tracks them; tests/test_pipeline.py
        checks them against what a job really reads."""
        return ["device", "train.epochs", "train.batch_size", "train.eval_batch_size",
                *(self.reads or (f"baselines.{self.section}",))]


# The flexibert-<ratio> baseline retrains the architecture its dataset's search chose (dht.flexibert.search_stage
# .retrain): for baselines.flexibert.epochs, with the search's learning rate, batches and dropout (_train_kwargs).
# Everything else of baselines.flexibert is the search's (FLEXIBERT_SEARCH_PARAMS), an input of the baseline.
FLEXIBERT_RETRAINING = ("epochs", "learning_rate")
KINDS: dict[str, Baseline] = {b.kind: b for b in (
    # A student of the reference's layers; FastBERT's students on the reference's backbone; a supernet of it.
    Baseline("distil", "distil", "dht.baselines.distil", "a DistilBERT student of the reference",
             starts_from_reference=True),
    Baseline("fastbert", "fastbert", "dht.baselines.fastbert", "FastBERT: the reference with early-exit students",
             starts_from_reference=True, runs_on_teacher=True),
    Baseline("nas-prune", "nas_prune", "dht.baselines.nas_prune", "the reference pruned by differentiable NAS",
             starts_from_reference=True),
    # Searched and retrained from scratch (the reference only sets the FLOP budget); its search is its own cost.
    Baseline("flexibert", "flexibert", "dht.baselines.flexibert", "the best FlexiBERT architecture within a FLOP budget",
             starts_from_reference=False,
             reads=(*(f"baselines.flexibert.{k}" for k in FLEXIBERT_RETRAINING), "model.hidden_dropout_prob")),
)}

# The params.yaml keys the flexibert_search stage reads (workflow/scripts/flexibert_search.py,
# dht.flexibert.search_stage.run_search): the design space, BOSHNAS's settings and each query's brief training
# (every baselines.flexibert key but the retraining's epochs), the FLOP budgets (the flexibert-<ratio> names in
# run.baselines), the data seed (one search per dataset) and the device, the training batches and dropout it shares with the retraining, and the
# reference's name (its figure's FLOP axis, dht.flexibert.search_stage.reference_name).
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
