"""Arm features (Section 4.2): one pass over the training samples through the initial model, without
gradient, that gives every bandit arm a feature vector z.

- **UCB_L**, arm L: the mean of all samples' states after layer L (all heads).
- **UCB_H**, arm H: "each sample is randomly and evenly assigned a head number"; the mean of the states after
  every dynamic layer group that ran with H heads.
- **UCB_cp**, arm (L, H) (and P-DHT's segmented arms such as 4L8H+2L12H): the mean of the states at layer L of
  the samples that ran that arm's exact plan.
- **TSB**, arm h: the h-th of N_H slices of the states along the hidden dimension, at every layer, with every
  head count, averaged.

Two forward passes per batch: the full model (UCB_L, TSB), and a *random-arm* pass in which every sample is
assigned one arm of the run's arm pool (round robin over a shuffled order, so arms are evenly covered) with a
random head subset per dynamic group (UCB_H, UCB_cp, TSB). Each state is reduced at once by the pooling of its
bandit (Section 7.1) and only running sums are kept, so memory does not grow with the dataset.
Mean pooling is linear, so the mean of pooled states is the pooled mean state (up to padding, where the
per-sample reading is the sensible one).

Keys: ``ucb_l/<L>``, ``ucb_h/<H>``, ``ucb_cp/<arm>``, ``tsb/<head index>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dht.config import Arm, Config, FeaturesConfig, PoolingConfig, parse_arm
from dht.features import ArmFeatureAccumulator, PoolingSpec, pool_head_slices

FEATURES_FILE = "arm_features.safetensors"
META_FILE = "meta.json"


@dataclass(frozen=True)
class ArmSpace:
    """The arms a run's modes can choose, union over modes (and their warm-up modes)."""

    layer_options: tuple[int, ...]  # UCB_L (tree search)
    head_options: tuple[int, ...]  # UCB_H (tree search)
    cp_arms: tuple[str, ...]  # UCB_cp (integrated search) and fixed arms, as written in params.yaml
    pool: tuple[str, ...]  # arms of the random-arm pass: cp_arms and every tree combination


def arm_space(cfg: Config) -> ArmSpace:
    modes = set(cfg.run.models)
    modes |= {cfg.dht.modes[m].warmup_mode for m in list(modes) if cfg.dht.modes[m].warmup_mode}
    layers: set[int] = set()
    heads: set[int] = set()
    cp: dict[str, None] = {}
    for name in sorted(modes):
        mode = cfg.dht.modes[name]
        layers.update(mode.layers or [])
        heads.update(mode.heads or [])
        for arm in mode.arms or []:
            cp[str(parse_arm(arm))] = None
    tree = {f"{L}L{H}H": None for L in sorted(layers) for H in sorted(heads)}
    return ArmSpace(tuple(sorted(layers)), tuple(sorted(heads)), tuple(cp), tuple({**cp, **tree}))


def arm_layer_heads(arm: Arm, fixed_layers: int, num_heads: int) -> list[int]:
    """Heads per layer for an arm: the first b layers always run every head (Section 4.2), the rest follow
    the arm's segments (4L8H+2L12H with b = 3: 12, 12, 12, 8, 12, 12)."""
    heads = arm.heads_per_layer()
    return [num_heads if layer < fixed_layers else h for layer, h in enumerate(heads)]


def random_arm_plan(
    arms: list[list[int]],
    arm_ids: Tensor,
    num_layers: int,
    num_heads: int,
    groups: list[range],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Depth [B] and head plan [B, num_layers, num_heads] for samples assigned `arm_ids`.

    Within a dynamic group the kept heads are the first h of one random order of the heads, so layers of a
    group that keep the same number keep the same heads ("the same relative positions", Section 4.2).
    """
    batch = arm_ids.numel()
    per_layer = torch.full((len(arms), num_layers), num_heads, dtype=torch.long)
    depth_of = torch.zeros(len(arms), dtype=torch.long)
    for k, heads in enumerate(arms):
        per_layer[k, : len(heads)] = torch.tensor(heads)
        depth_of[k] = len(heads)
    counts = per_layer[arm_ids]  # [B, N_L]
    # rank[i, l, j]: the position of head j in sample i's random order for layer l's group
    rank = torch.empty(batch, num_layers, num_heads, dtype=torch.long)
    rank[:] = torch.arange(num_heads)  # fixed layers: any order, all heads are kept
    for group in groups:
        order = torch.rand(batch, num_heads, generator=generator).argsort(dim=1).argsort(dim=1)
        rank[:, group.start : group.stop] = order[:, None, :]
    plan = rank < counts[:, :, None]
    return depth_of[arm_ids], plan


def _spec(pool: PoolingConfig, width: int | None = None) -> PoolingSpec:
    """Pooling for a state of `width` hidden dims: a head slice narrower than a split keeps the splits that
    divide it (docs/bandits.md)."""
    hidden = tuple(pool.hidden_splits)
    if width is not None:
        hidden = tuple(h for h in hidden if width % h == 0) or (1,)
    return PoolingSpec(tuple(pool.seq_splits), hidden)


@torch.no_grad()
def compute_arm_features(
    model: torch.nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    space: ArmSpace,
    features: FeaturesConfig,
    seed: int = 0,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Mean pooled state per arm key over `batches` of (input_ids, attention_mask); see the module doc."""
    config = model.config
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    groups = config.dynamic_layer_groups()
    device = next(model.parameters()).device
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    pool_l, pool_cp, pool_h = _spec(features.ucb_l), _spec(features.ucb_cp), _spec(features.ucb_h)
    tsb = _spec(features.tsb, width=config.hidden_size // n_heads)
    arms = [arm_layer_heads(parse_arm(a), config.fixed_layers, n_heads) for a in space.pool]
    acc = ArmFeatureAccumulator()
    assigned = 0

    def add_tsb(states: Tensor, mask: Tensor) -> None:
        pooled = pool_head_slices(states, mask, n_heads, tsb.seq_splits, tsb.hidden_splits)  # [B, N_H, F]
        for h in range(n_heads):
            acc.add(f"tsb/{h}", pooled[:, h])

    for input_ids, attention_mask in batches:
        width = int(attention_mask.sum(dim=1).max())  # padding beyond the longest sample costs without use
        ids = input_ids[:, :width].to(device)
        mask = attention_mask[:, :width].to(device)
        batch = ids.shape[0]

        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in range(1, n_layers + 1):
            acc.add(f"ucb_l/{layer}", pool_l(full[layer], mask).cpu())
            add_tsb(full[layer], mask)

        # Random-arm pass: round robin over a shuffled order covers the arms evenly across batches.
        order = torch.randperm(batch, generator=gen)
        arm_ids = torch.empty(batch, dtype=torch.long)
        arm_ids[order] = (assigned + torch.arange(batch)) % len(arms)
        assigned += batch
        depth, plan = random_arm_plan(arms, arm_ids, n_layers, n_heads, groups, gen)
        states = model(input_ids=ids, attention_mask=mask, depth=depth.to(device), heads=plan.to(device),
                       output_hidden_states=True).hidden_states
        for k, name in enumerate(space.pool):
            sel = (arm_ids == k).to(device)
            if sel.any() and name in space.cp_arms:
                acc.add(f"ucb_cp/{name}", pool_cp(states[len(arms[k])][sel], mask[sel]).cpu())
        for group in groups:
            end = group.stop
            ran = depth >= end
            kept = plan[:, group.start].sum(dim=1)
            for h in kept[ran].unique().tolist():
                sel = (ran & (kept == h)).to(device)
                acc.add(f"ucb_h/{h}", pool_h(states[end][sel], mask[sel]).cpu())
        for layer in range(1, n_layers + 1):
            sel = (depth >= layer).to(device)
            if sel.any():
                add_tsb(states[layer][sel], mask[sel])

    needed = ([f"ucb_l/{L}" for L in space.layer_options] + [f"ucb_h/{H}" for H in space.head_options]
              + [f"ucb_cp/{a}" for a in space.cp_arms])
    missing = [k for k in needed if k not in acc]
    if missing:
        raise ValueError(
            f"no sample reached arm(s) {', '.join(missing)}: the arm-feature pass saw too few samples "
            f"({assigned}) for {len(arms)} arms; raise dht.features.arm_feature_samples"
        )
    return {k: acc.mean(k).float() for k in acc}, {k: acc.count(k) for k in acc}


def iter_batches(
    parquet: str | Path, batch_size: int, limit: int | None = None, seed: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """(input_ids, attention_mask) batches streamed from a processed split, optionally a seeded random
    subset of `limit` rows (memory stays bounded on large datasets)."""
    import numpy as np
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(str(parquet))
    n = pf.metadata.num_rows
    keep = None
    if limit is not None and limit < n:
        keep = np.zeros(n, dtype=bool)
        keep[np.random.default_rng(seed).choice(n, size=limit, replace=False)] = True
    start = 0
    for record in pf.iter_batches(batch_size=batch_size, columns=["input_ids", "attention_mask"]):
        rows = record.num_rows
        width = record.schema.field("input_ids").type.list_size
        ids = record.column(0).flatten().to_numpy().reshape(rows, width)
        mask = record.column(1).flatten().to_numpy().reshape(rows, width)
        if keep is not None:
            sel = keep[start : start + rows]
            ids, mask = ids[sel], mask[sel]
        start += rows
        if len(ids):
            yield torch.from_numpy(ids.astype("int64")), torch.from_numpy(mask.astype("int64"))


def save_arm_features(
    out_dir: str | Path, features: dict[str, Tensor], counts: dict[str, int], info: dict[str, Any]
) -> dict[str, Any]:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in features.items()}, str(out / FEATURES_FILE))
    meta = {**info, "counts": counts, "sizes": {k: int(v.numel()) for k, v in features.items()}}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_arm_features(directory: str | Path) -> dict[str, Tensor]:
    """The arm features of a dataset, as written by the arm_features stage."""
    from safetensors.torch import load_file

    path = Path(directory) / FEATURES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; run the arm_features stage first (snakemake --cores 1 {path})"
        )
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({err}); rerun the arm_features stage") from err


def arm_matrix(features: dict[str, Tensor], bandit: str, arms: Iterable[Any]) -> Tensor:
    """Stack the features of `arms` of one bandit (`ucb_l`, `ucb_h`, `ucb_cp`, `tsb`) into [K, F]."""
    keys = [f"{bandit}/{a}" for a in arms]
    missing = [k for k in keys if k not in features]
    if missing:
        raise KeyError(
            f"arm features lack {', '.join(missing)}: they were computed for other arms; rerun the "
            "arm_features stage after changing dht.modes"
        )
    return torch.stack([features[k] for k in keys])
