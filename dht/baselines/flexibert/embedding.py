"""Fixed-length architecture embeddings for the BOSHNAS surrogate (FlexiBERT, Transformer2vec, adapted).

FlexiBERT's *Transformer2vec* turns every architecture into a computational graph, computes
pairwise graph-edit distances (GED) between graphs (with operation-dependent substitution costs), and embeds the
whole design space with multi-dimensional scaling so that Euclidean distance approximates GED. The surrogate then
works in that space, and neighbours in it share weights (weight transfer).

This module uses a documented simpler embedding with the property BOSHNAS relies on (similar architectures are
close, distinct architectures are apart) without an O(N^2) GED matrix over the space, and with embeddings for
architectures that were not in the space when it was built (docs/baselines-flexibert.md, "Embedding"). For a
space with at most ``L`` layers the vector is

    for each layer slot 1..L (zeros when the architecture has fewer layers):
        present (1), op one-hot (7), family one-hot (attention / linear / conv, 3), kernel size / 13,
        heads / max heads, hidden / max hidden, FFN depth / max depth, FFN widths / max width (max depth slots)
    global: layers / L, mean hidden / max hidden, share of attention / linear / conv layers (3)

The family one-hot makes SDP <-> WMA (both attention) closer than SDP <-> DFT, as GED's ordered operation costs
do. Every feature of a layer is encoded, so the map is injective: distance 0 means the same architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .space import CONV_OPS, OPS, Architecture, SpaceConfig, conv_kernel_size

__all__ = ["ArchEmbedder", "embedding_distance"]

_FAMILIES = ("attention", "linear", "conv")


@dataclass(frozen=True)
class ArchEmbedder:
    """Maps architectures to vectors in [0, 1]^dim; the normalisers come from the space (or are given)."""

    max_layers: int
    max_heads: int
    max_hidden: int
    max_ffn_depth: int
    max_ffn_width: int
    max_kernel: int = 13

    @classmethod
    def for_space(cls, space: SpaceConfig) -> ArchEmbedder:
        kernels = [conv_kernel_size(op) for op in space.ops if op in CONV_OPS]
        return cls(
            max_layers=max(space.layers),
            max_heads=max(space.heads),
            max_hidden=max(space.hidden),
            max_ffn_depth=max(space.ffn_depths),
            max_ffn_width=max(space.ffn_widths),
            max_kernel=max(kernels, default=13),
        )

    @classmethod
    def for_architectures(cls, archs: Sequence[Architecture]) -> ArchEmbedder:
        """Normalisers fitted to a candidate set (when no SpaceConfig describes it)."""
        if not archs:
            raise ValueError("need at least one architecture")
        layers = [layer for a in archs for layer in a.layers]
        kernels = [layer.kernel_size for layer in layers if layer.kernel_size]
        return cls(
            max_layers=max(a.num_layers for a in archs),
            max_heads=max(layer.heads for layer in layers),
            max_hidden=max(layer.hidden for layer in layers),
            max_ffn_depth=max(len(layer.ffn) for layer in layers),
            max_ffn_width=max(f for layer in layers for f in layer.ffn),
            max_kernel=max(kernels, default=13),
        )

    @property
    def slot_dim(self) -> int:
        # present, op one-hot, family one-hot, kernel/heads/hidden/depth, one width per FFN slot
        return 1 + len(OPS) + len(_FAMILIES) + 4 + self.max_ffn_depth

    @property
    def dim(self) -> int:
        return self.max_layers * self.slot_dim + 2 + len(_FAMILIES)

    def embed(self, arch: Architecture) -> np.ndarray:
        if arch.num_layers > self.max_layers:
            raise ValueError(f"{arch.num_layers} layers; this embedder has {self.max_layers} slots")
        vec = np.zeros(self.dim, dtype=np.float32)
        for i, layer in enumerate(arch.layers):
            if len(layer.ffn) > self.max_ffn_depth:
                raise ValueError(f"layer {i} has {len(layer.ffn)} FFN layers; this embedder allows {self.max_ffn_depth}")
            s = vec[i * self.slot_dim : (i + 1) * self.slot_dim]  # a view: writes go into vec
            s[0] = 1.0
            s[1 + OPS.index(layer.op)] = 1.0
            base = 1 + len(OPS)
            s[base + _FAMILIES.index(layer.family)] = 1.0
            base += len(_FAMILIES)
            s[base] = (layer.kernel_size or 0) / self.max_kernel
            s[base + 1] = layer.heads / self.max_heads
            s[base + 2] = layer.hidden / self.max_hidden
            s[base + 3] = len(layer.ffn) / self.max_ffn_depth
            for j, width in enumerate(layer.ffn):
                s[base + 4 + j] = width / self.max_ffn_width
        g = self.max_layers * self.slot_dim
        vec[g] = arch.num_layers / self.max_layers
        vec[g + 1] = float(np.mean(arch.hidden_sizes)) / self.max_hidden
        for j, family in enumerate(_FAMILIES):
            vec[g + 2 + j] = sum(layer.family == family for layer in arch.layers) / arch.num_layers
        return vec

    def embed_many(self, archs: Sequence[Architecture]) -> np.ndarray:
        """[N, dim] float32."""
        if not archs:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.embed(a) for a in archs])


def embedding_distance(embedder: ArchEmbedder, a: Architecture, b: Architecture) -> float:
    """Euclidean distance between two architectures' embeddings."""
    return float(np.linalg.norm(embedder.embed(a) - embedder.embed(b)))
