"""Honest numbers on the test split: the bootstrap interval of the accuracy, the per-sample predictions every
model writes (``results/<dataset>/<model>/predictions.csv``), and what the depth a DHT mode chooses goes with
on data that have no difficulty column ("Where the depth goes" in reports/table1.md, ``depth-<dataset>.png``).

The paper reports single F1 values (Tables 1-2) without intervals; on a test split of a few hundred samples a
difference of 0.02 is often noise, so every accuracy here carries its 95% interval.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dht.statistics import bootstrap_ci

if TYPE_CHECKING:  # imported where a tensor is made: the Snakefile's report rules import this module for names
    import torch
    from torch import Tensor

PREDICTION_COLUMNS = ("index", "label", "pred", "prob", "layers", "n_tokens")


# --------------------------------------------------------------------------------------------------------------
# What a model is evaluated on and what it predicted
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SplitData:
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    difficulty: Tensor | None = None

    def __len__(self) -> int:
        return self.labels.numel()

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SplitData:
        import torch

        diff = arrays.get("difficulty")
        return cls(torch.from_numpy(arrays["input_ids"]), torch.from_numpy(arrays["attention_mask"].astype(np.int64)),
                   torch.from_numpy(arrays["label"].astype(np.int64)),
                   None if diff is None else torch.from_numpy(diff.astype(np.int64)))

    def batch(self, index: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Rows `index`, trimmed to the longest sample: padding beyond it costs without changing anything."""
        mask = self.attention_mask[index]
        width = max(int(mask.sum(dim=1).max()), 1)
        return (self.input_ids[index, :width].to(device), mask[:, :width].to(device), self.labels[index].to(device))


@dataclass
class Predictions:
    labels: Tensor  # [N]
    probs: Tensor  # [N, C]
    layers: Tensor  # [N]
    heads: Tensor  # [N, N_L] heads per layer (0 beyond the sample's depth)
    flops: Tensor  # [N] full convention
    flops_linear: Tensor  # [N]
    seconds: float


def evaluate(pred: Predictions, data: SplitData, conf: Any, seq_len: int, difficulty_names: list[str] | None) -> dict[str, Any]:
    """The metrics of Tables 1-2 (micro-F1 = accuracy and macro-F1) and what the selections cost.

    `accuracy_ci95` is the accuracy's 95% percentile-bootstrap interval over the test samples
    (:func:`dht.statistics.bootstrap_ci`: 1000 resamples, a fixed seed), which the paper does not give."""
    from sklearn.metrics import accuracy_score, f1_score

    from dht.flops import full_model_flops

    y, p = data.labels.numpy(), pred.labels.numpy()
    ran = pred.heads > 0
    lo, hi = bootstrap_ci(y == p)
    metrics: dict[str, Any] = {
        "accuracy": float(accuracy_score(y, p)),
        "accuracy_ci95": [round(lo, 6), round(hi, 6)],
        "macro_f1": float(f1_score(y, p, average="macro")),
        "infer_flop_ratio": float(pred.flops.mean() / full_model_flops(seq_len, conf, "full", "inference")),
        "infer_flop_ratio_linear": float(pred.flops_linear.mean() / full_model_flops(seq_len, conf, "linear", "inference")),
        "mean_layers": float(pred.layers.float().mean()),
        "mean_heads": float((pred.heads.sum(1).float() / ran.sum(1).clamp(min=1)).mean()),
        "infer_seconds": round(pred.seconds, 3),
        "n_test": len(data),
    }
    if data.difficulty is not None:
        names = difficulty_names or [str(d) for d in range(int(data.difficulty.max()) + 1)]
        for d, name in enumerate(names):
            sel = data.difficulty == d
            if sel.any():
                metrics[f"accuracy_{name}"] = float((pred.labels[sel] == data.labels[sel]).float().mean())
                metrics[f"mean_layers_{name}"] = float(pred.layers[sel].float().mean())
    return metrics


def accuracy_text(metrics: dict[str, Any], digits: int = 3) -> str:
    """A metrics.json's accuracy with its interval, "0.891 [0.864, 0.916]" (the accuracy alone when the file
    predates the interval); over several seeds (:func:`dht.results.aggregate`) the mean and standard deviation,
    "0.891 ± 0.012 (3 seeds)"."""
    acc = f"{metrics['accuracy']:.{digits}f}"
    if len(metrics.get("seeds", ())) > 1:
        return f"{acc} ± {metrics['accuracy_std']:.{digits}f} ({len(metrics['seeds'])} seeds)"
    ci = metrics.get("accuracy_ci95")
    return f"{acc} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else acc


# --- per-sample predictions ---------------------------------------------------------------------------------


def write_predictions(path: str | Path, pred: Any, data: Any) -> Path:
    """results/<dataset>/<model>/predictions.csv from a :class:`dht.evaluation.Predictions` and its
    :class:`dht.evaluation.SplitData`: per test sample its position in the split, true label, predicted label,
    probability of the predicted class, layers run (DHT: the chosen depth; FastBERT: the exit layer; other
    baselines: their depth) and non-padding tokens (special tokens included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    probs = pred.probs.float()
    prob = probs.gather(1, pred.labels.long().view(-1, 1)).squeeze(1).tolist()
    labels, preds = data.labels.tolist(), pred.labels.tolist()
    layers, tokens = pred.layers.tolist(), data.attention_mask.sum(dim=1).tolist()
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(PREDICTION_COLUMNS)
        for i in range(len(labels)):
            writer.writerow([i, labels[i], preds[i], f"{prob[i]:.6f}", int(layers[i]), int(tokens[i])])
    return path


@dataclass
class SamplePredictions:
    """One model's predictions.csv as columns (numpy arrays of one length, in test-split order)."""

    index: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    prob: np.ndarray
    layers: np.ndarray
    n_tokens: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        return self.label == self.pred

    def __len__(self) -> int:
        return self.index.size


def read_predictions(path: str | Path) -> SamplePredictions:
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(PREDICTION_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: no column(s) {', '.join(sorted(missing))}; expected {','.join(PREDICTION_COLUMNS)}")
        rows = list(reader)
    col = {name: [r[name] for r in rows] for name in PREDICTION_COLUMNS}
    out = SamplePredictions(
        index=np.array(col["index"], dtype=np.int64), label=np.array(col["label"], dtype=np.int64),
        pred=np.array(col["pred"], dtype=np.int64), prob=np.array(col["prob"], dtype=np.float64),
        layers=np.array(col["layers"], dtype=np.float64), n_tokens=np.array(col["n_tokens"], dtype=np.int64),
    )
    if not np.array_equal(out.index, np.arange(len(out))):
        raise ValueError(f"{path}: the index column must run 0..n-1 in order (one row per test sample)")
    return out


# --- where the depth goes -----------------------------------------------------------------------------------


@dataclass
class Bin:
    """A group of test samples: its label, and which samples (a boolean mask over the test split)."""

    label: str
    mask: np.ndarray

    @property
    def n(self) -> int:
        return int(self.mask.sum())


def quartile_bins(values: np.ndarray, unit: str, digits: int | None = None) -> list[Bin]:
    """Samples in four groups by the quartiles of `values`: Q1 holds values <= the 25th percentile, Q2 those up
    to the median, and so on. Equal values always share a group, so with many ties (sample lengths) a group can
    be empty and is left out; each label gives the group's range, e.g. "Q1: 9-14 tokens". `digits`: decimals of
    the ranges (None: integers), raised up to 6 until no two groups read the same (nearly constant confidences)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return []
    edges = np.quantile(values, [0.25, 0.5, 0.75])
    group = np.searchsorted(edges, values, side="left")
    masks = {q: group == q for q in range(4) if (group == q).any()}

    def spans(d: int | None) -> list[str]:
        fmt = "{:g}" if d is None else f"{{:.{d}f}}"
        out = []
        for mask in masks.values():
            lo, hi = fmt.format(values[mask].min()), fmt.format(values[mask].max())
            out.append(lo if lo == hi else f"{lo}-{hi}")
        return out

    labels = spans(digits)
    while digits is not None and digits < 6 and len(set(labels)) < len(labels):
        digits += 1
        labels = spans(digits)
    return [Bin(f"Q{q + 1}: {span} {unit}".rstrip(), mask) for (q, mask), span in zip(masks.items(), labels, strict=True)]


@dataclass
class DepthAnalysis:
    """Mean layers and accuracy of every DHT mode per group of test samples, for three groupings:
    `length` (quartiles of n_tokens), `control` (the shallow control right or wrong) and `confidence`
    (quartiles of the reference's probability of its prediction). A grouping is absent when its model's
    predictions are (no control configured), or when the data cannot form it: then `notes` says why (the
    length grouping when most samples were cut at max_length, :func:`length_note`)."""

    groupings: dict[str, tuple[str, list[Bin]]]  # key -> (title, bins)
    modes: dict[str, SamplePredictions]
    context: dict[str, SamplePredictions]  # the reference and the control: their accuracy per group
    notes: dict[str, str] = field(default_factory=dict)  # key of a grouping left out -> why

    def mean_layers(self, mode: str, b: Bin) -> float:
        return float(self.modes[mode].layers[b.mask].mean()) if b.n else float("nan")

    def accuracy(self, model: str, b: Bin) -> float:
        preds = self.modes[model] if model in self.modes else self.context[model]
        return float(preds.correct[b.mask].mean()) if b.n else float("nan")


GROUPINGS = {
    "length": "sample length (non-padding tokens), quartiles",
    "control": "the shallow control's prediction",
    "confidence": "the reference's confidence (probability of its prediction), quartiles",
}


# More than this share of the test samples at one length, the longest: quartiles cannot separate lengths.
LENGTH_TIE_SHARE = 0.5


def length_note(n_tokens: np.ndarray, max_length: int | None = None) -> str | None:
    """Why the samples cannot be grouped by length, or None when they can.

    `n_tokens` are the lengths the model saw (predictions.csv: the non-padding tokens, after truncation), so
    every text longer than max_length counts max_length tokens. When more than half the samples share the
    longest length, quartiles put them in one group (equal values share a group, :func:`quartile_bins`) and
    the "by length" rows would compare nothing: DBpedia's articles at max_length 32 (82% cut). Decided from
    the data; `max_length` (the dataset's, from data/processed/<dataset>/meta.json, when the caller has it)
    only names the cause exactly."""
    lengths = np.asarray(n_tokens)
    if lengths.size == 0:
        return None
    longest = int(lengths.max())
    at_longest = int((lengths == longest).sum())
    if at_longest <= LENGTH_TIE_SHARE * lengths.size:
        return None
    share = f"{at_longest} of the {lengths.size} test samples ({at_longest / lengths.size:.0%})"
    if max_length is not None and longest < max_length:  # not a cut: many samples of one length
        return (f"Not grouped by length: {share} have the same length, {longest} tokens (below max_length "
                f"{max_length}: none was cut), so quartiles of length cannot tell them apart.")
    if max_length is not None:
        cut = f"reach the dataset's max_length, {max_length} tokens, where longer texts are cut"
    else:  # the figures stage does not read meta.json: the cause from the data alone
        cut = f"have the longest length the model saw, {longest} tokens, where texts cut at max_length end"
    return (f"Not grouped by length: {share} {cut}. The model saw {longest} tokens of each and how long they "
            "really are is unknown, so quartiles of length cannot tell them apart (they would all fall in one "
            "group). A larger `max_length` keeps this analysis, at the cost of longer sequences (Table 1's Data "
            "table gives each split's truncated share).")


def depth_analysis(modes: dict[str, SamplePredictions], reference: tuple[str, SamplePredictions],
                   control: tuple[str, SamplePredictions] | None, max_length: int | None = None) -> DepthAnalysis:
    """Group the test samples by length, by the control's correctness and by the reference's confidence, for
    the DHT modes' predictions (all of one test split, checked). The length grouping is left out, with the
    reason in `notes`, when most samples share the longest length (:func:`length_note`; `max_length`, the
    dataset's when known, names the cause)."""
    ref_name, ref = reference
    everyone = {**modes, ref_name: ref, **({control[0]: control[1]} if control else {})}
    n = len(ref)
    for name, p in everyone.items():
        if len(p) != n or not np.array_equal(p.label, ref.label):
            raise ValueError(f"{name}: its predictions.csv is not of the same test split as {ref_name}'s "
                             f"({len(p)} rows, {n} expected, labels must agree); rerun its stage")
    groupings: dict[str, tuple[str, list[Bin]]] = {}
    notes: dict[str, str] = {}
    if (note := length_note(ref.n_tokens, max_length)) is not None:
        notes["length"] = note
    else:
        groupings["length"] = (GROUPINGS["length"], quartile_bins(ref.n_tokens, "tokens"))
    if control is not None:
        name, c = control
        right_wrong = [Bin(f"{name} right", c.correct), Bin(f"{name} wrong", ~c.correct)]
        groupings["control"] = (f"{GROUPINGS['control']} ({name})", [b for b in right_wrong if b.n])
    groupings["confidence"] = (f"{GROUPINGS['confidence']} ({ref_name})",
                               quartile_bins(ref.prob, "", digits=3))
    context = {ref_name: ref, **({control[0]: control[1]} if control else {})}
    return DepthAnalysis(groupings, modes, context, notes)
