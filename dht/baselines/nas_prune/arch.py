"""What a pruned BERT keeps: the kept embedding dimensions and, per layer, heads, query/key and value dimensions
and FFN dimensions (report Section 5.4), with the teacher's sizes (:class:`PrunedArch`)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

from dht.model import DHTForSequenceClassification


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
