"""The FlexiBERT design space (Tuli et al. 2022, design space and its table of choices).

FlexiBERT makes every *encoder layer* its own choice instead of repeating one layer N times. Layer j has

* an operation ``o_j`` with its parameter ``p_j``. Here the pair is folded into one name:
  self-attention with scaled dot-product (``"sdp"``) or weighted multiplicative attention (``"wma"``) similarity;
  a linear transform, the discrete Fourier (``"dft"``) or cosine (``"dct"``) transform, FNet-style; or a
  dynamic-span convolution with kernel size 5, 9 or 13 (``"conv5"``, ``"conv9"``, ``"conv13"``);
* a number of operation heads ``n_j`` (attention heads, or kernel groups of a convolution; a linear transform
  has no heads and is stored with ``heads = 1``);
* a hidden size ``h_j``. It is constant *inside* a layer (every head of the layer works on it) but may differ
  between layers: a linear projection ``h_j -> h_{j+1}`` joins consecutive layers of different size (the
  authors' ``BertOutputModular.proj_head``);
* a stack of feed-forward layers ``f_j = (f_j1, ..., f_jm)`` (1-3 layers in the authors' spaces).

The authors' smallest space (``design_space/design_space_test.yaml``, read here as the paper's Tiny space) is
hidden {128, 256}, layers {2, 4}, heads {2, 4}, FFN width {512, 1024}, {1, 3} FFN layers, SA {sdp, wma},
LT {dft, dct}, DSC {5, 9}.
:class:`SpaceConfig`'s defaults follow this project's brief instead (1 or 2 FFN layers, all seven operations incl.
``conv13``); :meth:`SpaceConfig.paper_tiny` is the authors' Tiny space. As in the authors' library builder, all
FFN layers of one encoder layer have the same width by default (``homogeneous_ffn``), and consecutive layers
can be tied into stacks (``layers_per_stack``) to keep the space enumerable (their hierarchical search).

Architectures are plain frozen dataclasses with a readable, path-safe string id, e.g.
``"sdp.4.128.512-512_dct.1.256.1024"`` (op.heads.hidden.ffn per layer, layers joined by ``_``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

__all__ = [
    "ATTENTION_OPS",
    "CONV_OPS",
    "LINEAR_OPS",
    "OPS",
    "Architecture",
    "LayerSpec",
    "SpaceConfig",
    "conv_kernel_size",
    "enumerate_space",
    "neighbours",
    "op_family",
    "sample",
    "sample_unique",
]

ATTENTION_OPS = ("sdp", "wma")
LINEAR_OPS = ("dft", "dct")
CONV_OPS = ("conv5", "conv9", "conv13")
OPS = ATTENTION_OPS + LINEAR_OPS + CONV_OPS


def op_family(op: str) -> str:
    """``"attention"``, ``"linear"`` or ``"conv"``: the paper's operation types SA, LT and DSC."""
    if op in ATTENTION_OPS:
        return "attention"
    if op in LINEAR_OPS:
        return "linear"
    if op in CONV_OPS:
        return "conv"
    raise ValueError(f"unknown op {op!r}; allowed: {OPS}")


def conv_kernel_size(op: str) -> int:
    """Kernel size k of a ``"conv<k>"`` op."""
    if op not in CONV_OPS:
        raise ValueError(f"{op!r} is not a convolution; allowed: {CONV_OPS}")
    return int(op[4:])


@dataclass(frozen=True)
class LayerSpec:
    """One encoder layer: token mixer ``op`` with ``heads`` heads on ``hidden`` features, then the FFN stack."""

    op: str
    heads: int
    hidden: int
    ffn: tuple[int, ...]

    def __post_init__(self) -> None:
        # Normalise before validating so that equal layers compare (and hash, and embed) equal.
        object.__setattr__(self, "ffn", tuple(int(f) for f in self.ffn))
        object.__setattr__(self, "hidden", int(self.hidden))
        family = op_family(self.op)  # raises on an unknown op
        if family == "linear":
            # DFT/DCT mix all features at once: heads mean nothing, so one canonical value keeps ids unique.
            object.__setattr__(self, "heads", 1)
        object.__setattr__(self, "heads", int(self.heads))
        if self.hidden < 1:
            raise ValueError(f"hidden = {self.hidden}: must be >= 1")
        if self.heads < 1:
            raise ValueError(f"heads = {self.heads}: must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"hidden = {self.hidden} is not divisible by heads = {self.heads} (op {self.op!r})")
        if not self.ffn or any(f < 1 for f in self.ffn):
            raise ValueError(f"ffn = {self.ffn}: needs at least one feed-forward layer, every width >= 1")

    @property
    def family(self) -> str:
        return op_family(self.op)

    @property
    def kernel_size(self) -> int | None:
        return conv_kernel_size(self.op) if self.op in CONV_OPS else None

    @property
    def id(self) -> str:
        return f"{self.op}.{self.heads}.{self.hidden}.{'-'.join(str(f) for f in self.ffn)}"

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "heads": self.heads, "hidden": self.hidden, "ffn": list(self.ffn)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerSpec:
        unknown = set(data) - {"op", "heads", "hidden", "ffn"}
        if unknown:
            raise ValueError(f"unknown layer keys {sorted(unknown)}; allowed: op, heads, hidden, ffn")
        return cls(op=str(data["op"]), heads=int(data["heads"]), hidden=int(data["hidden"]),
                   ffn=tuple(int(f) for f in data["ffn"]))

    @classmethod
    def from_id(cls, text: str) -> LayerSpec:
        try:
            op, heads, hidden, ffn = text.split(".")
            return cls(op=op, heads=int(heads), hidden=int(hidden), ffn=tuple(int(f) for f in ffn.split("-")))
        except ValueError as err:
            raise ValueError(f"{text!r} is not a layer id like 'sdp.4.128.512-512': {err}") from err


@dataclass(frozen=True)
class Architecture:
    """A FlexiBERT encoder: a non-empty tuple of :class:`LayerSpec`."""

    layers: tuple[LayerSpec, ...]

    def __post_init__(self) -> None:
        layers = tuple(layer if isinstance(layer, LayerSpec) else LayerSpec.from_dict(layer) for layer in self.layers)
        object.__setattr__(self, "layers", layers)
        if not layers:
            raise ValueError("an architecture needs at least one encoder layer")

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(layer.hidden for layer in self.layers)

    @property
    def is_homogeneous(self) -> bool:
        """Every layer identical (a classic BERT-like stack)."""
        return len(set(self.layers)) == 1

    @property
    def id(self) -> str:
        return "_".join(layer.id for layer in self.layers)

    def __str__(self) -> str:
        return self.id

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Architecture:
        if "layers" not in data:
            raise ValueError("an architecture dict needs 'layers' (a list of {op, heads, hidden, ffn})")
        return cls(tuple(LayerSpec.from_dict(layer) for layer in data["layers"]))

    @classmethod
    def from_id(cls, text: str) -> Architecture:
        return cls(tuple(LayerSpec.from_id(part) for part in text.split("_")))

    @classmethod
    def homogeneous(cls, num_layers: int, op: str, heads: int, hidden: int, ffn: Sequence[int]) -> Architecture:
        """``num_layers`` copies of one layer, e.g. BERT-Tiny = ``homogeneous(2, "sdp", 2, 128, [512])``."""
        return cls(tuple(LayerSpec(op, heads, hidden, tuple(ffn)) for _ in range(num_layers)))


@dataclass(frozen=True)
class SpaceConfig:
    """The choices of the design space (FlexiBERT's design-space table).

    Defaults: the Tiny space as this project's brief states it (hidden {128, 256}, layers {2, 4}, heads {2, 4},
    FFN widths {512, 1024}, 1 or 2 FFN layers, all seven operations). :meth:`paper_tiny` and :meth:`paper_mini`
    are the authors' Tiny and Mini spaces (``design_space_test.yaml`` / ``design_space_small.yaml``).
    """

    hidden: tuple[int, ...] = (128, 256)
    layers: tuple[int, ...] = (2, 4)
    heads: tuple[int, ...] = (2, 4)
    ffn_widths: tuple[int, ...] = (512, 1024)
    ffn_depths: tuple[int, ...] = (1, 2)
    ops: tuple[str, ...] = OPS
    # The authors' library builder uses one width for all FFN layers of an encoder layer unless asked otherwise.
    homogeneous_ffn: bool = True
    # Consecutive layers tied into stacks that share every choice (the authors' hierarchical search, level 1).
    layers_per_stack: int = 1

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "ffn_widths", "ffn_depths", "ops"):
            values = tuple(getattr(self, name))
            if not values:
                raise ValueError(f"SpaceConfig.{name} is empty")
            if len(set(values)) != len(values):
                raise ValueError(f"SpaceConfig.{name} = {values} has duplicates")
            object.__setattr__(self, name, tuple(sorted(values)) if name != "ops" else values)
        for op in self.ops:
            op_family(op)
        if any(v < 1 for v in (*self.hidden, *self.layers, *self.heads, *self.ffn_widths, *self.ffn_depths)):
            raise ValueError("every size in a SpaceConfig must be >= 1")
        if self.layers_per_stack < 1 or any(n % self.layers_per_stack for n in self.layers):
            raise ValueError(f"layers {self.layers} must all be multiples of layers_per_stack = {self.layers_per_stack}")
        if any(op_family(op) != "linear" for op in self.ops) and not self._head_choices_exist():
            raise ValueError(f"no heads value in {self.heads} divides a hidden size in {self.hidden}")

    def _head_choices_exist(self) -> bool:
        return any(h % n == 0 for h in self.hidden for n in self.heads)

    @classmethod
    def paper_tiny(cls) -> SpaceConfig:
        """FlexiBERT-Tiny as in the authors' ``design_space_test.yaml``: {1, 3} FFN layers, DSC kernels {5, 9}."""
        return cls(ffn_depths=(1, 3), ops=("sdp", "wma", "dft", "dct", "conv5", "conv9"))

    @classmethod
    def paper_mini(cls) -> SpaceConfig:
        """FlexiBERT-Mini (the authors' ``design_space_small.yaml``): Tiny plus FFN width 2048, 2 FFN layers and kernel 13."""
        return cls(ffn_widths=(512, 1024, 2048), ffn_depths=(1, 2, 3))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpaceConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SpaceConfig keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in data.items()})

    # --- per-layer choices -------------------------------------------------------------------------------------

    def ffn_choices(self) -> list[tuple[int, ...]]:
        if self.homogeneous_ffn:
            return [(w,) * d for d in self.ffn_depths for w in self.ffn_widths]
        return [combo for d in self.ffn_depths for combo in itertools.product(self.ffn_widths, repeat=d)]

    def mixer_choices(self, hidden: int) -> list[tuple[str, int]]:
        """(op, heads) pairs valid at this hidden size; linear transforms contribute one pair (heads unused)."""
        out: list[tuple[str, int]] = []
        for op in self.ops:
            if op_family(op) == "linear":
                out.append((op, 1))
            else:
                out.extend((op, n) for n in self.heads if hidden % n == 0)
        return out

    def layer_choices(self) -> list[LayerSpec]:
        """Every distinct layer the space allows (96 for the default Tiny space)."""
        return [LayerSpec(op, n, h, f) for h in self.hidden for op, n in self.mixer_choices(h) for f in self.ffn_choices()]

    def size(self) -> int:
        """Number of distinct architectures."""
        per_stack = len(self.layer_choices())
        return sum(per_stack ** (n // self.layers_per_stack) for n in self.layers)

    def contains(self, arch: Architecture) -> bool:
        if arch.num_layers not in self.layers:
            return False
        allowed = set(self.layer_choices())
        if any(layer not in allowed for layer in arch.layers):
            return False
        k = self.layers_per_stack
        return all(len(set(arch.layers[i : i + k])) == 1 for i in range(0, arch.num_layers, k))


def _from_stacks(stacks: Sequence[LayerSpec], layers_per_stack: int) -> Architecture:
    return Architecture(tuple(layer for layer in stacks for _ in range(layers_per_stack)))


def enumerate_space(space: SpaceConfig, limit: int | None = 100_000) -> list[Architecture]:
    """Every architecture of ``space``, shallow ones first (deterministic order).

    Raises ValueError when the space has more than ``limit`` architectures: a truncated enumeration would be a
    biased candidate set; use :func:`sample_unique` (or ``layers_per_stack`` / fewer choices) instead. The default
    Tiny space has 96^2 + 96^4 ~ 85M architectures; with ``layers_per_stack=2`` it has 96 + 96^2 = 9,312.
    """
    total = space.size()
    if limit is not None and total > limit:
        raise ValueError(
            f"the space has {total:,} architectures, more than limit = {limit:,}: sample candidates with "
            "sample_unique(), or restrict the space (layers_per_stack, fewer choices)"
        )
    choices = space.layer_choices()
    out: list[Architecture] = []
    for n in space.layers:
        for stacks in itertools.product(choices, repeat=n // space.layers_per_stack):
            out.append(_from_stacks(stacks, space.layers_per_stack))
    return out


def sample(space: SpaceConfig, rng: np.random.Generator) -> Architecture:
    """One architecture: depth uniform over ``space.layers``, then each stack's layer uniform over the space's
    layer choices (so not uniform over architectures: deep ones are far more numerous)."""
    choices = space.layer_choices()
    n = int(space.layers[int(rng.integers(len(space.layers)))])
    stacks = [choices[int(rng.integers(len(choices)))] for _ in range(n // space.layers_per_stack)]
    return _from_stacks(stacks, space.layers_per_stack)


def sample_unique(space: SpaceConfig, n: int, rng: np.random.Generator, max_tries: int | None = None) -> list[Architecture]:
    """Up to ``n`` distinct architectures by :func:`sample` (fewer only if the space is smaller than ``n``)."""
    n = min(n, space.size())
    seen: dict[str, Architecture] = {}
    tries = 0
    max_tries = max_tries if max_tries is not None else 50 * n + 1000
    while len(seen) < n and tries < max_tries:
        arch = sample(space, rng)
        seen.setdefault(arch.id, arch)
        tries += 1
    return list(seen.values())


def _one_ffn_edit(a: tuple[int, ...], b: tuple[int, ...], homogeneous: bool) -> bool:
    """b differs from a by one attribute: one width (the shared width if homogeneous) or one layer more/less."""
    if a == b:
        return False
    if len(a) == len(b):
        return homogeneous or sum(x != y for x, y in zip(a, b, strict=True)) == 1
    if homogeneous:
        return a[0] == b[0]
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return len(long_) == len(short) + 1 and long_[: len(short)] == short


def neighbours(arch: Architecture, space: SpaceConfig) -> list[Architecture]:
    """Architectures of ``space`` one edit away: one stack's op/heads, hidden size, FFN width or FFN depth
    changed, or the depth changed (deeper: the last stack repeated; shallower: truncated).

    These are the FlexiBERT "neighbours" (weight transfer) in spirit: models that share most of their weights, used
    for weight inheritance and for testing that the embedding keeps them close.
    """
    k = space.layers_per_stack
    stacks = list(arch.layers[::k])
    out: dict[str, Architecture] = {}

    def add(candidate_stacks: Sequence[LayerSpec]) -> None:
        try:
            cand = _from_stacks(candidate_stacks, k)
        except ValueError:
            return
        if cand.id != arch.id and space.contains(cand):
            out.setdefault(cand.id, cand)

    for i, layer in enumerate(stacks):
        edits: list[LayerSpec] = []
        for op, heads in space.mixer_choices(layer.hidden):
            if (op, heads) != (layer.op, layer.heads):
                edits.append(LayerSpec(op, heads, layer.hidden, layer.ffn))
        for hidden in space.hidden:
            if hidden != layer.hidden and (layer.family == "linear" or hidden % layer.heads == 0):
                edits.append(LayerSpec(layer.op, layer.heads, hidden, layer.ffn))
        for ffn in space.ffn_choices():
            if _one_ffn_edit(layer.ffn, ffn, space.homogeneous_ffn):
                edits.append(LayerSpec(layer.op, layer.heads, layer.hidden, ffn))
        for edit in edits:
            add([*stacks[:i], edit, *stacks[i + 1 :]])
    for n in space.layers:
        depth = n // k
        if depth < len(stacks):
            add(stacks[:depth])
        elif depth > len(stacks):
            add([*stacks, *[stacks[-1]] * (depth - len(stacks))])
    return list(out.values())
