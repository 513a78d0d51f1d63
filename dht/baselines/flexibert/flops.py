"""Analytic forward FLOPs of FlexiBERT architectures, in the conventions of :mod:`dht.flops`.

FlexiBERT compares models by parameters and GLUE score (Tuli et al. 2022, experiments); this project compares
every model by FLOPs relative to 12-VaBERT (DHT, Section 6.2), so the baseline needs FLOPs. The counting rules
are those of :mod:`dht.flops`:

``"full"``
    Every matrix multiplication, 2 FLOPs per multiply-accumulate. Embedding lookups, LayerNorm, softmax, GELU,
    tanh, masking, bias and residual adds count 0. This is exactly what ``torch.utils.flop_counter.FlopCounterMode``
    counts on :class:`dht.baselines.flexibert.model.FlexiBertForSequenceClassification` (tests/test_flexibert.py), because
    every token mixer is written with explicit matmuls (no FFT, no fused attention kernel).

``"linear"``
    Only ``nn.Linear`` layers (FastBERT's thop convention): the QK^T / AV matmuls, WMA's bilinear form, the
    DFT/DCT matrices and the convolution's weighted window sum count 0.

Per sample of n tokens (the padded length: padding is computed too), a layer of hidden size d with H heads
(head size d_h = d / H), kernel size k and G = H kernel groups costs

    ============  ==============================================  =========================================
    op            nn.Linear ("linear" and "full")                 other matmuls ("full" only)
    ============  ==============================================  =========================================
    sdp           Q, K, V, O: 4 * 2 n d^2                         QK^T, AV: 2 * 2 n^2 d
    wma           Q, K, V, O: 4 * 2 n d^2                         QK^T, AV: 2 * 2 n^2 d; Q W: 2 n d d_h
    dft           O: 2 n d^2                                      Re(F_n X F_d) = C X C - S X S:
                                                                  2 * (2 n^2 d + 2 n d^2)
    dct           O: 2 n d^2                                      C_n X C_d^T: 2 n^2 d + 2 n d^2
    conv<k>       V, O: 2 * 2 n d^2; kernel: 2 n d (G k)           window sum: 2 n d k
    FFN d->f1..fm->d   2 n (d f1 + f1 f2 + ... + fm d)            -
    projection    2 n d_j d_{j+1} (only when consecutive sizes differ)
    head          pooler 2 d_L^2 + classifier 2 d_L * num_labels ([CLS] only)
    ============  ==============================================  =========================================

The DFT is counted as the dense matrix products the model really runs. An FFT would need O(n d log(n d))
operations instead (FNet's motivation), but ``FlopCounterMode`` does not count ``aten._fft_*`` at all, so an FFT
implementation could not be checked; at this project's lengths (n <= 128) the dense form is what a CPU runs anyway.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from dht.flops import Convention, FlopShape, full_model_flops

from .space import Architecture, LayerSpec, conv_kernel_size, op_family

__all__ = [
    "ffn_flops",
    "flop_ratio",
    "head_flops",
    "layer_flops",
    "mixer_flops",
    "model_flops",
    "projection_flops",
    "reference_flops",
]

_CONVENTIONS = ("full", "linear")


def _check(convention: str) -> None:
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}, got {convention!r}")


def _mixer_parts(op: str, n: int, d: int, heads: int) -> tuple[int, int]:
    """(nn.Linear FLOPs, other matmul FLOPs) of one token mixer, output projection included."""
    family = op_family(op)
    if family == "attention":
        dh = d // heads
        other = 2 * 2 * n * n * d + (2 * n * d * dh if op == "wma" else 0)
        return 4 * 2 * n * d * d, other
    if family == "linear":
        transform = 2 * n * n * d + 2 * n * d * d  # one matrix along the sequence, one along the features
        return 2 * n * d * d, (2 if op == "dft" else 1) * transform
    k = conv_kernel_size(op)
    return 2 * 2 * n * d * d + 2 * n * d * heads * k, 2 * n * d * k


def mixer_flops(op: str, seq_len: int, hidden: int, heads: int, convention: Convention = "full") -> int:
    """FLOPs of one token mixer (the op and its output projection) for one sample of ``seq_len`` tokens."""
    _check(convention)
    if hidden % heads:
        raise ValueError(f"hidden {hidden} not divisible by heads {heads}")
    linear, other = _mixer_parts(op, seq_len, hidden, heads)
    return linear + (other if convention == "full" else 0)


def ffn_flops(seq_len: int, hidden: int, ffn: tuple[int, ...] | list[int]) -> int:
    """The FFN stack d -> f1 -> ... -> fm -> d (all nn.Linear: the same in both conventions)."""
    widths = [hidden, *ffn, hidden]
    return sum(2 * seq_len * a * b for a, b in zip(widths[:-1], widths[1:], strict=True))


def projection_flops(seq_len: int, hidden: int, next_hidden: int | None) -> int:
    """The h_j -> h_{j+1} projection between layers of different hidden size (0 when equal or last)."""
    return 0 if next_hidden is None or next_hidden == hidden else 2 * seq_len * hidden * next_hidden


def layer_flops(layer: LayerSpec, seq_len: int, next_hidden: int | None = None, convention: Convention = "full") -> int:
    """One encoder layer: mixer + FFN stack + the projection to the next layer's size (if it differs)."""
    return (
        mixer_flops(layer.op, seq_len, layer.hidden, layer.heads, convention)
        + ffn_flops(seq_len, layer.hidden, layer.ffn)
        + projection_flops(seq_len, layer.hidden, next_hidden)
    )


def head_flops(hidden: int, num_labels: int) -> int:
    """Pooler (d x d) and classifier (d x num_labels) on the [CLS] vector only, as in :mod:`dht.flops`."""
    return 2 * hidden * hidden + 2 * hidden * num_labels


def model_flops(
    arch: Architecture,
    seq_len: int,
    num_labels: int = 2,
    convention: Convention = "full",
    include_classifier: bool = True,
) -> int:
    """Forward FLOPs of the whole classifier for one sample of ``seq_len`` (padded) tokens."""
    _check(convention)
    nexts = [*arch.hidden_sizes[1:], None]
    total = sum(layer_flops(layer, seq_len, nxt, convention) for layer, nxt in zip(arch.layers, nexts, strict=True))
    return total + (head_flops(arch.layers[-1].hidden, num_labels) if include_classifier else 0)


def reference_flops(
    seq_len: int, reference: Any, num_labels: int | None = None, convention: Convention = "full"
) -> int:
    """Forward FLOPs of the reference BERT (all layers, all heads) by :func:`dht.flops.full_model_flops`.

    ``reference``: anything :meth:`dht.flops.FlopShape.of` accepts (the 12-VaBERT's DHTConfig, a
    ``params.yaml`` model mapping with ``num_hidden_layers`` etc., a FlopShape). ``num_labels`` overrides the
    reference's so both sides count the same classifier.
    """
    shape = FlopShape.of(reference)
    if num_labels is not None:
        shape = dataclasses.replace(shape, num_labels=num_labels)
    return full_model_flops(seq_len, shape, convention, "inference")


def flop_ratio(
    arch: Architecture, seq_len: int, reference: Any, num_labels: int = 2, convention: Convention = "full"
) -> float:
    """Forward FLOPs of ``arch`` / those of the reference (e.g. 12-VaBERT) at the same length and label count:
    the x-axis of DHT's Table 2, so budgets like 0.25x or 0.5x of 12-VaBERT apply directly."""
    return model_flops(arch, seq_len, num_labels, convention) / reference_flops(seq_len, reference, num_labels, convention)


def within_budget(
    archs: Sequence[Architecture],
    seq_len: int,
    *,
    max_flops: int | None = None,
    max_ratio: float | None = None,
    reference: Any = None,
    num_labels: int = 2,
) -> list[Architecture]:
    """The architectures whose forward FLOPs per sample (:func:`model_flops`, ``seq_len``
    tokens) are at most ``max_flops`` and/or at most ``max_ratio`` x the reference model's
    (:func:`flop_ratio`; ``reference`` = a config-like for :mod:`dht.flops`, e.g. the
    12-VaBERT's)."""
    if max_flops is None and max_ratio is None:
        raise ValueError("give max_flops and/or max_ratio")
    limit = math.inf if max_flops is None else max_flops
    if max_ratio is not None:
        if reference is None:
            raise ValueError("max_ratio needs a reference config (e.g. the 12-VaBERT's model config)")
        limit = min(limit, max_ratio * reference_flops(seq_len, reference, num_labels))
    return [a for a in archs if model_flops(a, seq_len, num_labels) <= limit]
