"""Bandit contexts (pooled states, their running normalisation) and arm-feature sums (Sections 4.2, 7.1, 7.2).

Everything a bandit sees is a mean-pooled summary of a (seq_len x hidden) matrix of hidden states:

* :func:`multi_granularity_pool` -- the "sampling method" of Section 7.1: mean over 1, 2, ... equal
  consecutive parts of the sequence, then over 4, 8, 16 (etc.) equal parts of the hidden dimension. Which
  parts is a :class:`dht.config.PoolingConfig`, one per bandit (params.yaml's ``dht.features``; its defaults
  are the sizes of Section 7.3: 84 / 42 / 12 features, hence the "training sample vectors" of 168 = 84 + 84,
  87 = 42 + 42 + 3 and 13 = 12 + 1).
* :class:`RunningNormalizer` -- the rolling normalisation of contexts of Section 7.2.
* :class:`ArmFeatureAccumulator` -- running sums for the arm features z of Section 4.2 (one forward
  pass over the training set, bounded memory).
* :func:`head_slices` / :func:`pool_head_slices` -- the TSB arm feature: the h-th of N_H slices of
  the states along the hidden dimension (Section 4.2, last sentences).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from dht.config import PoolingConfig

__all__ = [
    "ArmFeatureAccumulator",
    "RunningNormalizer",
    "head_slices",
    "multi_granularity_pool",
    "pool_head_slices",
]


def multi_granularity_pool(states: Tensor, attention_mask: Tensor | None, pooling: PoolingConfig) -> Tensor:
    """Multi-granularity mean pooling of Section 7.1 ("first sample from sl and then from emb").

    Args:
        states: hidden states ``[B, S, D]``.
        attention_mask: ``[B, S]`` (nonzero = real token) or ``None`` (all tokens valid). Padding tokens
            never enter a mean.
        pooling: the parts: a bandit's ``dht.features.<bandit>``, whose validation makes both lists
            non-empty and positive (anything else with the two lists will do).
            ``seq_splits``: split each sample's *valid* tokens into k equal consecutive parts for every k;
            the valid token of rank p (0-based, among the sample's n valid tokens) goes to part floor(p*k/n).
            ``hidden_splits``: then split the hidden dimension of each of those sum(seq_splits) vectors
            into m equal parts for every m and take each part's mean.

    Returns:
        ``[B, pooling.size]`` (sum(seq_splits) * sum(hidden_splits)), ordered sequence part major: for seq
        split k=1 part 0, k=2 part 0, k=2 part 1, ... the hidden features m=4 parts 0..3, m=8 parts 0..7, ...

    A sequence part that receives no token (only possible when a sample has fewer valid tokens than k, which
    never happens with BERT's [CLS] ... [SEP] for k <= 2) is the zero vector rather than NaN.
    """
    seq_splits, hidden_splits = tuple(pooling.seq_splits), tuple(pooling.hidden_splits)
    if states.dim() != 3:
        raise ValueError(f"states must be [B, S, D], got shape {tuple(states.shape)}")
    batch, seq_len, hidden = states.shape
    for m in hidden_splits:
        if hidden % m:
            raise ValueError(
                f"hidden size {hidden} is not divisible by hidden split {m} (hidden_splits={hidden_splits})"
            )
    if attention_mask is None:
        valid = torch.ones(batch, seq_len, dtype=torch.bool, device=states.device)
    else:
        if attention_mask.shape != (batch, seq_len):
            raise ValueError(
                f"attention_mask must be [B, S] = {(batch, seq_len)}, got {tuple(attention_mask.shape)}"
            )
        valid = attention_mask.to(states.device) != 0

    # Step 1, sequence granularity. The rank among valid tokens (not the raw position) makes left and
    # right padding equivalent and keeps the parts equal-sized over the real tokens only.
    rank = valid.long().cumsum(1) - 1  # [B, S]
    n_valid = valid.sum(1, keepdim=True).clamp_min(1)  # [B, 1]; clamp only avoids 0/0 for empty samples
    assign = []
    for k in seq_splits:  # loop over a handful of granularities, never over samples
        part = (rank.clamp_min(0) * k) // n_valid  # [B, S] in [0, k)
        parts = torch.arange(k, device=states.device)
        assign.append((part.unsqueeze(1) == parts[None, :, None]) & valid.unsqueeze(1))  # [B, k, S]
    weights = torch.cat(assign, dim=1).to(states.dtype)  # [B, P, S], P = sum(seq_splits)
    seq_pooled = (weights @ states) / weights.sum(-1, keepdim=True).clamp_min(1)  # [B, P, D]

    # Step 2, hidden granularity: equal consecutive chunks of the hidden dimension, each averaged.
    n_parts = seq_pooled.shape[1]
    feats = [seq_pooled.reshape(batch, n_parts, m, hidden // m).mean(-1) for m in hidden_splits]
    return torch.cat(feats, dim=-1).reshape(batch, n_parts * sum(hidden_splits))


def head_slices(states: Tensor, num_heads: int) -> Tensor:
    """View ``[B, S, D]`` states as ``[B, S, num_heads, D // num_heads]``.

    Section 4.2: the TSB arm feature of head h is the h-th of N_H sub-matrices along the embedding
    dimension (the slice that head h's output occupies after the attention output concatenation).
    """
    if states.dim() != 3:
        raise ValueError(f"states must be [B, S, D], got shape {tuple(states.shape)}")
    batch, seq_len, hidden = states.shape
    if num_heads < 1 or hidden % num_heads:
        raise ValueError(f"hidden size {hidden} is not divisible by num_heads {num_heads}")
    return states.reshape(batch, seq_len, num_heads, hidden // num_heads)


def pool_head_slices(states: Tensor, attention_mask: Tensor | None, num_heads: int, pooling: PoolingConfig) -> Tensor:
    """Pool every head slice separately: ``[B, S, D] -> [B, num_heads, F]`` (TSB arm features, Section 4.2).

    With BERT-base (D = 768, N_H = 12) each slice has 64 dims and the TSB's default pooling gives F = 12. A
    slice narrower than a hidden split keeps the splits that divide it (docs/paper-notes.md, row 11): 4-dim
    slices pooled with hidden splits (4, 8) give F = 4.
    """
    sliced = head_slices(states, num_heads)  # [B, S, H, Dh]
    batch, seq_len, heads, head_dim = sliced.shape
    kept = [m for m in pooling.hidden_splits if head_dim % m == 0] or [1]
    if kept != list(pooling.hidden_splits):
        pooling = PoolingConfig(seq_splits=list(pooling.seq_splits), hidden_splits=kept)
    flat = sliced.permute(0, 2, 1, 3).reshape(batch * heads, seq_len, head_dim)  # sample-major, head-minor
    mask = None if attention_mask is None else attention_mask.repeat_interleave(heads, dim=0)
    pooled = multi_granularity_pool(flat, mask, pooling)
    return pooled.reshape(batch, heads, -1)


class RunningNormalizer:
    """Running per-feature mean / variance normalisation of contexts (Section 7.2).

    The statistics are merged batch by batch with Chan et al.'s parallel update (exact, numerically stable
    Welford generalisation), in float64. The variance is the population variance (ddof=0) over everything
    seen so far.

    ``normalize`` before any data is the identity; after a single sample (no variance estimate yet) it only
    centres; afterwards it returns ``(x - mean) / sqrt(var + eps)``, optionally clipped to ``[-clip, clip]``.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-8,
        clip: float | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be positive or None, got {clip}")
        self.dim = dim
        self.eps = eps
        self.clip = clip
        self.device = torch.device(device)
        self.count = torch.zeros((), dtype=torch.float64, device=self.device)
        self.mean = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=self.device)  # sum of squared deviations

    def _flat(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected last dimension {self.dim}, got shape {tuple(x.shape)}")
        return x.detach().to(device=self.device, dtype=torch.float64).reshape(-1, self.dim)

    @property
    def var(self) -> Tensor:
        """Population variance per feature (zeros before two samples)."""
        return self.m2 / self.count.clamp_min(1)

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    def update(self, x: Tensor) -> None:
        """Merge a batch ``[..., dim]`` into the statistics (Chan, Golub & LeVeque parallel update)."""
        xb = self._flat(x)
        n_b = xb.shape[0]
        if n_b == 0:
            return
        mean_b = xb.mean(0)
        m2_b = ((xb - mean_b) ** 2).sum(0)
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (n_a * n_b / n)
        self.count = n

    def normalize(self, x: Tensor) -> Tensor:
        """Standardise ``x`` with the current statistics; the result has ``x``'s dtype and device."""
        if float(self.count) == 0:
            return x
        xf = self._flat(x)
        # One sample gives no variance estimate yet: centre only rather than divide by sqrt(eps).
        scale = torch.sqrt(self.var + self.eps) if float(self.count) >= 2 else torch.ones_like(self.mean)
        out = (xf - self.mean) / scale
        if self.clip is not None:
            out = out.clamp(-self.clip, self.clip)
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def __call__(self, x: Tensor, update: bool = True) -> Tensor:
        """Optionally ``update`` with ``x`` first (rolling normalisation), then ``normalize`` it."""
        if update:
            self.update(x)
        return self.normalize(x)

    def state_dict(self) -> dict[str, Tensor]:
        return {"count": self.count.clone(), "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["mean"].shape != (self.dim,) or state["m2"].shape != (self.dim,):
            raise ValueError(f"state has feature size {tuple(state['mean'].shape)}, expected ({self.dim},)")
        self.count = state["count"].to(device=self.device, dtype=torch.float64).clone().reshape(())
        self.mean = state["mean"].to(device=self.device, dtype=torch.float64).clone()
        self.m2 = state["m2"].to(device=self.device, dtype=torch.float64).clone()


class ArmFeatureAccumulator:
    """Running sums of pooled vectors, one per arm key, for the arm features z of Section 4.2.

    The arm-feature pass runs the whole training set through the full model once; keeping every hidden
    state is out of the question, so only a float64 sum and a count per key are stored (memory independent
    of the number of batches).

    Mean pooling is linear: when all samples have the same attention mask, the mean of the per-sample pooled
    vectors equals the pooling of the averaged (seq x hidden) matrices that Section 4.2 describes. With
    different masks (padding) the "average matrix" would mix padding positions into real ones, so averaging
    the per-sample pooled vectors is the sensible reading and the one implemented here.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, Tensor] = {}

    def add(self, key: str, pooled: Tensor) -> None:
        """Add a batch of pooled vectors ``[B, F]`` (or one vector ``[F]``) to arm ``key``."""
        if pooled.dim() == 1:
            pooled = pooled.unsqueeze(0)
        if pooled.dim() != 2:
            raise ValueError(f"pooled must be [B, F] or [F], got shape {tuple(pooled.shape)}")
        batch_sum = pooled.detach().to(device=self.device, dtype=torch.float64).sum(0)
        if key not in self._sums:
            self._sums[key] = torch.zeros_like(batch_sum)
            self._counts[key] = torch.zeros((), dtype=torch.int64, device=self.device)
        if batch_sum.shape != self._sums[key].shape:
            raise ValueError(
                f"arm {key!r} has feature size {self._sums[key].shape[0]}, got {batch_sum.shape[0]}"
            )
        self._sums[key] += batch_sum
        self._counts[key] += pooled.shape[0]

    def mean(self, key: str) -> Tensor:
        """Mean of every vector added under ``key`` (float64 ``[F]``)."""
        if key not in self._sums or int(self._counts[key]) == 0:
            raise KeyError(f"no vectors were added for arm {key!r}")
        return self._sums[key] / self._counts[key]

    def count(self, key: str) -> int:
        return int(self._counts[key]) if key in self._counts else 0

    def keys(self) -> list[str]:
        """Arm keys in insertion order."""
        return list(self._sums)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._sums

    def __len__(self) -> int:
        return len(self._sums)

    def stack(self, keys: Iterable[str]) -> Tensor:
        """Arm feature matrix ``[K, F]`` in the given key order (the ``arm_features`` of the bandits)."""
        return torch.stack([self.mean(k) for k in keys])

    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``{"sum.<key>": [F], "count.<key>": []}`` dict of tensors (safetensors / torch.save friendly)."""
        state: dict[str, Tensor] = {}
        for key in self._sums:
            state[f"sum.{key}"] = self._sums[key].clone()
            state[f"count.{key}"] = self._counts[key].clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        sums: dict[str, Tensor] = {}
        counts: dict[str, Tensor] = {}
        for name, value in state.items():
            kind, _, key = name.partition(".")
            if kind == "sum":
                sums[key] = value.to(device=self.device, dtype=torch.float64).clone()
            elif kind == "count":
                counts[key] = value.to(device=self.device, dtype=torch.int64).clone().reshape(())
            else:
                raise ValueError(f"unexpected entry {name!r} in ArmFeatureAccumulator state")
        if sums.keys() != counts.keys():
            raise ValueError("ArmFeatureAccumulator state has unmatched sum/count entries")
        self._sums, self._counts = sums, counts
