"""A run's results: writing a DHT run's files, where runs live, and reading them back (one reader for the reports
and the figures).

A run is one model (a DHT mode, a fixed mode or a baseline) trained on one dataset with one training seed. With
one seed (``run.training_seeds: [0]``) its files are ``results/<dataset>/<model>/`` and
``models/<dataset>/<model>/``, as they always were; with several (``run.training_seeds: [0, 1, 2]``) each seed has its
own directory below them, ``results/<dataset>/<model>/seed-<s>/``. The reports then show the mean and the
standard deviation over the seeds (:func:`read_metrics`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from dht.config import Config

SEED_DIR = "seed-{seed}"
# A dataset's paired comparisons (the `compare` stage, dht.comparison), beside its models' directories: one name
# per layout, so a `seeds` profile's run (several seeds) and a one-seed run keep theirs side by side.
PAIRED_FILE = "paired.json"
PAIRED_SEEDS_FILE = "paired-seeds.json"
# A trained DHT model directory's description (mode, policy, resolved config), written beside its weights.
POLICY_FILE = "dht_policy.json"
# metrics.json keys that are one run's own interval or bookkeeping, not a quantity to average over seeds.
_NOT_AVERAGED = ("accuracy_ci95",)


# --- writing a run's results ------------------------------------------------------------------------------


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def training_budget(own_flop_ratio: float, own_epochs: float, start: dict[str, Any] | None) -> dict[str, Any]:
    """What obtaining a model cost, as metrics.json records it (docs/pipeline.md, "Budgets"). FLOP ratios are
    relative to the reference's training (its 1.00x):

    - ``train_flop_ratio``: the model's own training (search included, for NAS pruning and FlexiBERT), the key's
      meaning before budgets were totals, kept for compatibility;
    - ``start_flop_ratio``: the training of the model it starts from, `start` (that model's metrics.json; the
      trained reference for distil, fastbert and nas-prune), as that model recorded its total; 0 from the
      pretrained checkpoint or from scratch (`start` None: its pretraining is charged to no model);
    - ``train_flop_ratio_total`` = start + own;
    - ``epochs_own``: the passes over the training split the model's own training made (a search that trains on
      part of it counts its samples over the split's size), ``epochs_total`` = the start's total + own."""
    start_ratio = 0.0 if start is None else float(start["train_flop_ratio_total"])
    start_epochs = 0 if start is None else start["epochs_total"]
    return {"train_flop_ratio": own_flop_ratio, "start_flop_ratio": start_ratio,
            "train_flop_ratio_total": start_ratio + own_flop_ratio, "epochs_own": own_epochs,
            "epochs_total": start_epochs + own_epochs}


BUDGET_KEYS = ("train_flop_ratio_total", "epochs_total")  # what a model started from must have recorded


def read_start(path: str | Path) -> dict[str, Any]:
    """The metrics.json of the model a run starts from (:func:`training_budget`'s `start`), checked before the
    run trains: a file without the budget keys (written before they existed) names the stage to rerun."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run its stage first (snakemake --cores 4 {path})")
    metrics = json.loads(path.read_text())
    missing = [k for k in BUDGET_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} (written before training budgets were totals); rerun "
                         f"its stage (snakemake --cores 4 --force {path})")
    return metrics


def validation_metrics(pred: Any, val: Any, model_config: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """The validation split's figures of a model's metrics.json (``val_accuracy``, ``val_macro_f1``,
    ``val_infer_flop_ratio``, ``n_val``): :func:`dht.evaluation.evaluate` on its predictions of the validation split,
    made with the same inference policy as the test split's. What a choice between settings reads (docs/pipeline.md,
    "The validation split"); nothing (no keys) when the profile holds no validation split out."""
    from dht.evaluation import evaluate

    if val is None or len(val) == 0:
        return {}
    m = evaluate(pred, val, model_config, meta["max_length"], None)
    return {"val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"],
            "val_infer_flop_ratio": m["infer_flop_ratio"], "n_val": m["n_test"]}


def training_metrics(cfg: Config, pred: Any, test: Any, model_config: Any, meta: dict[str, Any],
                     progress: Any, start: dict[str, Any] | None = None,
                     val: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """metrics.json of a trained DHT mode: :func:`dht.evaluation.evaluate` on the inference policy's
    predictions, with `val` (the predictions of the validation split, the split) :func:`validation_metrics`, the
    training's budget (:func:`training_budget`; `start`: the metrics.json of the run its weights start from,
    ``dht.modes.<mode>.init: reference``'s trained reference, docs/training.md T30; None for the initial model),
    time, steps and samples; floats rounded to 6 digits."""
    from dht.evaluation import evaluate

    metrics = evaluate(pred, test, model_config, meta["max_length"], meta.get("difficulty_names"))
    metrics.update(validation_metrics(*val, model_config, meta) if val is not None else {})
    metrics.update(training_budget(progress.train_flops / progress.reference_flops, cfg.train.epochs, start))
    metrics.update({
        "train_seconds": round(progress.seconds, 3),
        "train_steps": progress.step,
        "train_samples": progress.samples_seen,
    })
    return _rounded(metrics)


def baseline_metrics(pred: Any, test: Any, reference_config: Any, meta: dict[str, Any], train_flops: float,
                     reference_train_flops: float, seconds: float, epochs: float,
                     start: dict[str, Any] | None, val: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """metrics.json of a baseline, in the DHT runs' schema: :func:`dht.evaluation.evaluate` with FLOPs relative to
    the trained reference (`reference_config`), :func:`validation_metrics` of `val` (predictions, split), the
    training's budget (:func:`training_budget`: its own FLOPs against the reference's full training,
    `reference_train_flops`, its own `epochs`, and `start`, the metrics of the model it starts from) and its time,
    floats rounded to 6 digits."""
    from dht.evaluation import evaluate

    metrics = evaluate(pred, test, reference_config, meta["max_length"], meta.get("difficulty_names"))
    metrics.update(validation_metrics(*val, reference_config, meta) if val is not None else {})
    metrics.update(training_budget(train_flops / reference_train_flops, epochs, start))
    metrics["train_seconds"] = round(seconds, 3)
    return _rounded(metrics)


def write_results(results: str | Path, metrics: dict[str, Any], pred: Any, test: Any,
                  progress: Any | None = None) -> Path:
    """A run's results directory: predictions.csv; for a DHT run (`progress`, the trainer's) selections.json
    (Figure 2) and loss.csv (Figure 3); and, last (it marks the run as done), metrics.json."""
    from dht.evaluation import write_predictions

    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    write_predictions(results / "predictions.csv", pred, test)
    if progress is not None:
        (results / "selections.json").write_text(json.dumps(progress.selections, indent=2, sort_keys=True) + "\n")
        with (results / "loss.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["step", "epoch", "loss", "layers"])
            writer.writerows((s, e + 1, round(loss, 6), layers) for s, e, loss, layers in progress.history)
    (results / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return results


# --- where runs live and reading them back ------------------------------------------------------------------


def seeded(cfg: Config) -> bool:
    """Whether the runs are laid out per seed (more than one training seed)."""
    return len(cfg.training_seeds) > 1


def run_subdir(cfg: Config, dataset: str, name: str, seed: int | None = None) -> str:
    """``<dataset>/<name>`` (one seed) or ``<dataset>/<name>/seed-<s>`` (several; `seed` required then): the
    part of a run's path below ``results/``, ``models/`` and ``checkpoints/``."""
    if not seeded(cfg):
        return f"{dataset}/{name}"
    if seed is None:
        raise ValueError(f"{dataset}/{name}: run.training_seeds lists {cfg.training_seeds}; name the seed of the run")
    return f"{dataset}/{name}/{SEED_DIR.format(seed=seed)}"


def run_name(cfg: Config, name: str, seed: int) -> str:
    """The MLflow run name of a run: the model's name, with its seed when there are several (``t-dht/seed-1``)."""
    return f"{name}/{SEED_DIR.format(seed=seed)}" if seeded(cfg) else name


def run_pattern(cfg: Config, name_wildcard: str = "model") -> str:
    """The Snakemake pattern of :func:`run_subdir`: ``{dataset}/{model}`` or ``{dataset}/{model}/seed-{seed}``."""
    base = f"{{dataset}}/{{{name_wildcard}}}"
    return f"{base}/{SEED_DIR}" if seeded(cfg) else base


def result_file(cfg: Config, root: str | Path, dataset: str, name: str, file: str, seed: int | None = None) -> Path:
    """A file of a run's results directory (the first training seed's when `seed` is None); FileNotFoundError
    naming the file and the command that makes it."""
    if seed is None:
        seed = cfg.training_seeds[0]
    path = Path(root) / "results" / run_subdir(cfg, dataset, name, seed) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run its stage first (snakemake --cores 4 {path})")
    return path


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def aggregate(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One metrics dict from the metrics.json of several seeds: every numeric key is the mean over the seeds,
    with ``<key>_std`` its sample standard deviation (n - 1); ``seeds`` lists them and ``per_seed`` keeps the
    accuracies. Non-numeric values come from the first seed. One run is returned unchanged."""
    if len(runs) == 1:
        return dict(next(iter(runs.values())))
    first = next(iter(runs.values()))
    out: dict[str, Any] = {}
    for key, value in first.items():
        if key in _NOT_AVERAGED:
            continue
        values = [r.get(key) for r in runs.values()]
        if all(_number(v) for v in values):
            mean = sum(values) / len(values)
            out[key] = mean
            out[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        else:
            out[key] = value
    out["seeds"] = list(runs)
    out["per_seed"] = {str(s): {"accuracy": r["accuracy"]} for s, r in runs.items() if "accuracy" in r}
    return out


def read_metrics(cfg: Config, root: str | Path, dataset: str, name: str) -> dict[str, Any]:
    """A model's metrics on a dataset: its metrics.json, or with several training seeds their
    :func:`aggregate`."""
    return aggregate({s: json.loads(result_file(cfg, root, dataset, name, "metrics.json", s).read_text())
                      for s in cfg.training_seeds})


# --- a dataset's paired comparisons -------------------------------------------------------------------------


def paired_path(cfg: Config, dataset: str) -> str:
    """``results/<dataset>/paired.json`` (one seed) or ``results/<dataset>/paired-seeds.json`` (several), relative
    to the project root: the `compare` stage's output."""
    return f"results/{dataset}/{PAIRED_SEEDS_FILE if seeded(cfg) else PAIRED_FILE}"


def write_paired(path: str | Path, paired: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(paired, indent=2) + "\n")
    return path


def read_paired(cfg: Config, root: str | Path, dataset: str) -> dict[str, Any]:
    """A dataset's paired comparisons (:func:`paired_path`); FileNotFoundError naming the file and its command."""
    path = Path(root) / paired_path(cfg, dataset)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run its stage first (snakemake --cores 4 {path})")
    return json.loads(path.read_text())


def read_seeds_run(cfg: Config, root: str | Path, dataset: str) -> tuple[Path, dict[str, Any]] | None:
    """A one-seed run's look at the training seed's noise: the paired comparisons of a run with several seeds on
    the same dataset (``results/<dataset>/paired-seeds.json``, e.g. the `seeds` profile's), with its path, when
    one is present and compares against the same reference on as many test samples; None otherwise (and for a
    run that has several seeds itself). Not a declared input: the main job does not wait for a seeds run, so
    a report reads it when it is there (rerun the report after a seeds run)."""
    if seeded(cfg):
        return None
    path = Path(root) / "results" / dataset / PAIRED_SEEDS_FILE
    if not path.is_file():
        return None
    paired = json.loads(path.read_text())
    mine = Path(root) / paired_path(cfg, dataset)
    if mine.is_file():
        own = json.loads(mine.read_text())
        if (paired.get("reference"), paired.get("n_test")) != (own.get("reference"), own.get("n_test")):
            return None
    return path, paired
