"""FlexiBERT encoders in plain torch (Tuli et al. 2022, design space: heterogeneous layers).

One :class:`~dht.baselines.flexibert.space.Architecture` becomes a BERT-style classifier:

    embeddings (token + position, LayerNorm, dropout) at the first layer's hidden size
    for each layer j:   x = LN(x + drop(mixer_j(x, mask)))              # token mixer: the op
                        x = LN(x + drop(FFN_j(x)))                      # d -> f1 -> ... -> fm -> d, GELU between
                        x = proj_j(x)   if h_j != h_{j+1}               # Linear h_j -> h_{j+1}
    pooler tanh(W [CLS]) and a linear classifier

Post-LN as BERT and as the authors' modular BERT (``BertSelfOutputModular``/``BertOutputModular``, with the
projection ``proj_head`` after the second LayerNorm). Token mixers (the paper's operation types), each ending in a d x d output
projection like every operation in the authors' code:

* ``sdp`` / ``wma``: multi-head self-attention with scores ``Q K^T`` or ``Q W_h K^T`` (one d_h x d_h matrix per
  head, initialised to the identity so WMA starts as SDP). Padded keys are masked out of the softmax.
* ``dft`` / ``dct``: FNet-style parameter-free mixing: ``Re(F_n X F_d)`` with the unitary DFT matrices, or
  ``C_n X C_d^T`` with orthonormal DCT-II matrices, as explicit matmuls (so FLOPs are countable). Padding:
  padded rows of X are zeroed first, so padding tokens contribute nothing; the transform is still taken over
  the padded length n (as FNet, which pads to a fixed length), so outputs depend on n. The unitary scaling
  (1/sqrt(n d)) replaces FNet's unnormalised FFT: with a residual add, an unnormalised transform would swamp
  the input by a factor ~sqrt(n d).
* ``conv<k>``: dynamic convolution (Wu et al. 2019) in ConvBERT's head layout (Jiang et al. 2020): for each
  position and each of G kernel groups a softmax-normalised kernel of k weights comes from a linear layer of
  the input, and is applied to the k neighbouring values of that group's channels. Simplification of ConvBERT's
  span-based dynamic convolution: the kernel is generated from the input token alone, not from
  ``query * separable_conv(key)``. Padding: the kernel softmax is taken over valid neighbours only (padded
  positions get weight exactly 0), so padding contributes nothing.

Parameter names are stable across architectures (``layers.<j>.<family>.<name>``, family = attention / linear /
conv) so that weight inheritance (:func:`dht.baselines.flexibert.search.inherit_weights`) copies exactly the tensors whose
role and shape match: SDP and WMA share Q/K/V/O, DFT and DCT share the output projection, convolutions of
different k share V and O.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .space import Architecture, LayerSpec

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "DynamicConvMixer",
    "FlexiBertConfig",
    "FlexiBertForSequenceClassification",
    "FlexiBertLayer",
    "FlexiBertOutput",
    "LinearTransformMixer",
    "SelfAttentionMixer",
    "build_mixer",
    "dct_matrix",
    "dft_matrices",
]

CONFIG_FILE = "flexibert_config.json"
WEIGHTS_FILE = "model.safetensors"
_FORMAT = 1


@dataclass(frozen=True)
class FlexiBertConfig:
    """Everything needed to rebuild a model: the architecture and the data-dependent sizes."""

    arch: Architecture
    vocab_size: int
    num_labels: int
    max_len: int
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.arch, dict):
            object.__setattr__(self, "arch", Architecture.from_dict(self.arch))
        if self.vocab_size < 1 or self.num_labels < 2 or self.max_len < 1:
            raise ValueError(
                f"vocab_size={self.vocab_size}, num_labels={self.num_labels}, max_len={self.max_len}: need "
                "vocab_size >= 1, num_labels >= 2 (classification), max_len >= 1"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "arch_id": self.arch.id,
            "arch": self.arch.to_dict(),
            "vocab_size": self.vocab_size,
            "num_labels": self.num_labels,
            "max_len": self.max_len,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "pad_token_id": self.pad_token_id,
            "layer_norm_eps": self.layer_norm_eps,
            "initializer_range": self.initializer_range,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlexiBertConfig:
        data = dict(data)
        if data.pop("format", _FORMAT) != _FORMAT:
            raise ValueError(f"unsupported FlexiBERT config format; this code reads format {_FORMAT}")
        data.pop("arch_id", None)
        data["arch"] = Architecture.from_dict(data["arch"])
        return cls(**data)


@dataclass
class FlexiBertOutput:
    logits: Tensor  # [B, num_labels]
    loss: Tensor | None = None


# --- token mixers ---------------------------------------------------------------------------------------------


class SelfAttentionMixer(nn.Module):
    """Multi-head self-attention, scaled dot-product (``sdp``) or weighted multiplicative (``wma``) scores."""

    def __init__(self, hidden: int, heads: int, weighted: bool, attention_dropout: float):
        super().__init__()
        self.heads, self.head_size = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        # WMA (FlexiBERT's weighted multiplicative attention): score = q W k^T with a learned W per head. Identity start = SDP start.
        self.bilinear = nn.Parameter(torch.eye(self.head_size).repeat(heads, 1, 1)) if weighted else None
        self.dropout = nn.Dropout(attention_dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, self.head_size).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))  # [B, H, n, d_h]
        if self.bilinear is not None:
            q = q @ self.bilinear  # [B, H, n, d_h] @ [H, d_h, d_h]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_size)
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = self.dropout(scores.softmax(dim=-1))
        context = (probs @ v).transpose(1, 2).reshape(b, n, d)
        return self.out(context)


@functools.lru_cache(maxsize=64)
def _dft_cached(n: int) -> tuple[Tensor, Tensor]:
    idx = torch.arange(n, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(idx, idx).remainder(n) / n  # remainder keeps the angle exact for large jk
    scale = 1 / math.sqrt(n)
    return torch.cos(angle) * scale, torch.sin(angle) * scale  # float64; cast on use


def dft_matrices(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(C, S) with the unitary DFT matrix F = C - iS, C[j, k] = cos(2 pi jk / n) / sqrt(n)."""
    c, s = _dft_cached(n)
    return c.to(device=device, dtype=dtype), s.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _dct_cached(n: int) -> Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    mat = torch.cos(math.pi * (j + 0.5) * k / n) * math.sqrt(2 / n)
    mat[0] /= math.sqrt(2)
    return mat  # float64; cast on use


def dct_matrix(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal DCT-II matrix C (C @ C.T = I): (C x)_k = sqrt(2/n) c_k sum_j x_j cos(pi (j + 1/2) k / n)."""
    return _dct_cached(n).to(device=device, dtype=dtype)


class LinearTransformMixer(nn.Module):
    """FNet-style mixing (``dft``: Re of the 2-D DFT; ``dct``: 2-D DCT-II), then the d x d output projection."""

    def __init__(self, hidden: int, kind: str):
        super().__init__()
        if kind not in ("dft", "dct"):
            raise ValueError(f"kind must be 'dft' or 'dct', got {kind!r}")
        self.kind = kind
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        n, d = x.shape[1], x.shape[2]
        x = x * mask[..., None].to(x.dtype)  # padding contributes nothing
        if self.kind == "dft":
            # Re((C_n - i S_n) X (C_d - i S_d)) = C_n X C_d - S_n X S_d
            cn, sn = dft_matrices(n, x.device, x.dtype)
            cd, sd = dft_matrices(d, x.device, x.dtype)
            mixed = (cn @ x) @ cd - (sn @ x) @ sd
        else:
            mixed = (dct_matrix(n, x.device, x.dtype) @ x) @ dct_matrix(d, x.device, x.dtype).T
        return self.out(mixed)


class DynamicConvMixer(nn.Module):
    """Dynamic convolution with G kernel groups and kernel size k (ConvBERT-style heads, simplified kernel)."""

    def __init__(self, hidden: int, groups: int, kernel_size: int, attention_dropout: float):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (centred window), got {kernel_size}")
        self.groups, self.kernel_size = groups, kernel_size
        self.value = nn.Linear(hidden, hidden)
        self.kernel = nn.Linear(hidden, groups * kernel_size)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(attention_dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        g, k, half = self.groups, self.kernel_size, self.kernel_size // 2
        v = self.value(x)
        logits = self.kernel(x).view(b, n, g, k)
        # Which of the k neighbours of each position exist and are real tokens: [B, n, k]. Masked out of the
        # softmax, padding and the sequence ends get weight exactly 0 and the kernel renormalises over the rest.
        valid = F.pad(mask, (half, half), value=False).unfold(1, k, 1)
        logits = logits.masked_fill(~valid[:, :, None, :], torch.finfo(logits.dtype).min)
        weights = self.dropout(logits.softmax(dim=-1))  # [B, n, G, k]
        windows = F.pad(v, (0, 0, half, half)).unfold(1, k, 1)  # [B, n, d, k]: window j = position t - half + j
        windows = windows.reshape(b, n, g, d // g, k)
        mixed = (windows @ weights.unsqueeze(-1)).reshape(b, n, d)  # a matmul, so FlopCounterMode sees it
        return self.out(mixed)


def build_mixer(layer: LayerSpec, attention_dropout: float) -> nn.Module:
    if layer.op in ("sdp", "wma"):
        return SelfAttentionMixer(layer.hidden, layer.heads, layer.op == "wma", attention_dropout)
    if layer.op in ("dft", "dct"):
        return LinearTransformMixer(layer.hidden, layer.op)
    return DynamicConvMixer(layer.hidden, layer.heads, int(layer.kernel_size or 0), attention_dropout)


# --- layers and model -----------------------------------------------------------------------------------------


class FlexiBertLayer(nn.Module):
    """mixer + residual + LN, FFN stack + residual + LN, then the projection to the next hidden size."""

    def __init__(self, layer: LayerSpec, next_hidden: int | None, config: FlexiBertConfig):
        super().__init__()
        self.family = layer.family
        # Registered under its family name so that parameter names say what the tensor is (see module doc).
        self.add_module(self.family, build_mixer(layer, config.attention_dropout))
        self.ln1 = nn.LayerNorm(layer.hidden, eps=config.layer_norm_eps)
        widths = [layer.hidden, *layer.ffn, layer.hidden]
        self.ffn = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.ln2 = nn.LayerNorm(layer.hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.proj = nn.Linear(layer.hidden, next_hidden) if next_hidden not in (None, layer.hidden) else None

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.family)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.ln1(x + self.dropout(self.mixer(x, mask)))
        h = x
        for i, linear in enumerate(self.ffn):
            h = linear(h)
            if i < len(self.ffn) - 1:
                h = F.gelu(h)
        x = self.ln2(x + self.dropout(h))
        return self.proj(x) if self.proj is not None else x


class FlexiBertForSequenceClassification(nn.Module):
    """A FlexiBERT encoder with BERT's [CLS] pooler and a linear classifier."""

    def __init__(self, config: FlexiBertConfig):
        super().__init__()
        self.config = config
        arch = config.arch
        d0, d_last = arch.layers[0].hidden, arch.layers[-1].hidden
        self.word_embeddings = nn.Embedding(config.vocab_size, d0, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_len, d0)
        self.embedding_ln = nn.LayerNorm(d0, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        nexts = [*arch.hidden_sizes[1:], None]
        self.layers = nn.ModuleList(FlexiBertLayer(layer, nxt, config) for layer, nxt in zip(arch.layers, nexts, strict=True))
        self.pooler = nn.Linear(d_last, d_last)
        self.classifier = nn.Linear(d_last, config.num_labels)
        self.apply(self._init_weights)

    @classmethod
    def build(cls, arch: Architecture, vocab_size: int, num_labels: int, max_len: int, dropout: float = 0.1,
              **kwargs: Any) -> FlexiBertForSequenceClassification:
        """Shorthand for ``cls(FlexiBertConfig(arch, vocab_size, num_labels, max_len, dropout, ...))``."""
        return cls(FlexiBertConfig(arch, vocab_size, num_labels, max_len, dropout, **kwargs))

    @property
    def arch(self) -> Architecture:
        return self.config.arch

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's initialisation (normal(0, 0.02), zero biases, unit LayerNorms); WMA's W keeps its identity start.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Last layer's hidden states [B, n, d_L]."""
        n = input_ids.shape[1]
        if n > self.config.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len {self.config.max_len}")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = torch.arange(n, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = self.dropout(self.embedding_ln(x))
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None) -> FlexiBertOutput:
        hidden = self.encode(input_ids, attention_mask)
        pooled = torch.tanh(self.pooler(hidden[:, 0]))  # [CLS] only, as dht.flops counts it
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return FlexiBertOutput(logits=logits, loss=loss)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- persistence ------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``flexibert_config.json`` (architecture + config) and ``model.safetensors``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / WEIGHTS_FILE))
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu") -> FlexiBertForSequenceClassification:
        path = Path(directory)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path / CONFIG_FILE}: not a saved FlexiBERT model (save_pretrained writes it)")
        config = FlexiBertConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        return model.to(device)
