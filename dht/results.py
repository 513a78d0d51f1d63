"""Where a run's results live, and reading them back: one reader for the reports and the figures.

A run is one model (a DHT mode, a fixed mode or a baseline) trained on one dataset with one training seed. With
one seed (`run.seeds` unset, or a single seed) its files are ``results/<dataset>/<model>/`` and
``models/<dataset>/<model>/``, as they always were; with several (``run.seeds: [0, 1, 2]``) each seed has its
own directory below them, ``results/<dataset>/<model>/seed-<s>/``. The reports then show the mean and the
standard deviation over the seeds (:func:`read_metrics`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dht.config import Config

SEED_DIR = "seed-{seed}"
# metrics.json keys that are one run's own interval or bookkeeping, not a quantity to average over seeds.
_NOT_AVERAGED = ("accuracy_ci95",)


def seeded(cfg: Config) -> bool:
    """Whether the runs are laid out per seed (more than one training seed)."""
    return len(cfg.training_seeds) > 1


def run_subdir(cfg: Config, dataset: str, name: str, seed: int | None = None) -> str:
    """``<dataset>/<name>`` (one seed) or ``<dataset>/<name>/seed-<s>`` (several; `seed` required then): the
    part of a run's path below ``results/``, ``models/`` and ``checkpoints/``."""
    if not seeded(cfg):
        return f"{dataset}/{name}"
    if seed is None:
        raise ValueError(f"{dataset}/{name}: run.seeds lists {cfg.training_seeds}; name the seed of the run")
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
