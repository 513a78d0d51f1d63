"""Analytic FLOP accounting for the DHT encoder.

The paper reports FLOP ratios "estimated based on the layer/head number selection in comparison with a model with
full layers and full heads" (Meng et al. 2024, Section 6.2; Tables 1-2), without giving its counting rules. This
module counts per-sample FLOPs of :class:`dht.model.DHTForSequenceClassification` analytically, in two conventions:

``"full"``
    Every matrix multiplication: Q/K/V/O projections, attention scores QK^T, attention-weighted values AV, the
    FFN, the pooler and the classifier. 2 FLOPs per multiply-accumulate (MAC). Embedding lookups, LayerNorm,
    softmax, GELU, bias adds and residual adds count 0. This is exactly what
    ``torch.utils.flop_counter.FlopCounterMode`` counts on the model with eager attention (tests/test_flops.py).

``"linear"``
    FastBERT's convention (Liu et al. 2020, via ``thop``): only ``nn.Linear`` layers, MACs x 2, biases free.
    The attention matmuls QK^T and AV are not Linear modules and count 0. BERT-base at n = 128: 1,811.9M per
    layer, 21,743M for 12 layers (+1.2M pooler); FastBERT quotes 21,785M, the ~42M gap being its own classifier.

Per layer with n tokens, hidden d, FFN size f, head size d_h = d / N_H and H kept heads (Section 4.1):

    Q, K, V, O projections   4 * 2 * n * d * (H * d_h)       (both conventions)
    QK^T and AV              2 * 2 * n * n * (H * d_h)       ("full" only)
    FFN                      2 * 2 * n * d * f               (both conventions)

and once per sample the pooler 2 * d * d and classifier 2 * d * num_labels, on the [CLS] vector only (the
implementation pools only that token); with ``classifier_pooling: mean`` there is no pooler (the token mean is no
matmul), only the classifier. A layer with H = 0 costs only its FFN: the sliced path computes nothing
for it (its attention output is the output-projection bias). With ``model.exit_heads: per_depth`` a sample stopped
after L layers runs L's own pooler and classifier instead of the shared ones: the same shapes, so every count here
holds for either reading (one head per read; the heads the sample does not stop at do not run; tests/test_flops.py
checks it against FlopCounterMode).

Training FLOPs are counted by one function, :func:`train_flops` (the trainer's accounting, the 12-VaBERT reference
and :func:`plan_flops` in ``mode="train"`` all call it). It counts what autograd computes, matmul by matmul: the
backward of ``y = x W`` is ``dx = dy W^T`` (only when x needs a gradient) and ``dW = x^T dy`` (only when W trains),
each as many FLOPs as the forward matmul. So, per layer of the path:

* a layer that trains, with a gradient flowing in from below (embeddings or a lower layer train): 2 x forward
  (Kaplan et al. 2020's usual convention);
* a frozen layer with a gradient flowing through it (``p_dht_freeze: last_two``: the tail is frozen, lower layers
  train): the activation gradients only, 1 x its Linear FLOPs + 2 x its attention matmuls (QK^T and AV have no
  weights: both of their operands need gradients);
* a frozen layer with nothing trainable below it (``all_but_last_two``: the trainer runs it under ``no_grad``):
  forward only;
* the lowest layer that trains when nothing below it needs a gradient: 2 x forward, except that in a post-LN
  layer the Q/K/V projections read the layer input itself, which needs no gradient, so their dx matmuls are
  skipped (1 x their FLOPs instead of 2 x). In a pre-LN layer they read ``LayerNorm(x)``, whose weight trains, so
  dx is computed (and LayerNorm's own backward stops there).

Plus the pooler and classifier (2 x forward), and the forward-only no-grad passes of a DHT step: the S1 pass of the
first b layers (Section 4.2.1, step 1: all heads, no pooler/classifier) and, with ``dht.decision_states: clean``,
the eval-mode pass that gives UCB_H and the TSB their states (the path's first layers, up to the start of its last
head group; docs/training.md). The reference for training ratios is 12-VaBERT's training step, which has neither
(Section 6.2, BL1). tests/test_training_flops.py checks the count against ``FlopCounterMode`` on real training
steps of the trainer, for every ``p_dht_freeze`` reading, pre- and post-LN.
"""

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "Convention",
    "FlopShape",
    "arm_heads_per_layer",
    "depth_feedback_flops",
    "exit_loss_flops",
    "flop_ratio",
    "forward_flops",
    "full_model_flops",
    "layer_flops",
    "plan_flops",
    "train_flops",
]

Convention = Literal["full", "linear"]
Mode = Literal["inference", "train"]
_CONVENTIONS = ("full", "linear")
_MODES = ("inference", "train")


@dataclass(frozen=True)
class FlopShape:
    """The sizes FLOPs depend on; built from any config-like object by :meth:`of`."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    num_labels: int
    fixed_layers: int = 3
    layer_norm: str = "post"  # "post" (BERT) or "pre": decides one backward matmul (see train_flops)
    classifier_pooling: str = "cls"  # "cls": the pooler (d x d) on [CLS]; "mean": token mean, no pooler

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def of(cls, config_like: Any) -> "FlopShape":
        """Accept a FlopShape, a DHTConfig/BertConfig (or any object with those attributes), or a mapping."""
        if isinstance(config_like, FlopShape):
            return config_like

        def get(name: str, default: Any = None) -> Any:
            if isinstance(config_like, Mapping):
                value = config_like.get(name, default)
            else:
                value = getattr(config_like, name, default)
            if value is None:
                raise ValueError(f"config_like has no {name!r}")
            return value

        shape = cls(
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_attention_heads=int(get("num_attention_heads")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_labels=int(get("num_labels", 2)),
            fixed_layers=int(get("fixed_layers", 3)),
            layer_norm=str(get("layer_norm", "post")),  # BertConfig has none: BERT is post-LN
            classifier_pooling=str(get("classifier_pooling", "cls")),
        )
        if shape.hidden_size % shape.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if shape.layer_norm not in ("post", "pre"):
            raise ValueError(f"layer_norm must be 'post' or 'pre', got {shape.layer_norm!r}")
        if shape.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling must be 'cls' or 'mean', got {shape.classifier_pooling!r}")
        return shape


def _check_convention(convention: str) -> None:
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}, got {convention!r}")


def _layer_parts(seq_len: int, heads: int, shape: FlopShape, convention: Convention) -> tuple[int, int]:
    """(linear-layer FLOPs, attention-matmul FLOPs) of one layer with ``heads`` heads kept (Section 4.1)."""
    if not 0 <= heads <= shape.num_attention_heads:
        raise ValueError(f"heads per layer must be in [0, {shape.num_attention_heads}], got {heads}")
    n, d, f = seq_len, shape.hidden_size, shape.intermediate_size
    kept = heads * shape.head_size  # width of the kept heads: Q/K/V rows and W_O columns
    linear = 2 * (4 * n * d * kept) + 2 * (2 * n * d * f)
    attention = 2 * (2 * n * n * kept) if convention == "full" else 0
    return linear, attention


def layer_flops(seq_len: int, heads: int, config_like: Any, convention: Convention = "full") -> int:
    """FLOPs of one encoder layer for one sample of ``seq_len`` tokens with ``heads`` heads kept.

    With H of N_H heads kept (xi_h of Section 4.1), the Q/K/V/O costs scale with H * d_head and the attention
    matmuls with H; the FFN is unchanged.
    """
    _check_convention(convention)
    linear, attention = _layer_parts(seq_len, heads, FlopShape.of(config_like), convention)
    return linear + attention


def _pooler_flops(shape: FlopShape) -> int:
    # The pooler (d x d) on the [CLS] vector only; mean pooling has no matmul.
    return 2 * shape.hidden_size * shape.hidden_size if shape.classifier_pooling == "cls" else 0


def _classifier_flops(shape: FlopShape) -> int:
    # Pooler and classifier (d x num_labels) on one vector per sample; Linear in both conventions.
    return _pooler_flops(shape) + 2 * shape.hidden_size * shape.num_labels


def forward_flops(
    seq_len: int,
    heads_per_layer: Sequence[int],
    config_like: Any,
    convention: Convention = "full",
    include_classifier: bool = True,
) -> int:
    """Inference FLOPs of one sample whose plan runs ``len(heads_per_layer)`` layers (Section 4.2).

    Args:
        seq_len: tokens the encoder processes (the padded length: padding tokens are computed too).
        heads_per_layer: heads kept in each layer that runs, e.g. ``[12, 12, 12, 8, 8, 8]`` for arm 6L8H.
        config_like: DHTConfig, BertConfig, FlopShape or mapping with hidden_size, intermediate_size,
            num_attention_heads, num_hidden_layers, num_labels.
        convention: ``"full"`` (every matmul) or ``"linear"`` (FastBERT/thop: Linear layers only).
        include_classifier: count the pooler and classifier.
    """
    _check_convention(convention)
    shape = FlopShape.of(config_like)
    if len(heads_per_layer) > shape.num_hidden_layers:
        raise ValueError(f"{len(heads_per_layer)} layers requested, the model has {shape.num_hidden_layers}")
    total = sum(sum(_layer_parts(seq_len, int(h), shape, convention)) for h in heads_per_layer)
    return total + (_classifier_flops(shape) if include_classifier else 0)


def train_flops(
    seq_len: int,
    heads_per_layer: Sequence[int],
    config_like: Any,
    convention: Convention = "full",
    fixed_layers: int | None = None,
    include_s1: bool = True,
    frozen_layers: Collection[int] = (),
    embeddings_train: bool = True,
    decision_layers: int = 0,
) -> int:
    """FLOPs of one DHT training step for one sample (Section 4.2.1, steps 1-4): the one training-FLOP count.

    = forward of the path (with gradient) + its backward, as autograd computes it (module docstring: 2 x forward
    for layers that train, less for frozen ones and for the lowest trainable layer when nothing below it needs a
    gradient; 2 x the pooler and classifier) + the no-grad S1 pass (the first ``fixed_layers`` = b layers, all
    heads, forward only, no classifier) + the no-grad decision pass (the path's first ``decision_layers`` layers
    with the path's heads, forward only, no classifier).

    Args:
        fixed_layers: b; defaults to ``config_like.fixed_layers`` (3 when absent).
        include_s1: False gives a step without the S1 pass (12-VaBERT's, the reference).
        frozen_layers: indices of path layers whose weights do not train (P-DHT, Section 6.1). Their backward
            costs the activation gradients when a gradient flows through them, nothing when it does not.
        embeddings_train: whether the embeddings train, i.e. whether layer 0's input needs a gradient (False
            with ``p_dht_freeze: all_but_last_two``).
        decision_layers: layers of the eval-mode pass that gives UCB_H and the TSB clean states
            (``dht.decision_states: clean``): the start of the path's last head group, 0 without one.
    """
    _check_convention(convention)
    shape = FlopShape.of(config_like)
    b = shape.fixed_layers if fixed_layers is None else fixed_layers
    if not 0 <= b <= shape.num_hidden_layers:
        raise ValueError(f"fixed_layers must be in [0, {shape.num_hidden_layers}], got {b}")
    if not 0 <= decision_layers <= len(heads_per_layer):
        raise ValueError(f"decision_layers must be in [0, {len(heads_per_layer)}], got {decision_layers}")
    fwd = forward_flops(seq_len, heads_per_layer, shape, convention)
    bwd = 0
    grad_in = embeddings_train  # does the input of the current layer need a gradient?
    for layer, heads in enumerate(heads_per_layer):
        linear, attention = _layer_parts(seq_len, int(heads), shape, convention)
        trains = layer not in frozen_layers
        if not (trains or grad_in):
            continue  # nothing below or in it trains: no backward (the trainer runs it under no_grad)
        bwd += linear + 2 * attention  # activation gradients: dx of every Linear, both operands of QK^T and AV
        if trains:
            bwd += linear  # weight gradients
        if not grad_in and shape.layer_norm == "post":
            bwd -= 2 * 3 * seq_len * shape.hidden_size * int(heads) * shape.head_size  # no dx for Q/K/V
        grad_in = True
    # Pooler and classifier train. The input of the first (the pooler, or the classifier with mean pooling)
    # needs a gradient unless nothing below it does (never in the trainer: some layer always trains, and
    # pre-LN's final LayerNorm trains with the classifier).
    first_dx = _pooler_flops(shape) or 2 * shape.hidden_size * shape.num_labels
    bwd += 2 * _classifier_flops(shape) - (0 if grad_in or shape.layer_norm == "pre" else first_dx)
    s1 = forward_flops(seq_len, [shape.num_attention_heads] * b, shape, convention, include_classifier=False)
    decision = forward_flops(seq_len, list(heads_per_layer)[:decision_layers], shape, convention,
                             include_classifier=False)
    return fwd + bwd + (s1 if include_s1 else 0) + decision


def depth_feedback_flops(seq_len: int, layer_options: Sequence[int], config_like: Any,
                         convention: Convention = "full") -> int:
    """FLOPs of one sample's no-grad pass of ``depth_feedback: all_depths`` (docs/training.md, T24): every head of
    the deepest option's layers, forward only, and the pooler and classifier read after each option's depth."""
    _check_convention(convention)
    shape = FlopShape.of(config_like)
    return exit_pass_flops(seq_len, [shape.num_attention_heads] * max(layer_options), len(layer_options), shape,
                           convention)


def exit_read_flops(exits: int, config_like: Any) -> int:
    """FLOPs of ``exits`` extra exit reads without gradient (the pooler and classifier on one vector each): the
    sequential mode's boundaries before the one a sample stops at (docs/training.md T31); the same in both
    conventions (Linear layers)."""
    return exits * _classifier_flops(FlopShape.of(config_like))


def exit_pass_flops(seq_len: int, heads_per_layer: Sequence[int], exits: int, config_like: Any,
                    convention: Convention = "full") -> int:
    """FLOPs of one sample's no-grad pass that reads ``exits`` exits on its way through ``heads_per_layer``: the
    layers forward, and the pooler and classifier at each exit. T24's pass (every head to the deepest option,
    :func:`depth_feedback_flops`) and the sequential mode's full-information pass (T31: its chosen heads)."""
    return (forward_flops(seq_len, heads_per_layer, config_like, convention, include_classifier=False)
            + exit_read_flops(exits, config_like))


def exit_loss_flops(exits: int, config_like: Any) -> int:
    """FLOPs of ``exits`` extra classifier reads that train (``exit_loss: path``, docs/training.md T26): the pooler
    and classifier forward and backward (3 x forward) on one vector per exit; the layers they read ran anyway."""
    return 3 * exits * _classifier_flops(FlopShape.of(config_like))


def full_model_flops(
    seq_len: int, config_like: Any, convention: Convention = "full", mode: Mode = "inference"
) -> int:
    """FLOPs of the full model (all N_L layers, all heads), the 1.00x reference of Tables 1-2 (12-VaBERT).

    For ``mode="train"`` this is a plain fine-tuning step: no S1 pass (12-VaBERT has no bandits).
    """
    shape = FlopShape.of(config_like)
    full = [shape.num_attention_heads] * shape.num_hidden_layers
    if mode == "inference":
        return forward_flops(seq_len, full, shape, convention)
    if mode == "train":
        return train_flops(seq_len, full, shape, convention, include_s1=False)
    raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def flop_ratio(
    seq_len: int,
    heads_per_layer: Sequence[int],
    config_like: Any,
    convention: Convention = "full",
    mode: Mode = "inference",
    fixed_layers: int | None = None,
) -> float:
    """FLOPs of a plan relative to the full model (Section 6.2: "FLOP ratio regarding the full vanilla BERT").

    ``mode="inference"``: forward / full forward (Table 2). ``mode="train"``: DHT step with its S1 pass / plain
    full-model training step (Table 1).
    """
    if mode == "inference":
        num = forward_flops(seq_len, heads_per_layer, config_like, convention)
    elif mode == "train":
        num = train_flops(seq_len, heads_per_layer, config_like, convention, fixed_layers=fixed_layers)
    else:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return num / full_model_flops(seq_len, config_like, convention, mode)


def arm_heads_per_layer(
    num_layers: int, heads: int, config_like: Any, fixed_layers: int | None = None
) -> list[int]:
    """Heads per layer for a paper arm "xLyH" (Section 6.1), e.g. 6L8H -> [12, 12, 12, 8, 8, 8].

    The first b layers keep all heads (Section 4.2: "the first b layers of the model are kept unpruned"); the
    remaining ``num_layers - b`` layers keep ``heads``. Arms of the P-DHT kind ("1L8H+2L12H") are not of this
    form: build their list directly.
    """
    shape = FlopShape.of(config_like)
    b = shape.fixed_layers if fixed_layers is None else fixed_layers
    if not 0 <= num_layers <= shape.num_hidden_layers:
        raise ValueError(f"num_layers must be in [0, {shape.num_hidden_layers}], got {num_layers}")
    return [shape.num_attention_heads if layer < b else heads for layer in range(num_layers)]


def plan_flops(
    depth: torch.Tensor | None,
    heads: torch.Tensor | None,
    config_like: Any,
    seq_len: int | torch.Tensor,
    convention: Convention = "full",
    mode: Mode = "inference",
    fixed_layers: int | None = None,
    batch_size: int | None = None,
    include_s1: bool = True,
) -> torch.Tensor:
    """Per-sample FLOPs (LongTensor[B]) of an execution plan, the ``depth``/``heads`` of the model's forward.

    Vectorised for inference; ``mode="train"`` calls :func:`train_flops` per sample (every layer trains, the S1
    pass included unless ``include_s1=False``). Agrees with :func:`forward_flops` / :func:`train_flops` sample by
    sample. Head rows of layers >= depth[i] are ignored, as in the model.

    Args:
        depth: LongTensor[B] or None (all layers). heads: BoolTensor[B, N_L, N_H] or None (all heads).
        seq_len: padded length (int) or LongTensor[B] of per-sample lengths.
        batch_size: needed only when both depth and heads are None and seq_len is an int.
        include_s1: in ``mode="train"``, count the no-grad S1 pass (False: a plain training step, the reference).
    """
    _check_convention(convention)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    shape = FlopShape.of(config_like)
    num_layers, num_heads = shape.num_hidden_layers, shape.num_attention_heads
    device = next(
        (t.device for t in (depth, heads, seq_len) if isinstance(t, torch.Tensor)), torch.device("cpu")
    )
    if depth is not None:
        batch = depth.shape[0]
    elif heads is not None:
        batch = heads.shape[0]
    elif isinstance(seq_len, torch.Tensor):
        batch = seq_len.shape[0]
    elif batch_size is not None:
        batch = batch_size
    else:
        raise ValueError(
            "plan_flops needs depth, heads, a per-sample seq_len or batch_size to know the batch size"
        )

    depth_t = (
        torch.full((batch,), num_layers, dtype=torch.long, device=device) if depth is None else depth.long()
    )
    n = torch.as_tensor(seq_len, dtype=torch.long, device=device).expand(batch)
    ran = torch.arange(num_layers, device=device)[None, :] < depth_t[:, None]  # [B, N_L] layers that run
    # Heads that actually run, summed over the sample's layers (rows past its depth are ignored, as in the model).
    per_layer = (
        torch.full_like(ran, num_heads, dtype=torch.long) if heads is None else heads.to(torch.long).sum(-1)
    )
    total_heads = (per_layer * ran).sum(-1)

    d, f, dh = shape.hidden_size, shape.intermediate_size, shape.head_size
    per_head_linear = 2 * 4 * n * d * dh  # Q/K/V/O of one head
    per_head_attention = 2 * 2 * n * n * dh if convention == "full" else torch.zeros_like(n)
    ffn = 2 * 2 * n * d * f
    head = _classifier_flops(shape)
    forward = (per_head_linear + per_head_attention) * total_heads + ffn * depth_t + head
    if mode == "inference":
        return forward
    # Training: the one count (train_flops), sample by sample.
    rows = (per_layer * ran).tolist()
    return torch.tensor(
        [train_flops(length, row[:layers], shape, convention, fixed_layers=fixed_layers, include_s1=include_s1)
         for length, row, layers in zip(n.tolist(), rows, depth_t.tolist(), strict=True)],
        dtype=torch.long, device=device)
