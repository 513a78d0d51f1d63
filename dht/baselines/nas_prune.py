"""Differentiable NAS pruning of a trained BERT: the ``nas-prune-<r>`` baseline.

After "Neural Architecture Search on BERT for Network Compression" (the report), Sections 5.3-5.5, which builds on
DARTS (Liu et al. 2019; report Section 4.1) and TAS (Dong & Yang 2019; report Section 4.2). Starting from a
trained teacher :class:`dht.model.DHTForSequenceClassification` (our 12-VaBERT):

1. **Search space** (Section 5.4), on a supernet that runs the teacher's weights (:class:`Supernet`):

   * dimension masks ``m = sigmoid(alpha)``, ``alpha`` initialised at 5 (Section 5.5.1), on the input embedding
     dimension (5.4.1: one mask over the hidden size), on the query/key and on the value hidden size of every
     layer (5.4.2: h_q = h_k, so one mask shared by Q and K and one for V), and on the FFN intermediate size of
     every layer (5.4.3); the gradient arriving at alpha is rescaled (:class:`_RescaledSigmoid`);
   * DARTS-style softmax weights over the heads of every layer, equation (5), ``alpha ~ Normal(0, 0.01)``
     (Section 5.5.2), multiplied by N_H so that the supernet starts as the teacher.

2. **Search objective** (Section 5.3, equations (3)-(4) = TAS's (7)-(8)): ``L_arch = CE + lambda_cost * L_cost``,
   ``L_cost = log E_cost`` when the sampled architecture's cost ``F_cost > (1 + t) R``, ``0`` inside the band,
   ``-log E_cost`` when ``F_cost < (1 - t) R``; ``E_cost`` is the expected FLOPs under the masks, ``R = r x`` the
   teacher's FLOPs (:func:`tas_cost_loss`). Every step runs a 0/1 architecture sampled from the masks with a
   straight-through gradient (TAS's sampling, Section 4.2): the report's deterministic soft masks let a uniform
   down-scaling through the LayerNorms cost nothing in CE, so the masks shrink together, never reach 0/1, and the
   0.01 threshold keeps every dimension (see docs/baselines-nas.md).

3. **Search method** (Sections 4.1, 5.5): first-order DARTS, alternating an architecture step (``L_arch`` on one
   half of the training data, weights fixed) and a weight step (CE on the other half, architecture fixed).

4. **Extraction** (Section 5.5): units whose gate exceeds the threshold, 0.01 for the dimensions ("sigmoid(alpha)
   > 0.01") and the same threshold on the head weights (which keeps the top-n_l heads of each layer, "top-n
   alpha"); when that architecture misses the cost band, the threshold moves to the nearest value that enters it
   (:func:`fit_threshold`). The result is a physically smaller :class:`PrunedBert` whose weights are the kept
   rows/columns of the *teacher* (the report re-initialises the extracted architecture from the un-searched
   model, Section 5.2 step 3), fine-tuned by distillation from the teacher (:func:`finetune`; Section 4.2: "TAS
   performs knowledge distillation from the unpruned network to the searched architecture").

Residual stream: the embedding mask prunes the hidden size everywhere the residual stream carries it
(embedding output, both residual adds and LayerNorms of every layer, the pooler or classifier input), so the
extracted model has one reduced hidden width ``d_e``. In the supernet every LayerNorm takes its mean and
variance over the dimensions weighted by ``m_e`` and multiplies its output by ``m_e``; with 0/1 masks this is
exactly a LayerNorm over the kept dimensions, so the supernet with an architecture's 0/1 gates computes the
extracted model's logits (tested). The pooler keeps its output width d (it is not part of the residual stream)
and the classifier is copied whole.

The teacher's ``config.classifier_pooling`` is followed too. ``"cls"`` (BERT, the paper): the pooler (dense +
tanh) on [CLS], as above. ``"mean"``: the classifier reads the mean of the last stream over the non-padding
tokens (no pooler); the stream is zero outside the kept dimensions, so the extracted classifier takes the
teacher's classifier columns of the kept embedding dimensions (``weight[:, e]``) and runs on d_e inputs.

The teacher's ``config.layer_norm`` is followed. Post-LN (BERT, ``LayerNorm(x + f(x))``): the masked LayerNorm
after each residual add is what zeroes the pruned dimensions of the stream. Pre-LN (``x + f(LayerNorm(x))``, a
final LayerNorm before the pooler): the masked LayerNorms normalise the sub-layer inputs, and each branch output
(attention output projection, FFN down-projection) is multiplied by ``m_e`` before the add, so the stream stays
exactly zero outside the kept dimensions; the final LayerNorm is masked too. Either way the supernet with 0/1
gates computes the extracted model and with all-ones gates the teacher (tested for both).

Readings and adaptations are listed in ``docs/baselines-nas.md``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from dht.flops import full_model_flops, train_flops
from dht.guard import FiniteGuard
from dht.model import DHTForSequenceClassification
from dht.trainer import Predictions, SplitData

__all__ = [
    "ALPHAS_FILE",
    "ARCH_FILE",
    "KEEP_THRESHOLD",
    "SEARCH_FILE",
    "WEIGHTS_FILE",
    "LayerArch",
    "PrunedArch",
    "PrunedBert",
    "SearchResult",
    "Supernet",
    "derive_arch",
    "extract",
    "finetune",
    "fit_threshold",
    "predict_pruned",
    "pruned_flops",
    "rescaled_sigmoid",
    "search",
    "tas_cost_loss",
    "teacher_fields",
    "unit_gates",
]

Convention = Literal["full", "linear"]

KEEP_THRESHOLD = 0.01  # Section 5.5.1: "choose the dimensions ... sigmoid(alpha) > 0.01"
ALPHA_INIT = 5.0  # Section 5.5.1: "initialize alpha to a constant value 5, since sigmoid(5) ~ 1"
ALPHA_CLIP = 10.0  # dimension alphas stay in [-10, 10] (see _RescaledSigmoid)
HEAD_LR_SCALE = 0.1  # head alphas learn at 0.1 x lr_arch (see search)
HEAD_ALPHA_STD = 0.01  # Section 5.5.2: "initialize alpha from Normal(0, 0.01)" (read as standard deviation)
ARCH_FILE = "pruned_arch.json"
WEIGHTS_FILE = "pruned_model.pt"
SEARCH_FILE = "search.json"
ALPHAS_FILE = "alphas.pt"


# --------------------------------------------------------------------------------------------------------------
# The architecture
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LayerArch:
    """What one encoder layer keeps (indices into the teacher's layer).

    Attributes:
        heads: kept heads, ascending (Section 5.4.4). A head is kept when its weight N_H * softmax(alpha)_h is
            above the threshold (the layer's top-n_l heads by alpha) and at least one of its value dimensions
            survives (a head with no value dimension adds exactly 0).
        qk_dims: for every kept head, its kept query/key dimensions (0 .. head_size-1; h_q = h_k, Section 5.4.2).
            May be empty: the head then attends uniformly (scores 0), exactly as the masked supernet does.
        v_dims: for every kept head, its kept value dimensions (non-empty).
        ffn_dims: kept FFN intermediate dimensions (Section 5.4.3); may be empty (the FFN adds its output bias).
    """

    heads: list[int]
    qk_dims: list[list[int]]
    v_dims: list[list[int]]
    ffn_dims: list[int]

    @property
    def qk_width(self) -> int:
        return sum(len(d) for d in self.qk_dims)

    @property
    def v_width(self) -> int:
        return sum(len(d) for d in self.v_dims)


@dataclass
class PrunedArch:
    """A pruned BERT: kept embedding (hidden) dimensions, per-layer heads/QKV/FFN dimensions, teacher sizes."""

    embed_dims: list[int]
    layers: list[LayerArch]
    vocab_size: int
    hidden_size: int  # the teacher's d (the pooler keeps this output width)
    num_attention_heads: int  # the teacher's N_H
    intermediate_size: int  # the teacher's FFN size
    num_labels: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    hidden_dropout_prob: float
    attention_probs_dropout_prob: float
    classifier_dropout: float | None = None
    pad_token_id: int | None = 0
    # The teacher's residual LayerNorm placement ("post" or "pre", dht.model.DHTConfig.layer_norm). Last, with a
    # default, so that architectures saved before the field existed (all post-LN) still load.
    layer_norm: str = "post"
    # What the classifier reads (dht.model.DHTConfig.classifier_pooling): "cls" (the pooler on [CLS]) or
    # "mean" (the mean of the real tokens' states, no pooler). Defaulted for the same reason: older
    # architectures are "cls".
    classifier_pooling: str = "cls"

    def __post_init__(self) -> None:
        if self.layer_norm not in ("post", "pre"):
            raise ValueError(f"PrunedArch.layer_norm must be 'post' or 'pre', got {self.layer_norm!r}")
        if self.classifier_pooling not in ("cls", "mean"):
            raise ValueError(
                f"PrunedArch.classifier_pooling must be 'cls' or 'mean', got {self.classifier_pooling!r}"
            )

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embed_width(self) -> int:
        return len(self.embed_dims)

    def heads_per_layer(self) -> list[int]:
        return [len(layer.heads) for layer in self.layers]

    def summary(self) -> dict[str, Any]:
        """Widths only (what a log line or metrics file needs)."""
        return {
            "embed_width": self.embed_width,
            "heads": self.heads_per_layer(),
            "qk_width": [layer.qk_width for layer in self.layers],
            "v_width": [layer.v_width for layer in self.layers],
            "ffn_width": [len(layer.ffn_dims) for layer in self.layers],
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunedArch:
        data = dict(data)
        data["layers"] = [LayerArch(**layer) for layer in data["layers"]]
        return cls(**data)

    @classmethod
    def full(cls, teacher: DHTForSequenceClassification) -> PrunedArch:
        """Everything kept: the teacher's own architecture."""
        c = teacher.config
        dh = c.hidden_size // c.num_attention_heads
        heads = list(range(c.num_attention_heads))
        layer = LayerArch(heads, [list(range(dh)) for _ in heads], [list(range(dh)) for _ in heads],
                          list(range(c.intermediate_size)))
        return cls(list(range(c.hidden_size)), [copy.deepcopy(layer) for _ in range(c.num_hidden_layers)],
                   **teacher_fields(teacher))


def teacher_fields(teacher: DHTForSequenceClassification) -> dict[str, Any]:
    """The teacher's sizes and rates a :class:`PrunedArch` carries (everything but the kept indices)."""
    c = teacher.config
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "num_labels": c.num_labels,
        "max_position_embeddings": c.max_position_embeddings,
        "type_vocab_size": c.type_vocab_size,
        "layer_norm_eps": float(c.layer_norm_eps),
        "hidden_act": c.hidden_act,
        "hidden_dropout_prob": float(c.hidden_dropout_prob),
        "attention_probs_dropout_prob": float(c.attention_probs_dropout_prob),
        "classifier_dropout": None if c.classifier_dropout is None else float(c.classifier_dropout),
        "pad_token_id": c.pad_token_id,
        "layer_norm": c.layer_norm,
        "classifier_pooling": c.classifier_pooling,
    }


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
    return total + _head_flops(de, arch.hidden_size, arch.num_labels, arch.classifier_pooling)


def _head_flops(de: Any, d: int, num_labels: int, pooling: str) -> Any:
    """Pooler and classifier FLOPs on d_e kept hidden dimensions (a number, or a tensor for E_cost)."""
    if pooling == "mean":
        return 2 * de * num_labels
    return 2 * de * d + 2 * d * num_labels


# --------------------------------------------------------------------------------------------------------------
# Masks: sigmoid with the report's gradient rescaling
# --------------------------------------------------------------------------------------------------------------


class _RescaledSigmoid(torch.autograd.Function):
    """``m = sigmoid(alpha)`` whose backward passes ``dL/dm`` to ``alpha`` unscaled by ``sigmoid'(alpha)``.

    Section 5.5.1: alpha starts at 5 and should leave [-5, 5] so that the masks are 0/1, and "we do some trick to
    make sure that the gradient arriving at alpha would make a large enough step to jump across -5 and 5, by
    rescaling the gradient arriving at alpha". The report does not give the rule. Implemented: the gradient
    arriving at alpha is divided by sigmoid'(alpha) = m (1 - m), i.e. ``dL/dalpha := dL/dm`` (a straight-through
    estimator of the saturated sigmoid). At alpha = +-5 the plain chain rule would shrink the gradient by
    sigmoid'(5) = 0.0066 (~150x); with the rescaling a step has the same size wherever alpha is, so alphas cross
    the whole [-5, 5] range in a bounded number of steps (and can come back: pruning is reversible during the
    search). Because saturated alphas no longer slow down, :func:`search` clips them to [-10, 10] (masks
    0.99995 / 0.00005, far outside [-5, 5]) so that an alpha pushed the same way for many steps can still
    return within a bounded number of steps.
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


def _masked_layer_norm(x: Tensor, ln: nn.LayerNorm, m: Tensor) -> Tensor:
    """LayerNorm whose statistics weight dimension i by m_i, output multiplied by m.

    With 0/1 masks this is ``LayerNorm`` over the kept dimensions (zeros elsewhere), which is what
    :class:`PrunedBert` computes; with all-equal masks it is the ordinary LayerNorm times m.
    """
    total = m.sum().clamp_min(1e-6)  # a sampled architecture may drop every dimension (output 0 then)
    mean = (x * m).sum(-1, keepdim=True) / total
    centred = x - mean
    var = (centred * centred * m).sum(-1, keepdim=True) / total
    return (centred * torch.rsqrt(var + ln.eps) * ln.weight + ln.bias) * m


def _mean_pool(x: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The mean of every sample's non-padding token states, as ``DHTForSequenceClassification.pool`` takes it
    for ``classifier_pooling="mean"`` (the same arithmetic: a plain mean when nothing is padded)."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return x.mean(dim=1)
    weights = attention_mask.bool().to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _additive_mask(attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    keep = attention_mask.bool()
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)[
        :, None, None, :
    ]


# --------------------------------------------------------------------------------------------------------------
# The supernet (the teacher's weights, masked)
# --------------------------------------------------------------------------------------------------------------


class Supernet(nn.Module):
    """The teacher's weights (a private copy, trained by the weight steps) plus the architecture variables.

    ``forward`` is a BERT forward written here (``dht/model.py`` is untouched) in which

    * Q and K outputs are multiplied by ``m_qk[l]``, V outputs by ``m_v[l]`` (per dimension of the all-heads
      width d; h_q = h_k, Section 5.4.2);
    * every head's context is multiplied by its DARTS weight ``N_H * softmax(alpha_heads[l])_h`` (equation (5),
      rescaled by N_H so that the uniform initial weights are 1 and the supernet starts as the teacher);
    * the FFN activations are multiplied by ``m_ffn[l]`` (Section 5.4.3);
    * the embedding output and every residual LayerNorm are masked LayerNorms with ``m_e`` (Section 5.4.1); with a
      pre-LN teacher they normalise the sub-layer inputs, the two branch outputs are multiplied by ``m_e`` before
      the residual add, and the final LayerNorm before the pooler is masked too (see the module docstring);
    * with ``classifier_pooling="mean"`` the classifier reads the mean over the real tokens of the last
      (gated) stream instead of the pooler's output on [CLS].

    ``gates`` may replace the masks by hard 0/1 gates of an architecture (:meth:`hard_gates`).
    """

    def __init__(self, teacher: DHTForSequenceClassification, alpha_init: float = ALPHA_INIT,
                 head_alpha_std: float = HEAD_ALPHA_STD, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.net = copy.deepcopy(teacher)
        self.net.train()
        c = teacher.config
        self.d, self.n_layers, self.n_heads, self.ffn = (c.hidden_size, c.num_hidden_layers,
                                                          c.num_attention_heads, c.intermediate_size)
        self.head_size = self.d // self.n_heads
        self.num_labels = c.num_labels
        self.pre_ln = c.layer_norm == "pre"
        self.pooling = c.classifier_pooling
        device = next(teacher.parameters()).device
        self.alpha_embed = nn.Parameter(torch.full((self.d,), alpha_init, device=device))
        self.alpha_qk = nn.Parameter(torch.full((self.n_layers, self.d), alpha_init, device=device))
        self.alpha_v = nn.Parameter(torch.full((self.n_layers, self.d), alpha_init, device=device))
        self.alpha_ffn = nn.Parameter(torch.full((self.n_layers, self.ffn), alpha_init, device=device))
        heads = torch.randn(self.n_layers, self.n_heads, generator=generator) * head_alpha_std
        self.alpha_heads = nn.Parameter(heads.to(device))
        self.fields = teacher_fields(teacher)  # what derive_arch needs

    # ---- parameters ------------------------------------------------------------------------------------------

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha_embed, self.alpha_qk, self.alpha_v, self.alpha_ffn, self.alpha_heads]

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def alphas(self) -> dict[str, Tensor]:
        return {
            "embed": self.alpha_embed.detach().cpu().clone(),
            "qk": self.alpha_qk.detach().cpu().clone(),
            "v": self.alpha_v.detach().cpu().clone(),
            "ffn": self.alpha_ffn.detach().cpu().clone(),
            "heads": self.alpha_heads.detach().cpu().clone(),
        }

    def soft_gates(self) -> dict[str, Tensor]:
        """Masks sigmoid(alpha) (with the rescaled gradient) and the head weights N_H * softmax (equation (5))."""
        return {
            "embed": rescaled_sigmoid(self.alpha_embed),
            "qk": rescaled_sigmoid(self.alpha_qk),
            "v": rescaled_sigmoid(self.alpha_v),
            "ffn": rescaled_sigmoid(self.alpha_ffn),
            "heads": self.n_heads * torch.softmax(self.alpha_heads, dim=-1),
        }

    def hard_gates(self, arch: PrunedArch) -> dict[str, Tensor]:
        """0/1 gates equivalent to ``arch`` (kept heads get weight 1, pruned heads 0)."""
        device = self.alpha_embed.device
        embed = torch.zeros(self.d, device=device)
        embed[arch.embed_dims] = 1.0
        qk = torch.zeros(self.n_layers, self.d, device=device)
        v = torch.zeros(self.n_layers, self.d, device=device)
        ffn = torch.zeros(self.n_layers, self.ffn, device=device)
        heads = torch.zeros(self.n_layers, self.n_heads, device=device)
        for i, layer in enumerate(arch.layers):
            for h, qd, vd in zip(layer.heads, layer.qk_dims, layer.v_dims, strict=True):
                heads[i, h] = 1.0
                qk[i, [h * self.head_size + j for j in qd]] = 1.0
                v[i, [h * self.head_size + j for j in vd]] = 1.0
            ffn[i, layer.ffn_dims] = 1.0
        return {"embed": embed, "qk": qk, "v": v, "ffn": ffn, "heads": heads}

    # ---- forward ---------------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                gates: dict[str, Tensor] | None = None, dropout: bool = False) -> Tensor:
        """Logits of the masked supernet. ``dropout``: apply the teacher's dropout rates (training steps)."""
        g = self.soft_gates() if gates is None else gates
        bert, c = self.net.bert, self.net.config
        p_hidden = c.hidden_dropout_prob if dropout else 0.0
        p_attn = c.attention_probs_dropout_prob if dropout else 0.0
        m_e = g["embed"]
        emb = bert.embeddings
        n = input_ids.shape[1]
        x = (emb.word_embeddings(input_ids) + emb.token_type_embeddings(torch.zeros_like(input_ids))
             + emb.position_embeddings(torch.arange(n, device=input_ids.device))[None])
        x = F.dropout(_masked_layer_norm(x, emb.LayerNorm, m_e), p_hidden)
        add_mask = _additive_mask(attention_mask, x.dtype)
        batch, heads, dh = x.shape[0], self.n_heads, self.head_size
        scale = 1.0 / math.sqrt(dh)
        act = ACT2FN[c.hidden_act]
        for i, layer in enumerate(bert.encoder.layer):
            sa, out = layer.attention.self, layer.attention.output
            # Pre-LN: the attention reads the masked LayerNorm of the stream (zero outside the kept dimensions).
            h = _masked_layer_norm(x, out.LayerNorm, m_e) if self.pre_ln else x

            def split(t: Tensor) -> Tensor:
                return t.view(batch, n, heads, dh).transpose(1, 2)

            q = split(sa.query(h) * g["qk"][i])
            k = split(sa.key(h) * g["qk"][i])
            v = split(sa.value(h) * g["v"][i])
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            if add_mask is not None:
                scores = scores + add_mask
            probs = F.dropout(torch.softmax(scores, dim=-1), p_attn)
            context = torch.matmul(probs, v) * g["heads"][i][None, :, None, None]
            context = context.transpose(1, 2).reshape(batch, n, heads * dh)
            attn = F.dropout(out.dense(context), p_hidden)
            if self.pre_ln:
                # No LayerNorm follows the add, so the branch itself is masked: the output projection's rows
                # (and bias) outside the kept dimensions would otherwise refill the pruned part of the stream. With
                # 0/1 gates the logits would not change (every read of the stream is a masked LayerNorm, blind to
                # those dimensions), but the stream would no longer be the extracted model's padded with zeros,
                # and with soft masks a dimension's m_e would not scale what the branches write into it.
                x = x + attn * m_e
                h = _masked_layer_norm(x, layer.output.LayerNorm, m_e)
            else:
                x = h = _masked_layer_norm(attn + x, out.LayerNorm, m_e)
            inter = act(layer.intermediate.dense(h)) * g["ffn"][i]
            ffn = F.dropout(layer.output.dense(inter), p_hidden)
            x = x + ffn * m_e if self.pre_ln else _masked_layer_norm(ffn + x, layer.output.LayerNorm, m_e)
        if self.pre_ln:
            x = _masked_layer_norm(x, bert.final_layer_norm, m_e)  # DHTBertModel.final_norm, masked
        if self.pooling == "mean":
            pooled = _mean_pool(x, attention_mask)  # zero outside the kept dimensions, like the stream
        else:
            pooled = bert.pooler.activation(bert.pooler.dense(x[:, 0]))
        p_cls = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        return self.net.classifier(F.dropout(pooled, p_cls if dropout else 0.0))

    # ---- cost ------------------------------------------------------------------------------------------------

    def expected_flops(self, seq_len: int, convention: Convention = "full",
                       gates: dict[str, Tensor] | None = None) -> Tensor:
        """E_cost(A) of equation (4): the FLOPs formula of :func:`pruned_flops` with every width replaced by the
        sum of its soft mask (the expected width when each dimension is kept with probability m_i). The bilinear
        terms (d_e x q, d_e x v, d_e x f) are then exact expectations for independent keep decisions. The head
        weights do not enter: softmax weights sum to a constant, so equation (5) carries no cost."""
        g = self.soft_gates() if gates is None else gates
        n = seq_len
        de = g["embed"].sum()
        q, v, f = g["qk"].sum(-1), g["v"].sum(-1), g["ffn"].sum(-1)  # [L]
        per_layer = 2 * n * de * (2 * q + v) + 2 * n * v * de + 4 * n * de * f
        if convention == "full":
            per_layer = per_layer + 2 * n * n * (q + v)
        return per_layer.sum() + _head_flops(de, self.d, self.num_labels, self.pooling)

    def sampled_gates(self, generator: torch.Generator) -> dict[str, Tensor]:
        """A binary architecture sampled from the masks (dimension i kept with probability m_i, independently),
        with a straight-through gradient: the value is the 0/1 sample, the gradient reaches m (and, through the
        rescaled sigmoid, alpha) unchanged. Head weights stay the continuous equation (5)."""
        gates = self.soft_gates()
        out = {"heads": gates["heads"]}
        for key in ("embed", "qk", "v", "ffn"):
            m = gates[key]
            u = torch.rand(m.shape, generator=generator).to(m.device)
            out[key] = (u < m.detach()).to(m.dtype) + m - m.detach()
        return out


def unit_gates(alphas: dict[str, Tensor]) -> dict[str, Tensor]:
    """The factor every searchable unit's output is multiplied by in the supernet: ``sigmoid(alpha)`` for the
    dimensions (Section 5.5.1), ``N_H * softmax(alpha)`` for the heads of a layer (equation (5), rescaled so that
    uniform weights are 1)."""
    out = {k: torch.sigmoid(v) for k, v in alphas.items() if k != "heads"}
    out["heads"] = alphas["heads"].shape[-1] * torch.softmax(alphas["heads"], dim=-1)
    return out


def derive_arch(alphas: dict[str, Tensor], fields: dict[str, Any], threshold: float = KEEP_THRESHOLD) -> PrunedArch:
    """The discrete architecture whose units have a gate above ``threshold`` (Section 5.5).

    * Dimensions: kept where ``sigmoid(alpha) > threshold`` (Section 5.5.1; the report's threshold is 0.01). If no
      embedding dimension survives, the one with the largest alpha is kept (a LayerNorm needs one dimension).
    * Heads: kept where ``N_H * softmax(alpha)_h > threshold``: in every layer these are the top-n_l heads by alpha
      (Section 5.5.2, "choose the heads according to the top-n alpha"), n_l set by the same threshold as the
      dimensions. A kept head also needs at least one kept value dimension (otherwise it adds exactly 0).
    """
    gates = unit_gates(alphas)
    n_heads = fields["num_attention_heads"]
    dh = fields["hidden_size"] // n_heads
    embed = (gates["embed"] > threshold).nonzero().flatten().tolist()
    if not embed:
        embed = [int(alphas["embed"].argmax())]
    layers = []
    for i in range(alphas["qk"].shape[0]):
        heads, qk_dims, v_dims = [], [], []
        for h in (gates["heads"][i] > threshold).nonzero().flatten().tolist():
            block = slice(h * dh, (h + 1) * dh)
            vd = (gates["v"][i, block] > threshold).nonzero().flatten().tolist()
            if not vd:
                continue
            heads.append(h)
            qk_dims.append((gates["qk"][i, block] > threshold).nonzero().flatten().tolist())
            v_dims.append(vd)
        ffn = (gates["ffn"][i] > threshold).nonzero().flatten().tolist()
        layers.append(LayerArch(heads, qk_dims, v_dims, ffn))
    return PrunedArch(embed, layers, **fields)


def fit_threshold(alphas: dict[str, Tensor], fields: dict[str, Any], target: float, tolerance: float,
                  seq_len: int, convention: Convention = "full",
                  threshold: float = KEEP_THRESHOLD) -> tuple[float, PrunedArch]:
    """The keep threshold of the extracted architecture, and that architecture.

    The report's threshold (0.01) when its architecture costs within the band ``[(1 - t) R, (1 + t) R]``.
    Otherwise the masks were not driven to 0/1 (the report's own searches ended 0.16 above a 0.5 target,
    Section 5.6) and the threshold moves, over the gate values, to the nearest value that enters the band: the
    smallest threshold above 0.01 whose architecture costs at most (1 + t) R, or the largest one below 0.01 that
    costs at least (1 - t) R. The units then removed (or added) are those the search valued least (most). FLOPs
    do not increase with the threshold, so a bisection over the sorted gate values finds it.
    """
    def cost(tau: float) -> float:
        return pruned_flops(derive_arch(alphas, fields, tau), seq_len, convention)

    base = derive_arch(alphas, fields, threshold)
    base_cost = pruned_flops(base, seq_len, convention)
    hi, lo = (1 + tolerance) * target, (1 - tolerance) * target
    if lo <= base_cost <= hi:
        return threshold, base
    values = torch.cat([g.flatten() for g in unit_gates(alphas).values()]).double().unique().tolist()
    if base_cost > hi:
        cands = [v for v in values if v > threshold]  # ascending; keep units with gate > tau
        if not cands or cost(cands[-1]) > hi:
            tau = cands[-1] if cands else threshold
            return tau, derive_arch(alphas, fields, tau)
        left, right = 0, len(cands) - 1  # smallest index with cost <= hi
        while left < right:
            mid = (left + right) // 2
            if cost(cands[mid]) <= hi:
                right = mid
            else:
                left = mid + 1
        return cands[left], derive_arch(alphas, fields, cands[left])
    cands = [0.0] + [v for v in values if v < threshold]  # ascending
    left, right = 0, len(cands) - 1  # largest index with cost >= lo
    if cost(cands[0]) < lo:
        return cands[0], derive_arch(alphas, fields, cands[0])
    while left < right:
        mid = (left + right + 1) // 2
        if cost(cands[mid]) >= lo:
            left = mid
        else:
            right = mid - 1
    return cands[left], derive_arch(alphas, fields, cands[left])


# --------------------------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """What :func:`search` found.

    Attributes:
        alphas: the architecture variables ("embed" [d], "qk"/"v" [N_L, d], "ffn" [N_L, f], "heads" [N_L, N_H]).
        arch: the extracted architecture (units with a gate above ``threshold``, see :func:`fit_threshold`).
        threshold: the keep threshold used (0.01, the report's, unless moved to enter the cost band).
        history: one dict per epoch: mean CE of the architecture and weight steps, mean cost loss (equation (4)),
            mean sampled FLOP ratio F_cost / full, and at the epoch's end the expected ratio E_cost / full and the
            ratio of the architecture at the 0.01 threshold.
        train_flops: FLOPs spent by the search (full convention; forward + backward of every step).
        full_flops, target_flops: the teacher's FLOPs and R = r x full, per sample, in ``convention``.
        expected_flop_ratio: E_cost / full at the end of the search.
        flop_ratio: FLOPs of ``arch`` / full (``convention``); within_tolerance: |flop_ratio - r| <= t r.
        settings: the arguments of the search.
    """

    alphas: dict[str, Tensor]
    arch: PrunedArch
    threshold: float
    history: list[dict[str, Any]]
    train_flops: float
    full_flops: float
    target_flops: float
    expected_flop_ratio: float
    flop_ratio: float
    within_tolerance: bool
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def masks(self) -> dict[str, Tensor]:
        """sigmoid(alpha) of the dimensions and N_H * softmax(alpha) of the heads (per layer)."""
        return unit_gates(self.alphas)

    def save(self, out_dir: str | Path) -> None:
        """``search.json`` (everything but the alphas) and ``alphas.pt``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        info = {k: v for k, v in asdict(self).items() if k not in ("alphas", "arch")}
        info["arch"] = self.arch.to_dict()
        (out_dir / SEARCH_FILE).write_text(json.dumps(info, indent=1) + "\n")
        torch.save(self.alphas, out_dir / ALPHAS_FILE)

    @classmethod
    def load(cls, out_dir: str | Path) -> SearchResult:
        out_dir = Path(out_dir)
        info = json.loads((out_dir / SEARCH_FILE).read_text())
        info["arch"] = PrunedArch.from_dict(info["arch"])
        alphas = torch.load(out_dir / ALPHAS_FILE, map_location="cpu", weights_only=True)
        return cls(alphas=alphas, **info)


def _halves(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=generator)
    return perm[: n // 2], perm[n // 2 :]


def _batches(index: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = index[torch.randperm(len(index), generator=generator)]
    for lo in range(0, len(order), batch_size):
        yield order[lo : lo + batch_size]


def _cycle(index: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    while True:
        yield from _batches(index, batch_size, generator)


def search(
    teacher: DHTForSequenceClassification,
    train: SplitData,
    target_ratio: float,
    lambda_cost: float,
    tolerance: float,
    epochs: int,
    lr_weights: float,
    lr_arch: float,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    seq_len: int,
    *,
    convention: Convention = "full",
    threshold: float = KEEP_THRESHOLD,
    alpha_clip: float = ALPHA_CLIP,
    head_lr_scale: float = HEAD_LR_SCALE,
    guard: FiniteGuard | None = None,
) -> SearchResult:
    """Differentiable architecture search for a pruned teacher (report Sections 5.3-5.5, first-order DARTS).

    The training data are split once (seeded) into two halves, as DARTS and TAS split train/validation (report
    Sections 4.1-4.2). Every step first updates the architecture variables on a batch of the second half with
    ``L_arch = CE + lambda_cost * L_cost`` (equations (3)-(4)) and the weights fixed (first-order: xi = 0 in
    Algorithm 1), then the supernet weights on a batch of the first half with CE and the architecture fixed.
    Both steps run an architecture sampled from the masks (TAS's sampling, report Section 4.2; see
    :meth:`Supernet.sampled_gates`); ``F_cost`` is the cost of the architecture sampled for the step and
    ``E_cost`` the expected cost. Architecture variables: Adam (betas (0.5, 0.999) as DARTS, no weight decay,
    which would pull alphas towards 0), dimension alphas clipped to ``[-alpha_clip, alpha_clip]``; weights:
    AdamW. Both learning rates follow a cosine schedule to 0 over the search (DARTS's schedule for the weights).
    An epoch is one pass over the first half.

    Args:
        teacher: the trained model; not modified (the supernet trains a private copy of its weights).
        train: training split. target_ratio: r, with R = r x the teacher's FLOPs (``convention``, ``seq_len``).
        lambda_cost: weight of the cost loss. tolerance: t of equation (4).
        epochs, lr_weights, lr_arch, batch_size: optimisation. device, seed: where and how reproducibly.
        seq_len: the padded length n that the FLOP counts use (the pipeline's ``seq_len``).
        convention: FLOP convention of E_cost, F_cost and R. threshold: the keep threshold of Section 5.5.1.
        alpha_clip: bound of the dimension alphas. head_lr_scale: the head alphas learn at
            ``head_lr_scale x lr_arch`` (their useful range, a few units of log-weight, is much narrower than the
            masks' [-5, 5], and Adam turns their often tiny CE gradients into full-size steps).
        guard: stops on a non-finite loss, weight or architecture variable (:mod:`dht.guard`; default: names
            ``baselines.nas_prune.lr_weights`` and ``lr_arch``).

    Returns:
        :class:`SearchResult` with the extracted architecture (:func:`fit_threshold`).
    """
    if not 0 < target_ratio <= 1:
        raise ValueError(f"target_ratio must be in (0, 1], got {target_ratio}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    if len(train) < 2:
        raise ValueError("search needs at least two training samples (one per half)")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    guard = guard or FiniteGuard("nas-prune: architecture search", f"lower baselines.nas_prune.lr_weights (now "
                                 f"{lr_weights:g}) or baselines.nas_prune.lr_arch (now {lr_arch:g})")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    fields = teacher_fields(teacher)
    conf = teacher.config
    full = float(full_model_flops(seq_len, conf, convention, "inference"))
    target = target_ratio * full
    # Training FLOPs per sample (full convention, the pipeline's accounting): the supernet computes every
    # dimension and head. Weight step: forward + backward (2x). Architecture step: the weights are frozen, so the
    # backward computes activation gradients only (dht.flops.train_flops with every layer frozen).
    all_heads = [conf.num_attention_heads] * conf.num_hidden_layers
    weight_step = train_flops(seq_len, all_heads, conf, "full", include_s1=False)
    arch_step = train_flops(seq_len, all_heads, conf, "full", include_s1=False,
                            frozen_layers=range(conf.num_hidden_layers))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        net = Supernet(teacher, generator=gen).to(device)
        weight_opt = torch.optim.AdamW(net.weight_parameters(), lr=lr_weights)
        arch_opt = torch.optim.Adam(
            [{"params": [net.alpha_embed, net.alpha_qk, net.alpha_v, net.alpha_ffn]},
             {"params": [net.alpha_heads], "lr": lr_arch * head_lr_scale}],
            lr=lr_arch, betas=(0.5, 0.999),
        )
        weight_half, arch_half = _halves(len(train), gen)
        total_steps = max(epochs * math.ceil(len(weight_half) / batch_size), 1)
        schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps) for opt in (weight_opt, arch_opt)]
        dims = [net.alpha_embed, net.alpha_qk, net.alpha_v, net.alpha_ffn]
        history: list[dict[str, Any]] = []
        spent = 0.0
        arch_iter = _cycle(arch_half, batch_size, gen)
        step = 0
        for epoch in range(epochs):
            sums = {"ce": 0.0, "ce_weights": 0.0, "cost_loss": 0.0, "sampled_flop_ratio": 0.0}
            steps = 0
            for w_index in _batches(weight_half, batch_size, gen):
                a_index = next(arch_iter)
                # Architecture step (equation (3)), weights fixed.
                for p in net.weight_parameters():
                    p.requires_grad_(False)
                ids, mask, labels = train.batch(a_index, device)
                gates = net.sampled_gates(gen)
                ce = F.cross_entropy(net(ids, mask, gates, dropout=True), labels)
                expected = net.expected_flops(seq_len, convention)
                actual = float(net.expected_flops(seq_len, convention, {k: t.detach() for k, t in gates.items()}))
                cost = tas_cost_loss(expected, actual, target, tolerance)
                step += 1
                arch_loss = ce + lambda_cost * cost
                guard.loss(arch_loss, step, epoch + 1, what="architecture loss")
                arch_opt.zero_grad(set_to_none=True)
                arch_loss.backward()
                arch_opt.step()
                with torch.no_grad():
                    for alpha in dims:
                        alpha.clamp_(-alpha_clip, alpha_clip)
                for p in net.weight_parameters():
                    p.requires_grad_(True)
                # Weight step, architecture fixed (a fresh sample).
                ids, mask, labels = train.batch(w_index, device)
                with torch.no_grad():
                    gates = {k: t.detach() for k, t in net.sampled_gates(gen).items()}
                ce_w = F.cross_entropy(net(ids, mask, gates, dropout=True), labels)
                guard.loss(ce_w, step, epoch + 1, what="weight loss")
                weight_opt.zero_grad(set_to_none=True)
                ce_w.backward()
                weight_opt.step()
                guard.parameters(net.named_parameters(), step, epoch + 1)
                for schedule in schedules:
                    schedule.step()
                spent += len(a_index) * arch_step + len(w_index) * weight_step
                sums["ce"] += float(ce.detach())
                sums["ce_weights"] += float(ce_w.detach())
                sums["cost_loss"] += float(cost.detach())
                sums["sampled_flop_ratio"] += actual / full
                steps += 1
            with torch.no_grad():
                expected_ratio = float(net.expected_flops(seq_len, convention)) / full
            at_threshold = pruned_flops(derive_arch(net.alphas(), fields, threshold), seq_len, convention)
            history.append({"epoch": epoch + 1, **{k: v / max(steps, 1) for k, v in sums.items()},
                            "expected_flop_ratio": expected_ratio, "threshold_flop_ratio": at_threshold / full})
        alphas = net.alphas()
    tau, arch = fit_threshold(alphas, fields, target, tolerance, seq_len, convention, threshold)
    ratio = pruned_flops(arch, seq_len, convention) / full
    settings = {"target_ratio": target_ratio, "lambda_cost": lambda_cost, "tolerance": tolerance, "epochs": epochs,
                "lr_weights": lr_weights, "lr_arch": lr_arch, "batch_size": batch_size, "seed": seed,
                "seq_len": seq_len, "convention": convention, "threshold": threshold, "alpha_clip": alpha_clip,
                "head_lr_scale": head_lr_scale}
    return SearchResult(alphas, arch, tau, history, spent, full, target, expected_ratio, ratio,
                        abs(ratio - target_ratio) <= tolerance * target_ratio + 1e-12, settings)


# --------------------------------------------------------------------------------------------------------------
# The extracted model
# --------------------------------------------------------------------------------------------------------------


class _Dense(nn.Module):
    """``nn.Linear`` that accepts zero input or output features (a fully pruned FFN or attention).

    Parameters are created empty-valued (zeros): they are always copied from the teacher or loaded."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class _PrunedLayer(nn.Module):
    """One layer of :class:`PrunedBert`: heads of their own Q/K and V widths, FFN of its own width.

    ``arch.layer_norm`` places the two LayerNorms as the teacher's :class:`dht.model.DHTLayer` does: post-LN
    ``attention_norm(x + attn(x))``, ``output_norm(x + ffn(x))``; pre-LN ``x + attn(attention_norm(x))``,
    ``x + ffn(output_norm(x))`` (the same teacher LayerNorms are copied into them either way).
    """

    def __init__(self, layer: LayerArch, arch: PrunedArch) -> None:
        super().__init__()
        de = arch.embed_width
        self.qk_widths = [len(d) for d in layer.qk_dims]
        self.v_widths = [len(d) for d in layer.v_dims]
        self.query = _Dense(de, sum(self.qk_widths))
        self.key = _Dense(de, sum(self.qk_widths))
        self.value = _Dense(de, sum(self.v_widths))
        self.attention_output = _Dense(sum(self.v_widths), de)
        self.attention_norm = nn.LayerNorm(de, eps=arch.layer_norm_eps)
        self.intermediate = _Dense(de, len(layer.ffn_dims))
        self.output = _Dense(len(layer.ffn_dims), de)
        self.output_norm = nn.LayerNorm(de, eps=arch.layer_norm_eps)
        self.act = ACT2FN[arch.hidden_act]
        self.scale = 1.0 / math.sqrt(arch.head_size)  # the teacher's scale: kept dims see the same logits
        self.p_hidden, self.p_attn = arch.hidden_dropout_prob, arch.attention_probs_dropout_prob
        self.pre_ln = arch.layer_norm == "pre"

    def _attention(self, x: Tensor, add_mask: Tensor | None) -> Tensor:
        if not self.v_widths:
            return self.attention_output(x.new_zeros(*x.shape[:-1], 0))  # no head: the output bias
        batch, n, _ = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)
        p_attn = self.p_attn if self.training else 0.0
        if len(set(self.qk_widths)) == 1 and len(set(self.v_widths)) == 1:
            # Same widths in every head: one batched attention.
            h = len(self.v_widths)

            def split(t: Tensor, w: int) -> Tensor:
                return t.view(batch, n, h, w).transpose(1, 2)

            context = self._attend(split(q, self.qk_widths[0]), split(k, self.qk_widths[0]),
                                   split(v, self.v_widths[0]), add_mask, p_attn)
            return self.attention_output(context.transpose(1, 2).reshape(batch, n, -1))
        pieces = [
            self._attend(qh, kh, vh, add_mask, p_attn)
            for qh, kh, vh in zip(q.split(self.qk_widths, -1), k.split(self.qk_widths, -1),
                                  v.split(self.v_widths, -1), strict=True)
        ]
        return self.attention_output(torch.cat(pieces, dim=-1))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, add_mask: Tensor | None, p_attn: float) -> Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if add_mask is not None:
            scores = scores + (add_mask if scores.dim() == 4 else add_mask[:, 0])
        return torch.matmul(F.dropout(torch.softmax(scores, dim=-1), p_attn, self.training), v)

    def forward(self, x: Tensor, add_mask: Tensor | None) -> Tensor:
        p = self.p_hidden if self.training else 0.0
        if self.pre_ln:
            x = x + F.dropout(self._attention(self.attention_norm(x), add_mask), p, self.training)
            return x + F.dropout(self.output(self.act(self.intermediate(self.output_norm(x)))), p, self.training)
        x = self.attention_norm(F.dropout(self._attention(x, add_mask), p, self.training) + x)
        inter = self.act(self.intermediate(x))
        return self.output_norm(F.dropout(self.output(inter), p, self.training) + x)


class PrunedBert(nn.Module):
    """The searched architecture as a physically smaller BERT classifier.

    Hidden (residual-stream) width ``d_e = len(arch.embed_dims)`` everywhere; per layer its own query/key and
    value widths (per head) and FFN width; LayerNorms over the kept dimensions; the pooler maps d_e -> d (the
    teacher's width) and the classifier d -> num_labels. Eager attention (what FlopCounterMode counts). Post-LN
    BERT, or pre-LN when the teacher was (``arch.layer_norm``): then ``final_norm`` (the teacher's
    ``bert.final_layer_norm`` over the kept dimensions) normalises the last hidden states before the pooler; a
    post-LN model has no ``final_norm``, so its state dict is the one saved before pre-LN existed. With
    ``arch.classifier_pooling == "mean"`` there is no pooler: the classifier maps the mean of the real tokens'
    d_e-wide states to num_labels.
    """

    def __init__(self, arch: PrunedArch) -> None:
        super().__init__()
        self.arch = arch
        de = arch.embed_width
        self.word_embeddings = nn.Embedding(arch.vocab_size, de, padding_idx=arch.pad_token_id)
        self.position_embeddings = nn.Embedding(arch.max_position_embeddings, de)
        self.token_type_embeddings = nn.Embedding(arch.type_vocab_size, de)
        self.embedding_norm = nn.LayerNorm(de, eps=arch.layer_norm_eps)
        self.layers = nn.ModuleList([_PrunedLayer(layer, arch) for layer in arch.layers])
        if arch.layer_norm == "pre":
            self.final_norm = nn.LayerNorm(de, eps=arch.layer_norm_eps)
        if arch.classifier_pooling == "mean":
            self.classifier = _Dense(de, arch.num_labels)
        else:
            self.pooler = _Dense(de, arch.hidden_size)
            self.classifier = _Dense(arch.hidden_size, arch.num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits [B, num_labels]."""
        n = input_ids.shape[1]
        if n > self.arch.max_position_embeddings:
            raise ValueError(f"sequence length {n} exceeds max_position_embeddings={self.arch.max_position_embeddings}")
        p = self.arch.hidden_dropout_prob if self.training else 0.0
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(torch.zeros_like(input_ids))
             + self.position_embeddings(torch.arange(n, device=input_ids.device))[None])
        x = F.dropout(self.embedding_norm(x), p, self.training)
        add_mask = _additive_mask(attention_mask, x.dtype)
        for layer in self.layers:
            x = layer(x, add_mask)
        if self.arch.layer_norm == "pre":
            x = self.final_norm(x)
        if self.arch.classifier_pooling == "mean":
            pooled = _mean_pool(x, attention_mask)
        else:
            pooled = torch.tanh(self.pooler(x[:, 0]))
        p_cls = self.arch.classifier_dropout if self.arch.classifier_dropout is not None else self.arch.hidden_dropout_prob
        return self.classifier(F.dropout(pooled, p_cls if self.training else 0.0, self.training))

    def flops(self, seq_len: int, convention: Convention = "full") -> int:
        return pruned_flops(self.arch, seq_len, convention)

    def save(self, out_dir: str | Path) -> None:
        """``pruned_arch.json`` (the architecture, with the teacher indices) and ``pruned_model.pt`` (state dict)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ARCH_FILE).write_text(json.dumps(self.arch.to_dict()) + "\n")
        torch.save(self.state_dict(), out_dir / WEIGHTS_FILE)

    @classmethod
    def load(cls, out_dir: str | Path, map_location: str | torch.device = "cpu") -> PrunedBert:
        """The model written by :meth:`save` (in eval mode)."""
        out_dir = Path(out_dir)
        model = cls(PrunedArch.from_dict(json.loads((out_dir / ARCH_FILE).read_text())))
        state = torch.load(out_dir / WEIGHTS_FILE, map_location=map_location, weights_only=True)
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()


def extract(teacher: DHTForSequenceClassification, result: SearchResult | PrunedArch) -> PrunedBert:
    """Build the pruned model of ``result.arch`` and copy the kept rows/columns of the teacher's weights.

    The weights come from the teacher, not from the supernet's search-time weights: the report re-initialises the
    extracted architecture from the un-searched model (Section 5.2, step 3), as DARTS retrains the derived
    architecture. Returns the model in eval mode, on the teacher's device.
    """
    arch = result.arch if isinstance(result, SearchResult) else result
    fields = teacher_fields(teacher)
    for key, value in fields.items():
        if key not in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout") and \
                getattr(arch, key) != value:
            raise ValueError(f"architecture {key}={getattr(arch, key)!r} does not match the teacher's {value!r}")
    model = PrunedBert(arch)
    bert = teacher.bert
    dh = arch.head_size
    e = torch.tensor(arch.embed_dims, dtype=torch.long)
    with torch.no_grad():
        emb = bert.embeddings
        model.word_embeddings.weight.copy_(emb.word_embeddings.weight[:, e])
        model.position_embeddings.weight.copy_(emb.position_embeddings.weight[:, e])
        model.token_type_embeddings.weight.copy_(emb.token_type_embeddings.weight[:, e])
        model.embedding_norm.weight.copy_(emb.LayerNorm.weight[e])
        model.embedding_norm.bias.copy_(emb.LayerNorm.bias[e])
        for spec, dst, src in zip(arch.layers, model.layers, bert.encoder.layer, strict=True):
            qk = torch.tensor([h * dh + j for h, dims in zip(spec.heads, spec.qk_dims, strict=True) for j in dims],
                              dtype=torch.long)
            v = torch.tensor([h * dh + j for h, dims in zip(spec.heads, spec.v_dims, strict=True) for j in dims],
                             dtype=torch.long)
            f = torch.tensor(spec.ffn_dims, dtype=torch.long)
            sa, so = src.attention.self, src.attention.output
            for d_lin, s_lin, rows in ((dst.query, sa.query, qk), (dst.key, sa.key, qk), (dst.value, sa.value, v)):
                d_lin.weight.copy_(s_lin.weight[rows][:, e])
                d_lin.bias.copy_(s_lin.bias[rows])
            dst.attention_output.weight.copy_(so.dense.weight[e][:, v])
            dst.attention_output.bias.copy_(so.dense.bias[e])
            dst.attention_norm.weight.copy_(so.LayerNorm.weight[e])
            dst.attention_norm.bias.copy_(so.LayerNorm.bias[e])
            dst.intermediate.weight.copy_(src.intermediate.dense.weight[f][:, e])
            dst.intermediate.bias.copy_(src.intermediate.dense.bias[f])
            dst.output.weight.copy_(src.output.dense.weight[e][:, f])
            dst.output.bias.copy_(src.output.dense.bias[e])
            dst.output_norm.weight.copy_(src.output.LayerNorm.weight[e])
            dst.output_norm.bias.copy_(src.output.LayerNorm.bias[e])
        if arch.layer_norm == "pre":
            model.final_norm.weight.copy_(bert.final_layer_norm.weight[e])
            model.final_norm.bias.copy_(bert.final_layer_norm.bias[e])
        if arch.classifier_pooling == "mean":
            # The mean of a stream that is zero outside the kept dimensions: only their classifier columns
            # act.
            model.classifier.weight.copy_(teacher.classifier.weight[:, e])
        else:
            model.pooler.weight.copy_(bert.pooler.dense.weight[:, e])
            model.pooler.bias.copy_(bert.pooler.dense.bias)
            model.classifier.weight.copy_(teacher.classifier.weight)
        model.classifier.bias.copy_(teacher.classifier.bias)
    return model.to(next(teacher.parameters()).device).eval()


# --------------------------------------------------------------------------------------------------------------
# Distillation fine-tuning and inference
# --------------------------------------------------------------------------------------------------------------


def finetune(
    pruned: PrunedBert,
    teacher: DHTForSequenceClassification,
    train: SplitData,
    epochs: int,
    lr: float,
    temperature: float,
    alpha_kd: float,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    *,
    seq_len: int | None = None,
    guard: FiniteGuard | None = None,
) -> dict[str, Any]:
    """Fine-tune the extracted model by distillation from the teacher (report Section 4.2: TAS distils the
    unpruned network into the searched one; Hinton et al. 2015, report Section 2.2.4).

    Loss per batch: ``alpha_kd * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha_kd) * CE(z_s, y)``.
    AdamW (weight decay 0.01), constant learning rate, seeded order; the teacher runs in eval mode without
    gradient and is not modified.

    Returns:
        ``{"loss_per_epoch": [...], "kd_per_epoch": [...], "ce_per_epoch": [...]}`` (means per epoch) and
        ``"train_flops"``: teacher forward + student forward and backward (3 x forward), full convention, per
        sample at ``seq_len`` (pass the pipeline's padded length; default: each batch's own width).
        A non-finite loss or weight stops it (``guard``, :mod:`dht.guard`; default: names
        ``baselines.nas_prune.lr_weights``, the rate the stage fine-tunes with).
    """
    guard = guard or FiniteGuard("nas-prune: fine-tuning", f"lower baselines.nas_prune.lr_weights (now {lr:g})")
    device = torch.device(device)
    pruned = pruned.to(device)
    teacher = teacher.to(device)
    was_training = teacher.training
    teacher.eval()
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(pruned.parameters(), lr=lr, weight_decay=0.01)
    keys = ("loss_per_epoch", "kd_per_epoch", "ce_per_epoch")
    out: dict[str, Any] = {key: [] for key in keys}
    out["train_flops"] = 0.0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            pruned.train()
            step = 0
            for epoch in range(1, epochs + 1):
                sums, steps = [0.0, 0.0, 0.0], 0
                for index in _batches(torch.arange(len(train)), batch_size, gen):
                    ids, mask, labels = train.batch(index, device)
                    with torch.no_grad():
                        t_logits = teacher(ids, attention_mask=mask).logits
                    s_logits = pruned(ids, mask)
                    kd = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.softmax(t_logits / temperature, -1),
                                  reduction="batchmean") * temperature**2
                    ce = F.cross_entropy(s_logits, labels)
                    loss = alpha_kd * kd + (1 - alpha_kd) * ce
                    step += 1
                    guard.loss(loss, step, epoch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    guard.parameters(pruned.named_parameters(), step, epoch)
                    n = seq_len if seq_len is not None else ids.shape[1]
                    out["train_flops"] += len(index) * (full_model_flops(n, teacher.config, "full")
                                                        + 3 * pruned_flops(pruned.arch, n, "full"))
                    for i, value in enumerate((loss, kd, ce)):
                        sums[i] += float(value.detach())
                    steps += 1
                for i, key in enumerate(keys):
                    out[key].append(sums[i] / max(steps, 1))
    finally:
        pruned.eval()
        teacher.train(was_training)
    return out


@torch.no_grad()
def predict_pruned(pruned: PrunedBert, data: SplitData, device: torch.device | str, batch_size: int,
                   seq_len: int) -> Predictions:
    """Predictions of the pruned model in the pipeline's format (:class:`dht.trainer.Predictions`).

    Every sample runs the same static architecture: ``layers`` = N_L, ``heads`` = kept heads per layer, and
    ``flops`` / ``flops_linear`` = :func:`pruned_flops` at the padded length ``seq_len`` (as ``dht.trainer.predict``
    counts), so :func:`dht.trainer.evaluate` computes the FLOP ratios against the teacher's full model.
    """
    device = torch.device(device)
    pruned = pruned.to(device).eval()
    n = len(data)
    labels = torch.zeros(n, dtype=torch.long)
    probs = torch.zeros(n, pruned.arch.num_labels)
    start = time.perf_counter()
    for lo in range(0, n, batch_size):
        index = torch.arange(lo, min(lo + batch_size, n))
        ids, mask, _ = data.batch(index, device)
        p = pruned(ids, mask).float().softmax(-1).cpu()
        probs[index] = p
        labels[index] = p.argmax(-1)
    seconds = time.perf_counter() - start
    n_layers = len(pruned.arch.layers)
    heads = torch.tensor(pruned.arch.heads_per_layer(), dtype=torch.long).expand(n, n_layers).clone()
    flops = torch.full((n,), float(pruned_flops(pruned.arch, seq_len, "full")), dtype=torch.float64)
    flops_linear = torch.full((n,), float(pruned_flops(pruned.arch, seq_len, "linear")), dtype=torch.float64)
    return Predictions(labels, probs, torch.full((n,), n_layers, dtype=torch.long), heads, flops, flops_linear,
                       seconds)
