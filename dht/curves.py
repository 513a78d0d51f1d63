"""A model's accuracy-FLOPs curve over its inference dial, and the point of it chosen on the validation split
(issue 28; docs/training.md T31, "A curve, not a point").

Two models here have a dial that moves them along a curve without retraining: the sequential mode's price per
layer (``dht.modes.<mode>.prices``; :attr:`dht.policy.Policy.stop_price`) and FastBERT's speed
(``baselines.fastbert.speeds``). The stage that trains one evaluates it at every value of its grid on the validation
and the test split (:func:`trace`), and its metrics.json and predictions.csv are at the value :func:`choose` picks on
the validation split alone: the fewest inference FLOPs among the points within ``chosen_within`` accuracy of the
reference's validation accuracy (the most accurate point when none is). The test split is read at every point, for
the figure and the tables, and never for the choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dht.evaluation import Predictions, SplitData, evaluate

__all__ = ["Dial", "choose", "mean_curve", "recorded", "trace"]

@dataclass(frozen=True)
class Dial:
    """A trained model's inference dial: its name (``price``, ``speed``), the grid its curve is traced at, the rule's
    tolerance (``chosen_within``) and its predictions at one value of it."""

    name: str
    values: list[float]
    within: float
    predict_at: Callable[[float, SplitData], Predictions]


def trace(predict_at: Callable[[float, SplitData], Predictions], dials: Iterable[float], val: SplitData,
          test: SplitData | None, conf: Any, seq_len: int) -> list[dict[str, float]]:
    """The curve: for every dial value (ascending), the accuracy and the inference FLOP ratio (to the full model
    `conf`, :func:`dht.evaluation.evaluate`'s) on the validation split, and on the test split when given."""
    points = []
    for dial in sorted(float(d) for d in dials):
        v = evaluate(predict_at(dial, val), val, conf, seq_len, None)
        point = {"dial": dial, "val_accuracy": v["accuracy"], "val_infer_flop_ratio": v["infer_flop_ratio"]}
        if test is not None:
            t = evaluate(predict_at(dial, test), test, conf, seq_len, None)
            point.update({"accuracy": t["accuracy"], "infer_flop_ratio": t["infer_flop_ratio"],
                          "infer_seconds": t["infer_seconds"]})
        points.append({k: round(x, 6) for k, x in point.items()})
    return points


def choose(points: Sequence[dict[str, float]], reference_val_accuracy: float, within: float) -> dict[str, Any]:
    """The point chosen on the validation split: of the points whose ``val_accuracy`` is at least the reference's
    minus `within`, the one with the fewest validation FLOPs (ties: the more accurate, then the smaller dial); when
    none is, the most accurate (``met: False``). Returns the point with ``met`` and ``rule``."""
    if not points:
        raise ValueError("a curve of no points: the dial's grid is empty")
    bar = reference_val_accuracy - within
    eligible = [p for p in points if p["val_accuracy"] >= bar]
    if eligible:
        best = min(eligible, key=lambda p: (p["val_infer_flop_ratio"], -p["val_accuracy"], p["dial"]))
    else:
        best = max(points, key=lambda p: (p["val_accuracy"], -p["val_infer_flop_ratio"], -p["dial"]))
    rule = (f"fewest validation FLOPs within {within:g} of the reference's validation accuracy "
            f"{reference_val_accuracy:.4f}")
    return {**best, "met": bool(eligible), "rule": rule}


def recorded(curve: list[dict[str, float]], chosen: dict[str, Any] | None) -> dict[str, Any]:
    """What a stage adds to its metrics.json: the ``curve`` and, when a value was chosen, ``chosen`` (its dial, whether
    the rule was met, the rule; the point itself is in the curve)."""
    return {"curve": curve, **({"chosen": {k: chosen[k] for k in ("dial", "met", "rule")}} if chosen else {})}


def mean_curve(curves: Sequence[Sequence[dict[str, float]]]) -> list[dict[str, float]]:
    """Several seeds' curves of one model (one grid) as one: the mean of every key per dial value, with
    ``accuracy_std`` over the seeds (n - 1; 0 for one seed)."""
    if not curves:
        return []
    grids = {tuple(p["dial"] for p in c) for c in curves}
    if len(grids) != 1:
        raise ValueError(f"the seeds' curves have different dial grids ({sorted(grids)}): rerun them with one grid")
    out = []
    for i, first in enumerate(curves[0]):
        point: dict[str, float] = {}
        for key in first:
            values = [c[i][key] for c in curves]
            point[key] = sum(values) / len(values)
        acc = [c[i]["accuracy"] for c in curves if "accuracy" in c[i]]
        if len(acc) > 1:
            m = sum(acc) / len(acc)
            point["accuracy_std"] = (sum((a - m) ** 2 for a in acc) / (len(acc) - 1)) ** 0.5
        else:
            point["accuracy_std"] = 0.0
        out.append(point)
    return out
