"""The evaluation stage (rule `compare`): every model of a dataset against the reference and against the best
baseline at no more inference FLOPs, paired on the same test samples (:mod:`dht.statistics`), written to
``results/<dataset>/paired.json`` (``paired-seeds.json`` with several seeds, :func:`dht.results.paired_path`).

Why a file of its own rather than each model's metrics.json: a model's metrics.json is written by its own
train or baseline job, before the other models exist; comparisons there would make every model's job wait for
every other model. The comparisons are a stage between the models and the reports (the design card's
"evaluation"), reading every model's predictions.csv.

Readings (docs/pipeline.md, "Paired statistics"):

- **The best baseline at no more inference FLOPs** of a model: among ``run.baselines`` (the model itself left
  out), the most accurate whose ``infer_flop_ratio`` is at most the model's; ties in accuracy go to the one with
  fewer FLOPs, then to the first in ``run.baselines``. The shallow control and the other DHT modes are not
  candidates: the question is whether DHT beats the methods it is proposed against at their cost, and the
  control (the b layers every arm runs anyway) answers another one, in Table 1's depth analysis. None at or
  below the model's FLOPs: said so (``against`` null).
- **Several seeds** (``run.training_seeds``): the baseline is chosen once, by the accuracy and FLOPs averaged over the
  seeds, and each seed's run is paired with the same seed's run of the reference and of that baseline (the
  baselines of a seed learn from the reference of that seed). ``difference`` is the mean of the per-seed
  differences, ``difference_std`` their sample standard deviation (n - 1); each seed keeps its own interval,
  p-value and discordant counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dht.config import Config
from dht.evaluation import SamplePredictions, read_predictions
from dht.results import read_metrics, result_file
from dht.statistics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, paired_difference


def compared_models(cfg: Config) -> list[str]:
    """The models the stage reads: the reference (trained for the reports whether or not run.models lists it),
    run.models and run.baselines, in that order."""
    return list(dict.fromkeys([cfg.run.reference, *cfg.run.models, *cfg.run.baselines]))


def best_baseline(cfg: Config, model: str, measured: dict[str, dict[str, Any]]) -> str | None:
    """The most accurate baseline of run.baselines other than `model` whose inference FLOP ratio is at most
    `model`'s (`measured`: metrics by model, seeds averaged); ties in accuracy: fewer FLOPs, then run.baselines
    order. None when no baseline is that cheap."""
    budget = measured[model]["infer_flop_ratio"]
    cheap = [b for b in cfg.run.baselines if b != model and measured[b]["infer_flop_ratio"] <= budget]
    if not cheap:
        return None
    return min(cheap, key=lambda b: (-measured[b]["accuracy"], measured[b]["infer_flop_ratio"],
                                     cfg.run.baselines.index(b)))


def _against(name: str | None, model: dict[int, SamplePredictions], other: dict[int, SamplePredictions] | None,
             seeds: list[int]) -> dict[str, Any]:
    """One comparison: per seed the paired difference of `model`'s run against `other`'s run of the same seed,
    and their mean (and spread, with several seeds)."""
    if name is None or other is None:
        return {"against": None}
    per_seed = {str(s): paired_difference(model[s].correct, other[s].correct).as_dict() for s in seeds}
    diffs = [r["difference"] for r in per_seed.values()]
    out: dict[str, Any] = {"against": name, "difference": round(float(np.mean(diffs)), 6)}
    if len(diffs) > 1:
        out["difference_std"] = round(float(np.std(diffs, ddof=1)), 6)
    out["per_seed"] = per_seed
    return out


def compare_dataset(cfg: Config, root: str | Path, dataset: str) -> dict[str, Any]:
    """paired.json of a dataset: per model (run.models, then run.baselines) its inference FLOP ratio and
    accuracy (means over the seeds), ``vs_reference`` (absent for the reference itself) and
    ``vs_best_baseline``, each with the baseline's name in ``against``, ``difference`` (mean over seeds),
    ``difference_std`` (several seeds) and ``per_seed``: {seed: difference, ci95_lo, ci95_hi, p_value,
    n_discordant, only_model, only_other, n}. FileNotFoundError naming a missing results file; ValueError when
    two models' predictions are not of one test split."""
    root = Path(root)
    seeds = cfg.training_seeds
    names = compared_models(cfg)
    measured = {m: read_metrics(cfg, root, dataset, m) for m in names}
    preds: dict[str, dict[int, SamplePredictions]] = {
        m: {s: read_predictions(result_file(cfg, root, dataset, m, "predictions.csv", s)) for s in seeds}
        for m in names}
    ref = cfg.run.reference
    labels = preds[ref][seeds[0]].label
    for m, runs in preds.items():
        for s, p in runs.items():
            if len(p) != len(labels) or not np.array_equal(p.label, labels):
                where = result_file(cfg, root, dataset, m, "predictions.csv", s)
                raise ValueError(f"{where}: not of the same test split as {ref}'s ({len(p)} rows, {len(labels)} "
                                 "expected, labels must agree); rerun its stage")
    rows: dict[str, Any] = {}
    for m in dict.fromkeys([*cfg.run.models, *cfg.run.baselines]):
        row: dict[str, Any] = {"infer_flop_ratio": round(float(measured[m]["infer_flop_ratio"]), 6),
                               "accuracy": round(float(measured[m]["accuracy"]), 6)}
        if m != ref:
            row["vs_reference"] = _against(ref, preds[m], preds[ref], seeds)
        best = best_baseline(cfg, m, measured)
        row["vs_best_baseline"] = _against(best, preds[m], preds[best] if best else None, seeds)
        rows[m] = row
    return {"dataset": dataset, "profile": cfg.profile, "reference": ref, "seeds": seeds, "n_test": int(len(labels)),
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": CONFIDENCE},
            "models": rows}


def half_widths(paired: dict[str, Any], against: str = "vs_reference") -> dict[str, float]:
    """Half the paired 95% interval of each model's difference (`against` the reference or the best baseline),
    per model, the mean over its seeds: about how large a difference the test split settles for that pair.
    Runs with no discordant sample are left out (their interval is 0: identical predictions tell nothing about
    the test split's noise), and so is a model without any other run."""
    out = {}
    for model, row in paired["models"].items():
        cmp = row.get(against) or {}
        if cmp.get("against"):
            widths = [(r["ci95_hi"] - r["ci95_lo"]) / 2 for r in cmp["per_seed"].values() if r["n_discordant"]]
            if widths:
                out[model] = sum(widths) / len(widths)
    return out


def seed_spreads(paired: dict[str, Any]) -> dict[str, float]:
    """The standard deviation over seeds of each model's difference against the reference (several seeds only:
    empty otherwise): the training seed's share of the noise in one run's difference."""
    return {m: row["vs_reference"]["difference_std"] for m, row in paired["models"].items()
            if "difference_std" in (row.get("vs_reference") or {})}
