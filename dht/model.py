"""The DHT encoder: a BERT-style classifier whose depth and heads are chosen per sample.

Meng et al. (2024), "Sample-based Dynamic Hierarchical Transformer" (DHT), runs every sample through its own
sub-network of a BERT-base backbone: ``L`` layers out of ``N_L`` (Section 4.2) and, in every layer, the heads
with ``xi_h = 1`` of the pruned multi-head attention

    f_l(x_l) = sum_h xi_h Att_h(x_l)                                       (Section 4.1, after Michel et al. 2019)

transformers 5 dropped ``head_mask`` and ``prune_heads``, so this module is a small, self-contained BERT encoder
(post-LN, parameter names identical to ``transformers.BertForSequenceClassification`` so that BERT checkpoints
load as they are; a pre-LN variant for training from scratch, ``layer_norm="pre"``) that takes a per-sample
*execution plan*:

* ``depth``: LongTensor[B], the number of layers each sample runs (the bandit's L);
* ``heads``: BoolTensor[B, N_L, N_H], the xi_h of every sample in every layer.

Two ways of executing the heads exist (see ``docs/model.md``):

* ``attention_path="sliced"`` (the default) really skips pruned heads: per layer, samples are grouped by head set,
  and each group runs attention with the Q/K/V rows and output-projection columns of its heads only. Samples
  leave the batch when their depth is reached.
* ``attention_path="masked"`` is the textbook formula above: every head is computed and its context multiplied
  by xi_h. It saves nothing and exists as a reference for the sliced path.
"""

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

__all__ = [
    "AttentionPath",
    "DHTAttention",
    "DHTConfig",
    "DHTForSequenceClassification",
    "DHTSequenceClassifierOutput",
    "head_mask_from_choices",
    "head_mask_from_groups",
]

AttentionPath = Literal["sliced", "masked"]
_ATTENTION_PATHS = ("sliced", "masked")
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_LAYER_NORMS = ("post", "pre")
_POOLINGS = ("cls", "mean")
_EXIT_HEADS = ("shared", "per_depth")

# Architecture fields that must come from the BERT checkpoint in ``from_bert`` (overriding them would change the
# shapes of the weights being loaded).
_ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@strict
class DHTConfig(PretrainedConfig):
    """Configuration of :class:`DHTForSequenceClassification`.

    The BERT fields keep the names and defaults of ``transformers.BertConfig`` (BERT-base). DHT adds:

    * ``fixed_layers`` -- the paper's ``b`` (Section 4.2, 6.1: b = 3): the first b layers always run with all heads
      because the bandits' state S1 is read after them.
    * ``group_size`` -- the paper's ``c`` (Section 4.2, 6.1: c = 3): adjacent dynamic layers that share one
      head decision. The encoder itself accepts any per-layer head plan; ``group_size`` is used by
      :meth:`dynamic_layer_groups` and :func:`head_mask_from_groups`.
    * ``layer_norm`` -- ``"post"`` (BERT: ``LayerNorm(x + f(x))`` after each sub-layer; what BERT checkpoints
      are) or ``"pre"`` (``x + f(LayerNorm(x))``, with a final LayerNorm before the pooler, as GPT-2 and most
      encoders trained from scratch; the same parameter names, plus ``bert.final_layer_norm``). A 12-layer
      post-LN encoder trained from scratch on a few thousand samples collapses to the majority class at the
      learning rates that train its 3-layer version (docs/embedded-data.md), so the default profile is pre-LN.
    * ``residual_init_scale`` -- multiplies the initial weights of the two projections that write into the
      residual stream (attention output, FFN down-projection): 1 is BERT's init, ``1/sqrt(2 N_L)`` GPT-2's, 0
      starts every layer as the identity (SkipInit, De & Smith 2020; with pre-LN the gradient still reaches
      those weights), which lets a 12-layer encoder train from scratch as early as a shallow one.
    * ``classifier_pooling`` -- what the classifier reads from each sample's last hidden states: ``"cls"`` (BERT:
      the pooler, dense + tanh, on the [CLS] token; the paper's setting) or ``"mean"`` (the mean over the non-padding
      tokens, then the classifier; no pooler). A checkpoint trained for sentence embeddings with mean pooling (the
      shipped all-MiniLM-L6-v2) has an untrained pooler and a [CLS] state that carries little at shallow depths:
      through ``"cls"`` a 2-layer exit sits on a loss plateau for ~100 steps (docs/training.md, "Why the DHT modes
      did not learn on MiniLM").
    * ``exit_heads`` -- which classifier reads a sample that stops after L layers: ``"shared"`` (one pooler and
      classifier for every depth; the paper does not say, and every earlier run read it so) or
      ``"per_depth"`` (one pooler + classifier per depth a path can stop at, :meth:`exit_depths`; the full depth
      keeps BERT's ``bert.pooler`` and ``classifier``, the shallower ones are ``exit_heads.<L>``). Per-depth heads
      start as copies of the full-depth head (docs/training.md, T29).
    * ``attn_implementation`` -- ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"eager"`` (explicit
      matmul + softmax; what ``torch.utils.flop_counter.FlopCounterMode`` counts on CPU). Read at every forward,
      so it can be switched on a live model.

    ``num_labels`` is handled by ``PretrainedConfig`` (pass ``num_labels=...``).

    Its defaults are this model class's, not the pipeline's: BERT-base's (``transformers.BertConfig``'s) and the
    paper's b = c = 3. A transformers configuration gives every field a default (``DHTConfig()`` must build, and
    transformers reads the class's defaults when it writes one), and a config.json saved before a field existed
    loads with that field's default (``exit_heads``), so they stay the class's own. The pipeline never reads them: it builds every model from
    params.yaml (:func:`model_from_params`, which sets every field of :data:`FROM_PARAMS` from the profile; a test
    builds one with every value unlike these defaults), and a saved model's config.json states every field.
    """

    model_type = "dht-bert"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    classifier_dropout: float | int | None = None
    fixed_layers: int = 3
    group_size: int = 3
    attn_implementation: str = "sdpa"
    layer_norm: str = "post"
    residual_init_scale: float | int = 1.0
    classifier_pooling: str = "cls"
    exit_heads: str = "shared"  # a model directory saved before this field loads as shared, what it was

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._check_fields()

    def _check_fields(self) -> None:
        # Named without the ``validate_`` prefix on purpose: @strict would wrap those errors in its own exception
        # type, and callers (and tests) expect a plain ValueError with a readable message.
        for name in (*_ARCHITECTURE_FIELDS, "group_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"DHTConfig.{name} must be a positive integer, got {value}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"DHTConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) so that every head has the same size"
            )
        if not 0 <= self.fixed_layers <= self.num_hidden_layers:
            raise ValueError(
                f"DHTConfig.fixed_layers (the paper's b) must be in [0, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.fixed_layers}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"DHTConfig.{name} must be in [0, 1), got {value}")
        if self.attn_implementation not in _ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"DHTConfig.attn_implementation must be one of {_ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"DHTConfig.hidden_act {self.hidden_act!r} is not a transformers activation name"
            )
        if self.layer_norm not in _LAYER_NORMS:
            raise ValueError(f"DHTConfig.layer_norm must be one of {_LAYER_NORMS}, got {self.layer_norm!r}")
        if not 0.0 <= self.residual_init_scale <= 1.0:
            raise ValueError(f"DHTConfig.residual_init_scale must be in [0, 1], got {self.residual_init_scale}")
        if self.layer_norm == "post" and self.residual_init_scale == 0:
            raise ValueError(
                "DHTConfig.residual_init_scale = 0 with layer_norm = 'post' would never train: the post-LN residual "
                "LayerNorm follows the zero branch, so no gradient reaches it; use layer_norm='pre' or a scale > 0"
            )
        if self.classifier_pooling not in _POOLINGS:
            raise ValueError(
                f"DHTConfig.classifier_pooling must be one of {_POOLINGS}, got {self.classifier_pooling!r}"
            )
        if self.exit_heads not in _EXIT_HEADS:
            raise ValueError(f"DHTConfig.exit_heads must be one of {_EXIT_HEADS}, got {self.exit_heads!r}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"DHTConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @property
    def head_size(self) -> int:
        """Size of one attention head, d / N_H."""
        return self.hidden_size // self.num_attention_heads

    def dynamic_layer_groups(self) -> list[range]:
        """The layer groups that share one head decision (Section 4.2: ``c`` adjacent layers after the first ``b``).

        With b = 3, c = 3 and 12 layers: ``[range(3, 6), range(6, 9), range(9, 12)]``. When ``N_L - b`` is not a
        multiple of ``c`` the last group is shorter (the paper picks b, c so that this does not happen, Section 6.1).
        """
        n, b, c = self.num_hidden_layers, self.fixed_layers, self.group_size
        return [range(start, min(start + c, n)) for start in range(b, n, c)]

    def exit_depths(self) -> list[int]:
        """The depths a sample's path can stop at, where an exit is read: after the b fixed layers and after each
        dynamic group (b, b + c, ..., N_L; Section 4.2). With ``exit_heads="per_depth"`` each has its own head."""
        return sorted({self.fixed_layers, *(group.stop for group in self.dynamic_layer_groups())})

    @classmethod
    def from_bert_config(cls, bert_config: PretrainedConfig, **overrides: Any) -> "DHTConfig":
        """Build a DHTConfig with the architecture of a ``transformers.BertConfig`` plus DHT fields in ``overrides``."""
        fields = (
            *_ARCHITECTURE_FIELDS,
            "hidden_act",
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "initializer_range",
            "layer_norm_eps",
            "pad_token_id",
            "classifier_dropout",
        )
        kwargs: dict[str, Any] = {
            name: getattr(bert_config, name) for name in fields if hasattr(bert_config, name)
        }
        if not isinstance(kwargs.get("hidden_act", "gelu"), str):
            raise ValueError("from_bert_config needs hidden_act to be an activation name, not a callable")
        kwargs["id2label"] = dict(bert_config.id2label) if bert_config.id2label is not None else None
        kwargs["label2id"] = dict(bert_config.label2id) if bert_config.label2id is not None else None
        kwargs.update(overrides)
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# Plan helpers
# --------------------------------------------------------------------------------------------------------------


def head_mask_from_choices(
    choices: Sequence[Sequence[Sequence[int] | None]],
    num_layers: int,
    num_heads: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Build the per-sample head plan xi (Section 4.1) from head index lists.

    Args:
        choices: ``choices[i][l]`` lists the heads kept by sample ``i`` in layer ``l`` (``None`` = all heads).
            Samples may list fewer than ``num_layers`` layers; the missing ones get all heads (they are usually
            past the sample's depth, where the plan is ignored anyway).
        num_layers: N_L. num_heads: N_H.

    Returns:
        BoolTensor[B, num_layers, num_heads].
    """
    mask = torch.ones(len(choices), num_layers, num_heads, dtype=torch.bool, device=device)
    for i, per_layer in enumerate(choices):
        if len(per_layer) > num_layers:
            raise ValueError(f"sample {i} lists {len(per_layer)} layers, the model has {num_layers}")
        for layer, kept in enumerate(per_layer):
            if kept is None:
                continue
            kept = list(kept)
            if any(not 0 <= h < num_heads for h in kept):
                raise ValueError(
                    f"sample {i}, layer {layer}: head indices {kept} out of range [0, {num_heads})"
                )
            mask[i, layer] = False
            if kept:
                mask[i, layer, kept] = True
    return mask


def head_mask_from_groups(
    group_choices: Sequence[Sequence[Sequence[int] | None]],
    config: DHTConfig,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Expand one head choice per dynamic layer group into the per-layer plan (Section 4.2).

    ``group_choices[i][g]`` lists the heads sample ``i`` keeps in dynamic group ``g`` (see
    :meth:`DHTConfig.dynamic_layer_groups`); every layer of the group uses the same heads ("the heads to be pruned
    are in the same relative positions"). The first ``b = config.fixed_layers`` layers get all heads.
    """
    groups = config.dynamic_layer_groups()
    per_layer: list[list[Sequence[int] | None]] = []
    for i, sample in enumerate(group_choices):
        if len(sample) > len(groups):
            raise ValueError(
                f"sample {i} lists {len(sample)} groups, the config has {len(groups)} dynamic groups"
            )
        row: list[Sequence[int] | None] = [None] * config.num_hidden_layers
        for group, kept in zip(groups, sample, strict=False):
            for layer in group:
                row[layer] = kept
        per_layer.append(row)
    return head_mask_from_choices(per_layer, config.num_hidden_layers, config.num_attention_heads, device)


# --------------------------------------------------------------------------------------------------------------
# Modules (names mirror transformers/models/bert/modeling_bert.py)
# --------------------------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` produces: the autocast dtype when autocast is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _cat_promoted(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat after casting to a common dtype (under autocast, pieces can be bf16 or fp32)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.cat([t.to(dtype) for t in tensors])


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_keep: torch.Tensor | None,
    implementation: str,
    dropout_p: float,
    scale: float,
) -> torch.Tensor:
    """Scaled dot-product attention on [B, h, n, d_head] tensors, BERT's additive padding mask.

    ``key_keep`` is BoolTensor[B, n] (True = real token) or None when nothing is padded; the additive mask is built
    here, in the dtype of ``q``, because under autocast that is only known now.
    """
    mask = None
    if key_keep is not None:
        mask = torch.zeros(key_keep.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~key_keep, torch.finfo(q.dtype).min)[:, None, None, :]
    if implementation == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    # Eager: what modeling_bert.eager_attention_forward does; FlopCounterMode sees two bmm's.
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


class DHTEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout (BertEmbeddings)."""

    def __init__(self, config: DHTConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings={self.position_embeddings.num_embeddings}"
            )
        # Created on the input's device (no registered buffer, so nothing extra in the state dict).
        position_ids = torch.arange(seq_len, device=input_ids.device)[None, :]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(position_ids)
        )
        return self.dropout(self.LayerNorm(embeddings))


class DHTSelfAttention(nn.Module):
    """Holds the Q/K/V projections (BertSelfAttention); the computation lives in :class:`DHTAttention`."""

    def __init__(self, config: DHTConfig) -> None:
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)


class DHTSelfOutput(nn.Module):
    """Output projection, dropout, residual LayerNorm (BertSelfOutput).

    Unlike BertSelfOutput, ``forward`` receives the *already projected* attention output: the projection
    ``dense`` is applied by :class:`DHTAttention`, which slices its columns when heads are pruned.
    """

    def __init__(self, config: DHTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, projected: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(projected) + input_tensor)


class DHTAttention(nn.Module):
    """Multi-head self-attention with per-sample head pruning (Section 4.1) + the residual: BERT's post-LN
    ``LayerNorm(x + f(x))`` or pre-LN ``x + f(LayerNorm(x))`` (``config.layer_norm``; ``output.LayerNorm`` either
    way, so the parameter names do not change)."""

    # Batch different head sets of equal size with per-sample gathered weights (see _sliced). A class attribute,
    # not a config field: it changes speed, never results; the benchmark flips it to compare.
    gather_per_sample: bool = True

    def __init__(self, config: DHTConfig) -> None:
        super().__init__()
        self.self = DHTSelfAttention(config)
        self.output = DHTSelfOutput(config)
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.scale = 1.0 / math.sqrt(self.head_size)
        self.pre_ln = config.layer_norm == "pre"

    def forward(
        self,
        hidden: torch.Tensor,
        key_keep: torch.Tensor | None,
        head_rows: torch.Tensor | None,
        attention_path: AttentionPath,
        implementation: str,
    ) -> torch.Tensor:
        """``hidden``: [A, n, d] of the active samples; ``head_rows``: BoolTensor[A, N_H] (None = all heads)."""
        x = self.output.LayerNorm(hidden) if self.pre_ln else hidden
        if head_rows is None:
            projected = self._project(x, key_keep, None, implementation)
        elif attention_path == "masked":
            projected = self._project(x, key_keep, None, implementation, head_gate=head_rows)
        else:
            projected = self._sliced(x, key_keep, head_rows, implementation)
        if self.pre_ln:
            return hidden + self.output.dropout(projected)
        return self.output(projected, hidden)

    def _project(
        self,
        hidden: torch.Tensor,
        key_keep: torch.Tensor | None,
        head_idx: torch.Tensor | None,
        implementation: str,
        head_gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the heads in ``head_idx`` (None = all), projected by the matching columns of W_O.

        ``head_gate`` (BoolTensor[A, N_H], only with all heads) multiplies each head's context by xi_h: the
        masked formula of Section 4.1.
        """
        sa, dense = self.self, self.output.dense
        w_q, w_k, w_v, w_o = sa.query.weight, sa.key.weight, sa.value.weight, dense.weight
        b_q, b_k, b_v = sa.query.bias, sa.key.bias, sa.value.bias
        n_heads = self.num_heads
        if head_idx is not None:
            # Rows of W_Q/W_K/W_V and columns of W_O that belong to the kept heads: head h owns the slice
            # [h * d_head, (h + 1) * d_head) of the all-heads dimension (same layout as BERT's view/transpose).
            cols = (
                head_idx[:, None] * self.head_size + torch.arange(self.head_size, device=head_idx.device)
            ).reshape(-1)
            w_q, w_k, w_v = w_q.index_select(0, cols), w_k.index_select(0, cols), w_v.index_select(0, cols)
            b_q, b_k, b_v = b_q.index_select(0, cols), b_k.index_select(0, cols), b_v.index_select(0, cols)
            w_o = w_o.index_select(1, cols)
            n_heads = int(head_idx.numel())
        batch, seq_len, _ = hidden.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, seq_len, n_heads, self.head_size).transpose(1, 2)

        q = split(F.linear(hidden, w_q, b_q))
        k = split(F.linear(hidden, w_k, b_k))
        v = split(F.linear(hidden, w_v, b_v))
        dropout_p = sa.dropout.p if self.training else 0.0
        context = _attend(q, k, v, key_keep, implementation, dropout_p, self.scale)  # [A, h, n, d_head]
        if head_gate is not None:
            context = context * head_gate[:, :, None, None].to(context.dtype)
        context = context.transpose(1, 2).reshape(batch, seq_len, n_heads * self.head_size)
        return F.linear(context, w_o, dense.bias)

    def _subset(
        self, hidden: torch.Tensor, key_keep: torch.Tensor | None, row: torch.Tensor, implementation: str
    ) -> torch.Tensor:
        """Projected attention output of one head set ``row`` (BoolTensor[N_H]) for all rows of ``hidden``."""
        head_idx = torch.nonzero(row).squeeze(1)
        if head_idx.numel() == self.num_heads:
            return self._project(hidden, key_keep, None, implementation)  # no slicing needed
        if head_idx.numel() == 0:
            # No head on: sum_h xi_h Att_h = 0, so the projection contributes only its bias b_O (the value the
            # masked formula gives too). Nothing is computed; the residual (and post-LN's LayerNorm) still runs.
            # .contiguous() materialises the broadcast: an expand() view of a parameter made under no_grad still
            # claims requires_grad, which trips autograd-based hooks (e.g. FlopCounterMode's module tracker).
            bias = self.output.dense.bias.to(_compute_dtype(hidden))
            return bias.expand(hidden.shape).contiguous()
        return self._project(hidden, key_keep, head_idx, implementation)

    def _sliced(
        self,
        hidden: torch.Tensor,
        key_keep: torch.Tensor | None,
        head_rows: torch.Tensor,
        implementation: str,
    ) -> torch.Tensor:
        """Run the active samples with only their kept heads, then write the results back in sample order.

        Samples are grouped by head set (torch.unique over the rows). A head set used by its group alone runs as
        one F.linear with the kept rows/columns of the weights (:meth:`_subset`). Several *different* sets with
        the same number of heads (per-sample TSB choices) are run together: each sample gets its own gathered
        weight slices and the projections become batched matmuls (:meth:`_gathered`), because many small
        F.linear calls on groups of one or two samples cost more than the heads they skip (benchmark in
        docs/model.md). ``gather_per_sample = False`` switches back to one group per set.
        """
        unique_rows, set_of = torch.unique(head_rows, dim=0, return_inverse=True)
        if unique_rows.shape[0] == 1:
            return self._subset(hidden, key_keep, unique_rows[0], implementation)
        buckets: dict[int, list[int]] = {}  # number of kept heads -> indices of the distinct sets
        for set_idx, count in enumerate(unique_rows.sum(-1).tolist()):
            key = count if self.gather_per_sample else -1 - set_idx  # -1 - i: one bucket per set
            buckets.setdefault(key, []).append(set_idx)
        pieces, members = [], []
        for count, sets in buckets.items():
            if len(sets) == 1:
                idx = torch.nonzero(set_of == sets[0]).squeeze(1)
            else:
                idx = torch.nonzero(torch.isin(set_of, torch.tensor(sets, device=set_of.device))).squeeze(1)
            x = hidden.index_select(0, idx)
            keep = None if key_keep is None else key_keep.index_select(0, idx)
            if len(sets) == 1:
                pieces.append(self._subset(x, keep, unique_rows[sets[0]], implementation))
            else:
                pieces.append(self._gathered(x, keep, head_rows.index_select(0, idx), count, implementation))
            members.append(idx)
        # Write the groups back in the original sample order (out of place, so autograd sees it).
        return _cat_promoted(pieces).index_select(0, torch.argsort(torch.cat(members)))

    def _gathered(
        self,
        hidden: torch.Tensor,
        key_keep: torch.Tensor | None,
        rows: torch.Tensor,
        count: int,
        implementation: str,
    ) -> torch.Tensor:
        """Attention for samples that keep ``count`` heads each, but not the same ones, in one batched pass.

        Sample g gets the rows of W_Q/W_K/W_V and the columns of W_O of its own heads (a [G, count * d_head, d]
        gather, ~1/(2n) of the matmul work), then every projection is one batched matmul (baddbmm).
        """
        sa, dense = self.self, self.output.dense
        batch, seq_len, d = hidden.shape
        n_heads, head = self.num_heads, self.head_size
        width = count * head
        head_idx = torch.nonzero(rows)[:, 1].view(batch, count)  # kept heads of each sample, ascending

        def project_in(linear: nn.Linear) -> torch.Tensor:
            weight = linear.weight.view(n_heads, head, d)[head_idx].reshape(batch, width, d)
            bias = linear.bias.view(n_heads, head)[head_idx].reshape(batch, 1, width)
            out = torch.baddbmm(bias, hidden, weight.transpose(1, 2))  # [G, n, width]
            return out.view(batch, seq_len, count, head).transpose(1, 2)

        q, k, v = project_in(sa.query), project_in(sa.key), project_in(sa.value)
        dropout_p = sa.dropout.p if self.training else 0.0
        context = _attend(q, k, v, key_keep, implementation, dropout_p, self.scale)
        context = context.transpose(1, 2).reshape(batch, seq_len, width)
        w_o = dense.weight.view(d, n_heads, head)[:, head_idx]  # [d, G, count, d_head]
        w_o = w_o.permute(1, 2, 3, 0).reshape(batch, width, d)
        return torch.baddbmm(dense.bias, context, w_o)


class DHTIntermediate(nn.Module):
    """FFN up-projection + activation (BertIntermediate)."""

    def __init__(self, config: DHTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden))


class DHTOutput(nn.Module):
    """FFN down-projection, dropout, residual LayerNorm (BertOutput)."""

    def __init__(self, config: DHTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + input_tensor)


class DHTLayer(nn.Module):
    """One transformer layer (BertLayer; post- or pre-LN). The FFN runs batched over all samples given to it."""

    def __init__(self, config: DHTConfig) -> None:
        super().__init__()
        self.attention = DHTAttention(config)
        self.intermediate = DHTIntermediate(config)
        self.output = DHTOutput(config)
        self.pre_ln = config.layer_norm == "pre"

    def forward(
        self,
        hidden: torch.Tensor,
        key_keep: torch.Tensor | None,
        head_rows: torch.Tensor | None,
        attention_path: AttentionPath,
        implementation: str,
    ) -> torch.Tensor:
        attention_output = self.attention(hidden, key_keep, head_rows, attention_path, implementation)
        if self.pre_ln:
            ffn = self.output.dense(self.intermediate(self.output.LayerNorm(attention_output)))
            return attention_output + self.output.dropout(ffn)
        return self.output(self.intermediate(attention_output), attention_output)


class DHTEncoder(nn.Module):
    """The layer stack and the per-sample execution plan."""

    def __init__(self, config: DHTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([DHTLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden: torch.Tensor,
        key_keep: torch.Tensor | None,
        depth: torch.Tensor | None,
        heads: torch.Tensor | None,
        attention_path: AttentionPath,
        implementation: str,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Returns (each sample's state after its own depth [B, n, d], hidden-states tuple or None)."""
        if attention_path == "masked":
            return self._forward_masked(hidden, key_keep, depth, heads, implementation, output_hidden_states)
        return self._forward_sliced(hidden, key_keep, depth, heads, implementation, output_hidden_states)

    def _forward_sliced(
        self,
        hidden: torch.Tensor,
        key_keep: torch.Tensor | None,
        depth: torch.Tensor | None,
        heads: torch.Tensor | None,
        implementation: str,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        num_layers = len(self.layer)
        batch = hidden.shape[0]
        # Depths are needed on the host to know when the batch shrinks: one sync per forward.
        depths = [num_layers] * batch if depth is None else depth.tolist()
        states: list[torch.Tensor] | None = [hidden] if output_hidden_states else None
        rows = torch.arange(batch, device=hidden.device)  # original index of every still-active sample
        finished_h: list[torch.Tensor] = []
        finished_rows: list[torch.Tensor] = []
        h, keep, plan = hidden, key_keep, heads
        for layer_idx in range(max(depths, default=0)):
            if min(depths) <= layer_idx:
                # Samples whose depth is reached leave the batch; their current state is their final state.
                stay_list = [d > layer_idx for d in depths]
                stay = torch.tensor(stay_list, device=hidden.device)
                finished_h.append(h[~stay])
                finished_rows.append(rows[~stay])
                h, rows = h[stay], rows[stay]
                keep = None if keep is None else keep[stay]
                plan = None if plan is None else plan[stay]
                depths = [d for d, s in zip(depths, stay_list, strict=True) if s]
            layer_heads = None if plan is None else plan[:, layer_idx]
            h = self.layer[layer_idx](h, keep, layer_heads, "sliced", implementation)
            if states is not None:
                previous = states[-1]
                dtype = torch.promote_types(previous.dtype, h.dtype)
                states.append(previous.to(dtype).index_copy(0, rows, h.to(dtype)))
        finished_h.append(h)
        finished_rows.append(rows)
        if len(finished_h) == 1:
            last = h
        else:
            last = _cat_promoted(finished_h).index_select(0, torch.argsort(torch.cat(finished_rows)))
        return last, self._pad_states(states, num_layers)

    def _forward_masked(
        self,
        hidden: torch.Tensor,
        key_keep: torch.Tensor | None,
        depth: torch.Tensor | None,
        heads: torch.Tensor | None,
        implementation: str,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        # Reference path: every sample runs max(depth) layers with every head (contexts gated by xi), then each
        # sample's state is read at its own depth. Only the xi gating and this selection differ from BERT.
        num_layers = len(self.layer)
        max_depth = num_layers if depth is None else max(depth.tolist(), default=0)
        outputs = [hidden]
        for layer_idx in range(max_depth):
            layer_heads = None if heads is None else heads[:, layer_idx]
            outputs.append(
                self.layer[layer_idx](outputs[-1], key_keep, layer_heads, "masked", implementation)
            )
        dtype = outputs[0].dtype
        for t in outputs[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        stacked = torch.stack([t.to(dtype) for t in outputs])  # [max_depth + 1, B, n, d]
        batch_idx = torch.arange(hidden.shape[0], device=hidden.device)
        last = stacked[-1] if depth is None else stacked[depth, batch_idx]
        states = None
        if output_hidden_states:
            states = []
            for layer_idx in range(num_layers + 1):
                at = torch.full_like(batch_idx, min(layer_idx, max_depth))
                if depth is not None:
                    at = torch.minimum(at, depth)
                states.append(stacked[at, batch_idx])
        return last, None if states is None else tuple(states)

    @staticmethod
    def _pad_states(states: list[torch.Tensor] | None, num_layers: int) -> tuple[torch.Tensor, ...] | None:
        # Always N_L + 1 entries; when every sample stopped early, later entries repeat the last state.
        if states is None:
            return None
        while len(states) < num_layers + 1:
            states.append(states[-1])
        return tuple(states)


class DHTPooler(nn.Module):
    """dense + tanh on the [CLS] token (BertPooler)."""

    def __init__(self, config: DHTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden[:, 0]))


class DHTExitHead(nn.Module):
    """The head that reads a sample stopped at one depth (``exit_heads="per_depth"``): the full-depth head's pooler
    (with ``classifier_pooling="cls"``; mean pooling has none) and classifier, copied at construction."""

    def __init__(self, pooler: DHTPooler | None, classifier: nn.Linear) -> None:
        super().__init__()
        self.pooler = pooler
        self.classifier = classifier


class DHTBertModel(nn.Module):
    """Embeddings + encoder + pooler, under the ``bert.`` prefix like BertForSequenceClassification; pre-LN adds
    ``final_layer_norm`` on each sample's last state (post-LN states are already normalised)."""

    def __init__(self, config: DHTConfig) -> None:
        super().__init__()
        self.embeddings = DHTEmbeddings(config)
        self.encoder = DHTEncoder(config)
        if config.layer_norm == "pre":
            self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = DHTPooler(config)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """A sample's last hidden states as the pooler and any exit classifier read them."""
        norm = getattr(self, "final_layer_norm", None)
        return hidden if norm is None else norm(hidden)


# --------------------------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DHTSequenceClassifierOutput(ModelOutput):
    """Output of :meth:`DHTForSequenceClassification.forward`.

    Attributes:
        loss: mean cross-entropy over the batch (when ``labels`` is given).
        logits: [B, num_labels].
        per_sample_loss: cross-entropy per sample, ``reduction='none'`` ([B]); feeds the bandit rewards
            delta = loss_i * L_i (Section 4.3). Not detached: detach it for the bandits.
        last_hidden_state: [B, n, d], every sample's state after its own depth (and pre-LN's final LayerNorm).
        hidden_states: with ``output_hidden_states``: N_L + 1 tensors [B, n, d], the embeddings output then the
            output of each layer; a sample that stopped at depth L_i holds its last state in entries > L_i.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    per_sample_loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class DHTPreTrainedModel(PreTrainedModel):
    """Hooks the DHT modules into transformers' save/load machinery."""

    config_class = DHTConfig
    base_model_prefix = "bert"
    _no_split_modules = ["DHTEmbeddings", "DHTLayer"]
    # Lets ``from_pretrained(..., attn_implementation="sdpa" | "eager")`` through transformers' own check. The
    # encoder does not use transformers' attention registry: it reads ``config.attn_implementation`` (a DHTConfig
    # field, which from_pretrained also sets) at every forward.
    _supports_sdpa = True


class DHTForSequenceClassification(DHTPreTrainedModel):
    """BERT sequence classifier that executes a per-sample plan of depth and heads (Sections 4.1-4.2).

    With ``depth=None, heads=None`` it is BERT: same parameters, same names, same logits as
    ``transformers.BertForSequenceClassification``.
    """

    def __init__(self, config: DHTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = DHTBertModel(config)
        classifier_dropout = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        )
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()
        if config.residual_init_scale != 1.0:
            # After post_init (transformers' normal init); from_pretrained then loads over it as usual.
            with torch.no_grad():
                for layer in self.bert.encoder.layer:
                    layer.attention.output.dense.weight.mul_(config.residual_init_scale)
                    layer.output.dense.weight.mul_(config.residual_init_scale)
        if config.exit_heads == "per_depth":
            # After the init and without drawing from the RNG: the heads start as the full-depth head's copies, so a
            # per_depth model starts as the shared one (same logits at every depth, same random stream after).
            self.exit_heads = self._copies_of_the_full_head()

    # ---- exit heads (config.exit_heads) -----------------------------------------------------------------------

    def _copies_of_the_full_head(self) -> nn.ModuleDict:
        pooler = self.bert.pooler if self.config.classifier_pooling == "cls" else None
        return nn.ModuleDict({
            str(depth): DHTExitHead(copy.deepcopy(pooler), copy.deepcopy(self.classifier))
            for depth in self.config.exit_depths() if depth != self.config.num_hidden_layers})

    def set_exit_heads(self, exit_heads: str) -> None:
        """Switch between one head for every depth (``"shared"``) and one per exit depth (``"per_depth"``; the
        shallower heads become copies of the full-depth head, ``bert.pooler`` + ``classifier``, whatever they held:
        a model trained at full depth alone, such as the fine-tuned reference, gives every exit its trained head).
        ``"shared"`` drops the shallower heads."""
        if exit_heads not in _EXIT_HEADS:
            raise ValueError(f"exit_heads must be one of {_EXIT_HEADS}, got {exit_heads!r}")
        if hasattr(self, "exit_heads"):
            del self.exit_heads
        self.config.exit_heads = exit_heads
        if exit_heads == "per_depth":
            device = self.classifier.weight.device
            self.exit_heads = self._copies_of_the_full_head().to(device)

    def exit_head(self, depth: int | None = None) -> tuple[nn.Module, nn.Linear]:
        """(pooler, classifier) that read a sample stopped after ``depth`` layers (None: the full depth). Shared
        heads: BERT's for every depth. The pooler is unused with ``classifier_pooling="mean"``."""
        n = self.config.num_hidden_layers
        if self.config.exit_heads == "shared" or depth is None or depth == n:
            return self.bert.pooler, self.classifier
        if str(depth) not in self.exit_heads:
            raise ValueError(f"exit_heads = 'per_depth': no head reads depth {depth}; the exit depths are "
                             f"{self.config.exit_depths()} (b, b + c, ..., N_L)")
        head = self.exit_heads[str(depth)]
        return head.pooler, head.classifier

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.bert.embeddings.word_embeddings = value

    # ---- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def from_bert(
        cls,
        name_or_path: str,
        num_labels: int | None = None,
        load_kwargs: dict[str, Any] | None = None,
        **config_overrides: Any,
    ) -> "DHTForSequenceClassification":
        """Load BERT weights (hub name or local directory) into a DHT classifier.

        The checkpoint is read with ``transformers.BertForSequenceClassification.from_pretrained`` (so bare
        ``bert-base-uncased``-style checkpoints work; their classifier is freshly initialised, as transformers warns)
        and its state dict is copied with ``strict=True``, which checks that every parameter name matches.

        Args:
            name_or_path: hub model id or directory saved by ``save_pretrained``.
            num_labels: number of classes (defaults to the checkpoint's).
            load_kwargs: extra keyword arguments for ``BertForSequenceClassification.from_pretrained`` (e.g.
                ``local_files_only=True``, ``ignore_mismatched_sizes=True``, ``revision=...``).
            **config_overrides: DHT or dropout fields (``fixed_layers``, ``group_size``, ``attn_implementation``,
                ``hidden_dropout_prob``, ``exit_heads``, ...). Architecture fields cannot be overridden. With
                ``exit_heads="per_depth"`` every exit head starts as a copy of the checkpoint's one.
        """
        from transformers import BertForSequenceClassification

        bad = sorted(set(config_overrides) & set(_ARCHITECTURE_FIELDS))
        if bad:
            raise ValueError(f"from_bert takes the architecture from the checkpoint; cannot override {bad}")
        if config_overrides.get("layer_norm", "post") != "post":
            raise ValueError(f"{name_or_path} is a BERT checkpoint, trained post-LN: it cannot run as layer_norm="
                             f"{config_overrides['layer_norm']!r} (pre-LN is for models trained from scratch)")
        kwargs = dict(load_kwargs or {})
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        bert = BertForSequenceClassification.from_pretrained(name_or_path, **kwargs)
        if getattr(bert.config, "is_decoder", False):
            raise ValueError(f"{name_or_path} is a decoder BERT; DHT needs the bidirectional encoder")
        # A BERT checkpoint has one head: load it strictly into a shared model, then give each exit a copy of it.
        exit_heads = config_overrides.pop("exit_heads", "shared")
        config = DHTConfig.from_bert_config(bert.config, **config_overrides)
        model = cls(config)
        model.load_state_dict(bert.state_dict(), strict=True)
        if exit_heads != "shared":
            model.set_exit_heads(exit_heads)
        return model

    # ---- forward ---------------------------------------------------------------------------------------------

    def _check_plan(
        self, batch: int, depth: torch.Tensor | None, heads: torch.Tensor | None, attention_path: str
    ) -> None:
        config = self.config
        if attention_path not in _ATTENTION_PATHS:
            raise ValueError(f"attention_path must be one of {_ATTENTION_PATHS}, got {attention_path!r}")
        if config.attn_implementation not in _ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"config.attn_implementation must be one of {_ATTN_IMPLEMENTATIONS}, got {config.attn_implementation!r}"
            )
        if depth is not None:
            if depth.shape != (batch,) or depth.dtype == torch.bool or depth.is_floating_point():
                raise ValueError(
                    f"depth must be an integer tensor of shape ({batch},), got {depth.dtype} {tuple(depth.shape)}"
                )
            if batch and (int(depth.min()) < 0 or int(depth.max()) > config.num_hidden_layers):
                raise ValueError(
                    f"depth values must be in [0, {config.num_hidden_layers}], got {depth.tolist()}"
                )
            if config.exit_heads == "per_depth":
                unread = sorted(set(depth.tolist()) - set(config.exit_depths()))
                if unread:
                    raise ValueError(f"exit_heads = 'per_depth': no head reads depth {unread}; the exit depths "
                                     f"are {config.exit_depths()} (b, b + c, ..., N_L)")
        if heads is not None:
            expected = (batch, config.num_hidden_layers, config.num_attention_heads)
            if tuple(heads.shape) != expected:
                raise ValueError(
                    f"heads must have shape {expected} (batch, layers, heads), got {tuple(heads.shape)}"
                )
            if heads.dtype != torch.bool:
                raise TypeError(f"heads must be a BoolTensor (xi_h in {{0, 1}}), got {heads.dtype}")

    def _embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.bert.embeddings(input_ids, token_type_ids)
        key_keep = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            key_keep = attention_mask.to(device=input_ids.device) != 0
            if bool(key_keep.all()):
                key_keep = None  # no padding: lets SDPA use its unmasked kernels
        return hidden, key_keep

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        depth: torch.Tensor | None = None,
        heads: torch.Tensor | None = None,
        attention_path: AttentionPath = "sliced",
        output_hidden_states: bool = False,
    ) -> DHTSequenceClassifierOutput:
        """Classify a batch, each sample running its own depth and heads.

        Args:
            input_ids, attention_mask, token_type_ids: as for BERT ([B, n]; mask 1 = token, 0 = padding).
            labels: LongTensor[B] of class indices; enables ``loss`` and ``per_sample_loss``.
            depth: LongTensor[B], layers each sample runs (the paper's L, Section 4.2); None = all layers.
            heads: BoolTensor[B, N_L, N_H], xi_h per sample and layer (Section 4.1); None = all heads. Rows for
                layers >= depth[i] are ignored.
            attention_path: ``"sliced"`` computes only the kept heads and only the active samples; ``"masked"``
                computes every head of every sample up to max(depth) and multiplies contexts by xi (reference).
            output_hidden_states: also return the N_L + 1 hidden states (see DHTSequenceClassifierOutput).
        """
        self._check_plan(input_ids.shape[0], depth, heads, attention_path)
        hidden, key_keep = self._embed(input_ids, attention_mask, token_type_ids)
        last, states = self.bert.encoder(
            hidden,
            key_keep,
            None if depth is None else depth.to(input_ids.device),
            None if heads is None else heads.to(input_ids.device),
            attention_path,
            self.config.attn_implementation,
            output_hidden_states,
        )
        # The classifier reads each sample's [CLS] at its own depth (``last`` is already per-sample).
        last = self.bert.final_norm(last)
        if self.config.exit_heads == "shared" or depth is None:
            logits = self.classifier(self.dropout(self.pool(last, key_keep)))
        else:  # per_depth: each sample's own depth's head, the samples grouped by depth
            pieces, rows = [], []
            for d in sorted(set(depth.tolist())):
                sel = (depth.to(last.device) == d).nonzero().squeeze(1)
                pieces.append(self._read(last[sel], None if key_keep is None else key_keep[sel], d))
                rows.append(sel)
            logits = _cat_promoted(pieces).index_select(0, torch.argsort(torch.cat(rows)))
        loss = per_sample_loss = None
        if labels is not None:
            if self.num_labels < 2:
                raise ValueError(
                    "DHTForSequenceClassification computes cross-entropy; it needs num_labels >= 2"
                )
            per_sample_loss = F.cross_entropy(logits, labels.to(logits.device).view(-1), reduction="none")
            loss = per_sample_loss.mean()
        return DHTSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            per_sample_loss=per_sample_loss,
            last_hidden_state=last,
            hidden_states=states,
        )

    # ---- stepwise execution (the trainer decides each group's heads from the state reached so far) ---------

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings output and the key mask (None when nothing is padded) for :meth:`run_layers`."""
        return self._embed(input_ids, attention_mask, token_type_ids)

    def run_layers(
        self,
        hidden: torch.Tensor,
        key_keep: torch.Tensor | None,
        start: int,
        stop: int,
        heads: torch.Tensor | None = None,
        attention_path: AttentionPath = "sliced",
    ) -> torch.Tensor:
        """Run layers ``start..stop-1`` on every sample of the batch (Algorithm 2, line 14: "proceed c layers
        with H_l heads"). ``heads``: BoolTensor[B, stop - start, N_H] or None (all heads)."""
        if not 0 <= start <= stop <= self.config.num_hidden_layers:
            raise ValueError(f"layers {start}..{stop} outside 0..{self.config.num_hidden_layers}")
        if heads is not None and tuple(heads.shape) != (hidden.shape[0], stop - start, self.config.num_attention_heads):
            raise ValueError(f"heads must be [B, {stop - start}, {self.config.num_attention_heads}], got {tuple(heads.shape)}")
        for offset, layer in enumerate(self.bert.encoder.layer[start:stop]):
            layer_heads = None if heads is None else heads[:, offset]
            hidden = layer(hidden, key_keep, layer_heads, attention_path, self.config.attn_implementation)
        return hidden

    def pool(self, last: torch.Tensor, key_keep: torch.Tensor | None = None, depth: int | None = None) -> torch.Tensor:
        """The sentence vector the classifier reads (``config.classifier_pooling``): the pooler (of ``depth``'s
        exit head, :meth:`exit_head`) on [CLS], or the mean of the non-padding token states (``key_keep``:
        BoolTensor[B, n], None when nothing is padded)."""
        if self.config.classifier_pooling == "cls":
            return self.exit_head(depth)[0](last)
        if key_keep is None:
            return last.mean(dim=1)
        weights = key_keep.to(last.dtype).unsqueeze(-1)
        return (last * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def classify(self, last_hidden: torch.Tensor, key_keep: torch.Tensor | None = None,
                 depth: int | None = None) -> torch.Tensor:
        """Logits from the hidden states of samples stopped after ``depth`` layers (None: the full depth): pre-LN's
        final LayerNorm, :meth:`pool`, dropout and the classifier of that depth's exit head (:meth:`exit_head`; the
        one shared head with ``exit_heads="shared"``). ``key_keep`` is the key mask of :meth:`embed`; mean pooling
        needs it when samples are padded."""
        return self._read(self.bert.final_norm(last_hidden), key_keep, depth)

    def _read(self, normed: torch.Tensor, key_keep: torch.Tensor | None, depth: int | None) -> torch.Tensor:
        return self.exit_head(depth)[1](self.dropout(self.pool(normed, key_keep, depth)))

    def encode_prefix(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_layers: int | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, n, d] after the first ``num_layers`` full layers (default: ``config.fixed_layers``).

        This is the bandits' state S1 (Section 4.2.1, step 1): the first b layers with all heads, computed with the
        current weights. The caller wraps it in ``torch.no_grad()`` (S1 is not trained; the sample re-passes the
        b layers with gradient to reach S2,0).
        """
        num_layers = self.config.fixed_layers if num_layers is None else num_layers
        if not 0 <= num_layers <= self.config.num_hidden_layers:
            raise ValueError(f"num_layers must be in [0, {self.config.num_hidden_layers}], got {num_layers}")
        hidden, key_keep = self._embed(input_ids, attention_mask, token_type_ids)
        for layer in self.bert.encoder.layer[:num_layers]:
            hidden = layer(hidden, key_keep, None, "sliced", self.config.attn_implementation)
        return hidden


# --------------------------------------------------------------------------------------------------------------
# From the pipeline's params
# --------------------------------------------------------------------------------------------------------------


# The DHTConfig fields params.yaml sets, and the key that sets each: the pipeline's models take these from the profile,
# never from DHTConfig's own defaults. A checkpoint (model.init) brings its own sizes (CHECKPOINT_FIELDS), which the
# configuration checks against model: (dht.config_checks).
FROM_PARAMS = {
    "hidden_size": "model.hidden_size",
    "num_hidden_layers": "model.num_hidden_layers",
    "num_attention_heads": "model.num_attention_heads",
    "intermediate_size": "model.intermediate_size",
    "hidden_dropout_prob": "model.hidden_dropout_prob",
    "attention_probs_dropout_prob": "model.attention_probs_dropout_prob",
    "max_position_embeddings": "model.max_position_embeddings",
    "layer_norm": "model.layer_norm",
    "residual_init_scale": "model.residual_init_scale",
    "classifier_pooling": "model.classifier_pooling",
    "exit_heads": "model.exit_heads",
    "fixed_layers": "dht.fixed_layers",
    "group_size": "dht.group_size",
}
CHECKPOINT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "layer_norm", "residual_init_scale")


def model_from_params(cfg: Any, num_labels: int, vocab_size: int) -> DHTForSequenceClassification:
    """The initial model a profile describes (`dht.config.Config`): from scratch (seeded by the caller) when
    ``model.init`` is ``scratch``, else BERT weights from a hub name or local directory (``bert-base-uncased``
    in the paper profile) or ``package:NAME`` (a pip package's checkpoint directory, checksum verified:
    dht/pretrained.py), whose architecture then wins over ``model:``'s sizes. The classifier is new (seeded by
    the caller too); a checkpoint's pooler is loaded when it has one. With ``model.exit_heads: per_depth`` every
    exit's head starts as a copy of that one head."""
    from dht.pretrained import is_package_ref, resolve

    m = cfg.model
    fields = {name: attrgetter(key)(cfg) for name, key in FROM_PARAMS.items()}
    if m.init == "scratch":
        return DHTForSequenceClassification(DHTConfig(vocab_size=vocab_size, num_labels=num_labels, **fields))
    model = DHTForSequenceClassification.from_bert(
        resolve(m.init), num_labels=num_labels,
        # A package is a local directory: never ask the hub, even for a file the directory lacks.
        load_kwargs={"local_files_only": True} if is_package_ref(m.init) else None,
        **{name: value for name, value in fields.items() if name not in CHECKPOINT_FIELDS},
    )
    if model.config.vocab_size < vocab_size:
        raise ValueError(
            f"model.init = {m.init!r} has a vocabulary of {model.config.vocab_size} tokens but the tokenizer has "
            f"{vocab_size}: use that checkpoint's tokenizer (tokenizer.kind: pretrained, name_or_path: {m.init})"
        )
    return model
