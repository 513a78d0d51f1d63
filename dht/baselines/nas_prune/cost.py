"""What an architecture costs: its inference FLOPs (:func:`pruned_flops`; the supernet's expected cost E_cost
uses the same formula) and the computation cost loss of the search (:func:`tas_cost_loss`, report equation (4))."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from dht.baselines.nas_prune.arch import PrunedArch

Convention = Literal["full", "linear"]


def pruned_flops(arch: PrunedArch, seq_len: int, convention: Convention = "full") -> int:
    """Analytic inference FLOPs of one sample of ``seq_len`` tokens through the pruned architecture.

    The conventions of :mod:`dht.flops` (2 FLOPs per multiply-accumulate; ``"full"`` counts every matmul,
    ``"linear"`` only ``nn.Linear`` layers). With ``d_e`` kept hidden dimensions, per layer with query/key width
    ``q`` (summed over kept heads), value width ``v`` and FFN width ``f``:

        Q, K projections     2 * 2n * d_e * q
        V projection         2n * d_e * v
        output projection    2n * v * d_e
        FFN                  2 * 2n * d_e * f
        QK^T and AV          2n^2 * (q + v)           ("full" only; every head its own widths)

    plus, with ``"cls"`` pooling, the pooler ``2 * d_e * d`` and classifier ``2 * d * num_labels`` on [CLS];
    with ``"mean"`` pooling the classifier ``2 * d_e * num_labels`` only (no pooler; the mean over tokens is
    no matmul). With everything kept and ``"cls"`` this equals :func:`dht.flops.full_model_flops` of the
    teacher (tested).
    """
    if convention not in ("full", "linear"):
        raise ValueError(f"convention must be 'full' or 'linear', got {convention!r}")
    n, de = seq_len, arch.embed_width
    total = 0
    for layer in arch.layers:
        q, v, f = layer.qk_width, layer.v_width, len(layer.ffn_dims)
        total += 2 * n * de * (2 * q + v) + 2 * n * v * de + 4 * n * de * f
        if convention == "full":
            total += 2 * n * n * (q + v)
    return total + head_flops(de, arch.hidden_size, arch.num_labels, arch.classifier_pooling)


def head_flops(de: Any, d: int, num_labels: int, pooling: str) -> Any:
    """Pooler and classifier FLOPs on d_e kept hidden dimensions (a number, or a tensor for E_cost)."""
    if pooling == "mean":
        return 2 * de * num_labels
    return 2 * de * d + 2 * d * num_labels


def tas_cost_loss(expected: Tensor, actual: float, target: float, tolerance: float) -> Tensor:
    """The computation cost loss, equation (4) of the report (TAS, Dong & Yang 2019, equation (8)).

    ``log(E_cost)`` when ``F_cost > (1 + t) R``; ``0`` when ``(1 - t) R <= F_cost <= (1 + t) R``;
    ``-log(E_cost)`` when ``F_cost < (1 - t) R``. ``expected`` (E_cost) is differentiable; ``actual`` (F_cost) only
    chooses the branch. The boundaries of the band count as inside (the equation leaves equality open).
    """
    if actual > (1 + tolerance) * target:
        return torch.log(expected)
    if actual < (1 - tolerance) * target:
        return -torch.log(expected)
    return expected.new_zeros(())
