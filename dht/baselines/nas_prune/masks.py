"""The masks of the search space (report Section 5.5): dimension masks ``sigmoid(alpha)`` with the report's gradient
rescaling, the head weights of equation (5), and the masked operations the supernet and the extracted model
share (a LayerNorm over the kept dimensions, the padding mask of attention, the mean over real tokens)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class _RescaledSigmoid(torch.autograd.Function):
    """``m = sigmoid(alpha)`` whose backward passes ``dL/dm`` to ``alpha`` unscaled by ``sigmoid'(alpha)``.

    Section 5.5.1: alpha starts at 5 and should leave [-5, 5] so that the masks are 0/1, and "we do some trick to
    make sure that the gradient arriving at alpha would make a large enough step to jump across -5 and 5, by
    rescaling the gradient arriving at alpha". The report does not give the rule. Implemented: the gradient
    arriving at alpha is divided by sigmoid'(alpha) = m (1 - m), i.e. ``dL/dalpha := dL/dm`` (a straight-through
    estimator of the saturated sigmoid). At alpha = +-5 the plain chain rule would shrink the gradient by
    sigmoid'(5) = 0.0066 (~150x); with the rescaling a step has the same size wherever alpha is, so alphas cross
    the whole [-5, 5] range in a bounded number of steps (and can come back: pruning is reversible during the
    search). Because saturated alphas no longer slow down, the search
    (:func:`dht.baselines.nas_prune.darts.search`) clips them to [-10, 10] (masks 0.99995 / 0.00005, far outside
    [-5, 5]) so that an alpha pushed the same way for many steps can still return within a bounded number of
    steps.
    """

    @staticmethod
    def forward(ctx: Any, alpha: Tensor) -> Tensor:
        return torch.sigmoid(alpha)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def rescaled_sigmoid(alpha: Tensor) -> Tensor:
    """The dimension mask of Section 5.5.1 (see :class:`_RescaledSigmoid` for the gradient rule)."""
    return _RescaledSigmoid.apply(alpha)


def unit_gates(alphas: dict[str, Tensor]) -> dict[str, Tensor]:
    """The factor every searchable unit's output is multiplied by in the supernet: ``sigmoid(alpha)`` for the
    dimensions (Section 5.5.1), ``N_H * softmax(alpha)`` for the heads of a layer (equation (5), rescaled so that
    uniform weights are 1)."""
    out = {k: torch.sigmoid(v) for k, v in alphas.items() if k != "heads"}
    out["heads"] = alphas["heads"].shape[-1] * torch.softmax(alphas["heads"], dim=-1)
    return out


def masked_layer_norm(x: Tensor, ln: nn.LayerNorm, m: Tensor) -> Tensor:
    """LayerNorm whose statistics weight dimension i by m_i, output multiplied by m.

    With 0/1 masks this is ``LayerNorm`` over the kept dimensions (zeros elsewhere), which is what
    :class:`PrunedBert` computes; with all-equal masks it is the ordinary LayerNorm times m.
    """
    total = m.sum().clamp_min(1e-6)  # a sampled architecture may drop every dimension (output 0 then)
    mean = (x * m).sum(-1, keepdim=True) / total
    centred = x - mean
    var = (centred * centred * m).sum(-1, keepdim=True) / total
    return (centred * torch.rsqrt(var + ln.eps) * ln.weight + ln.bias) * m


def mean_pool(x: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The mean of every sample's non-padding token states, as ``DHTForSequenceClassification.pool`` takes it
    for ``classifier_pooling="mean"`` (the same arithmetic: a plain mean when nothing is padded)."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return x.mean(dim=1)
    weights = attention_mask.bool().to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def additive_mask(attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    keep = attention_mask.bool()
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)[
        :, None, None, :
    ]
