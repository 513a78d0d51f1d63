"""Inference of a model whose every sample runs the same architecture (DistilBERT students, NAS-pruned models,
FlexiBERT architectures), in the pipeline's :class:`dht.evaluation.Predictions` format, which
:func:`dht.evaluation.evaluate` turns into the metrics every model of Table 2 reports."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dht.evaluation import Predictions, SplitData


@torch.no_grad()
def predict_probs(forward: Callable[[Tensor, Tensor], Tensor], data: SplitData, batch_size: int,
                  device: torch.device | str) -> tuple[Tensor, float]:
    """(class probabilities [N, C] of every sample in order, seconds): ``forward(ids, mask)`` returns the logits
    of a batch, each batch trimmed to its longest sample (:meth:`SplitData.batch`). The caller sets eval mode."""
    device = torch.device(device)
    probs = []
    start = time.perf_counter()
    for lo in range(0, len(data), batch_size):
        ids, mask, _ = data.batch(torch.arange(lo, min(lo + batch_size, len(data))), device)
        probs.append(forward(ids, mask).float().softmax(-1).cpu())
    seconds = time.perf_counter() - start
    return (torch.cat(probs) if probs else torch.zeros(0, 0)), seconds


def static_predictions(probs: Tensor, heads: Sequence[int], flops: float, flops_linear: float, seconds: float,
                       width: int | None = None) -> Predictions:
    """The predictions of ``probs`` by a model every sample runs whole: ``len(heads)`` layers with ``heads[l]``
    heads in layer ``l`` (the rows of ``Predictions.heads`` padded with 0 to ``width`` columns), and the same
    FLOPs per sample in both conventions of :mod:`dht.flops`."""
    n, layers = len(probs), len(heads)
    rows = torch.zeros(n, width or layers, dtype=torch.long)
    rows[:, :layers] = torch.tensor(list(heads), dtype=torch.long)
    return Predictions(probs.argmax(-1), probs, torch.full((n,), layers, dtype=torch.long), rows,
                       torch.full((n,), float(flops), dtype=torch.float64),
                       torch.full((n,), float(flops_linear), dtype=torch.float64), seconds)
