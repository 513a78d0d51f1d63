"""Arm features (Section 4.2): one pass over the training samples through the model, without gradient, that
gives every bandit arm a feature vector z.

Which model (docs/paper-notes.md, row 10): the run's initial model, or, with ``dht.features.warmup_steps: N``,
a copy of it after N plain full-depth training steps (:func:`warm_up`). An identity initialisation
(``model.residual_init_scale: 0``) makes every layer the identity, so the initial model gives every depth and
every head count the same state; the warm-up gives the arms something to tell them apart. Training still
starts from the initial model. ``dht.features.refresh: epoch`` recomputes them from the model being trained
(:class:`dht.trainer.Trainer`).

- **UCB_L**, arm L: the mean of all samples' states after layer L (all heads).
- **UCB_H**, arm H: "each sample is randomly and evenly assigned a head number"; the mean of the states after
  every dynamic layer group that ran with H heads.
- **UCB_cp**, arm (L, H) (and P-DHT's segmented arms such as 4L8H+2L12H): the mean of all samples' states at
  layer L under that arm's exact plan, estimated from the samples that ran it (below).
- **TSB**, arm h: the h-th of N_H slices of the states along the hidden dimension, at every layer, with every
  head count, averaged.

Two forward passes per batch: the full model (UCB_L, TSB), and a *random-arm* pass in which every sample is
assigned one arm of the run's arm pool (round robin over a shuffled order, so arms are evenly covered) with a
random head subset per dynamic group (UCB_H, UCB_cp, TSB). Arms that resolve to the same per-layer plan (with
b = 3, P-DHT's 1L8H+2L12H runs three full layers: it is 3L12H) are one arm of the pool and get one vector.
Each state is reduced at once by the pooling of its bandit (Section 7.1) and only running sums are kept, so
memory does not grow with the dataset. Mean pooling is linear, so the mean of pooled states is the pooled mean
state (up to padding, where the per-sample reading is the sensible one).

UCB_cp and UCB_H estimate the mean state *of all samples* under the arm with the full model's state as a
control variate: z = mean over the samples that ran the arm of (arm state - full state at the same layer)
+ mean over all samples of the full state at that layer. Both passes see the same samples, so the difference
varies little from sample to sample: a few samples per arm estimate it well, where the plain mean over those
samples carried their sampling noise (on the tiny profile that noise, ~10% of the norm, exceeded the
difference between arms). The estimand is unchanged; an arm that keeps every head gets exactly UCB_L's state.

Keys: ``ucb_l/<L>``, ``ucb_h/<H>``, ``ucb_cp/<arm>``, ``tsb/<head index>``.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dht.arms import Arm, parse_arm
from dht.config import Config, FeaturesConfig, TrainConfig, with_warmup_modes
from dht.contexts import ArmFeatureAccumulator, multi_granularity_pool, pool_head_slices

FEATURES_FILE = "arm_features.safetensors"
META_FILE = "meta.json"


@dataclass(frozen=True)
class ArmSpace:
    """The arms a run's modes can choose, union over modes (and their warm-up modes)."""

    layer_options: tuple[int, ...]  # UCB_L (tree search)
    head_options: tuple[int, ...]  # UCB_H (tree search)
    cp_arms: tuple[str, ...]  # UCB_cp (integrated search) and fixed arms, as written in params.yaml
    pool: tuple[str, ...]  # arms of the random-arm pass: cp_arms and every tree combination


def arm_space(cfg: Config, modes: Iterable[str] | None = None, warmup_modes: bool = True) -> ArmSpace:
    """The arms of `modes` (default: the run's models) and, with `warmup_modes`, of their warm-up modes."""
    # dht.config.arm_feature_keys tracks the arms of these modes (the same with_warmup_modes)
    modes = list(cfg.run.models if modes is None else modes)
    if warmup_modes:
        modes = with_warmup_modes(cfg, modes)
    layers: set[int] = set()
    heads: set[int] = set()
    cp: dict[str, None] = {}
    for name in sorted(set(modes)):
        mode = cfg.dht.modes[name]
        layers.update(mode.layers or [])
        heads.update(mode.heads or [])
        for arm in mode.arms or []:
            cp[str(parse_arm(arm))] = None
    tree = {f"{L}L{H}H": None for L in sorted(layers) for H in sorted(heads)}
    return ArmSpace(tuple(sorted(layers)), tuple(sorted(heads)), tuple(cp), tuple({**cp, **tree}))


def arm_layer_heads(arm: Arm, fixed_layers: int, num_heads: int) -> list[int]:
    """Heads per layer for an arm (:meth:`dht.arms.Arm.layer_heads`: the first b layers always run every head,
    Section 4.2)."""
    return arm.layer_heads(fixed_layers, num_heads)


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


def distinct_plans(names: Iterable[str], fixed_layers: int, num_heads: int) -> tuple[list[list[int]], dict[str, int]]:
    """The distinct per-layer head plans of arms `names` and each arm's plan index (arms that run the same
    network, such as 1L8H+2L12H and 3L12H with b = 3, share one)."""
    plans: list[list[int]] = []
    index: dict[tuple[int, ...], int] = {}
    plan_of: dict[str, int] = {}
    for name in names:
        heads = arm_layer_heads(parse_arm(name), fixed_layers, num_heads)
        plan_of[name] = index.setdefault(tuple(heads), len(plans))
        if plan_of[name] == len(plans):
            plans.append(heads)
    return plans, plan_of


@torch.no_grad()
def compute_arm_features(
    model: torch.nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    space: ArmSpace,
    features: FeaturesConfig,
    seed: int = 0,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Mean pooled state per arm key over `batches` of (input_ids, attention_mask); see the module doc.

    The counts give the samples behind each key and, under ``pool/<arm>``, the samples of the random-arm pass
    that ran each distinct plan of the pool (what the pass cost)."""
    config = model.config
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    groups = config.dynamic_layer_groups()
    device = next(model.parameters()).device
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    pool_l, pool_cp, pool_h = features.ucb_l, features.ucb_cp, features.ucb_h
    arms, plan_of = distinct_plans(space.pool, config.fixed_layers, n_heads)
    cp_plans = sorted({plan_of[a] for a in space.cp_arms})
    acc = ArmFeatureAccumulator()  # UCB_L, TSB: plain means
    diff = ArmFeatureAccumulator()  # UCB_cp, UCB_H: arm state - full state (control variate, module doc)
    ref = ArmFeatureAccumulator()  # the full state's mean over all samples, per layer
    h_ends: Counter[tuple[int, int]] = Counter()  # (heads, group end) -> pairs behind ucb_h/<heads>
    ran_plan = torch.zeros(len(arms), dtype=torch.long)
    assigned = 0

    def add_tsb(states: Tensor, mask: Tensor) -> None:
        pooled = pool_head_slices(states, mask, n_heads, features.tsb)  # [B, N_H, F]
        for h in range(n_heads):
            acc.add(f"tsb/{h}", pooled[:, h])

    for input_ids, attention_mask in batches:
        width = int(attention_mask.sum(dim=1).max())  # padding beyond the longest sample costs without use
        ids = input_ids[:, :width].to(device)
        mask = attention_mask[:, :width].to(device)
        batch = ids.shape[0]

        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in range(1, n_layers + 1):
            acc.add(f"ucb_l/{layer}", multi_granularity_pool(full[layer], mask, pool_l).cpu())
            add_tsb(full[layer], mask)
        for layer in {len(arms[k]) for k in cp_plans}:
            ref.add(f"cp/{layer}", multi_granularity_pool(full[layer], mask, pool_cp).cpu())
        for group in groups:
            ref.add(f"h/{group.stop}", multi_granularity_pool(full[group.stop], mask, pool_h).cpu())

        # Random-arm pass: round robin over a shuffled order covers the arms evenly across batches.
        order = torch.randperm(batch, generator=gen)
        arm_ids = torch.empty(batch, dtype=torch.long)
        arm_ids[order] = (assigned + torch.arange(batch)) % len(arms)
        assigned += batch
        ran_plan += torch.bincount(arm_ids, minlength=len(arms))
        depth, plan = random_arm_plan(arms, arm_ids, n_layers, n_heads, groups, gen)
        states = model(input_ids=ids, attention_mask=mask, depth=depth.to(device), heads=plan.to(device),
                       output_hidden_states=True).hidden_states
        for k in cp_plans:
            sel = (arm_ids == k).to(device)
            if sel.any():
                layer = len(arms[k])
                m = mask[sel]
                arm_state = multi_granularity_pool(states[layer][sel], m, pool_cp)
                diff.add(f"cp/{k}", (arm_state - multi_granularity_pool(full[layer][sel], m, pool_cp)).cpu())
        for group in groups:
            end = group.stop
            ran = depth >= end
            kept = plan[:, group.start].sum(dim=1)
            for h in kept[ran].unique().tolist():
                sel = ran & (kept == h)
                h_ends[h, end] += int(sel.sum())
                sel, m = sel.to(device), mask[sel.to(device)]
                arm_state = multi_granularity_pool(states[end][sel], m, pool_h)
                diff.add(f"h/{h}", (arm_state - multi_granularity_pool(full[end][sel], m, pool_h)).cpu())
        for layer in range(1, n_layers + 1):
            sel = (depth >= layer).to(device)
            if sel.any():
                add_tsb(states[layer][sel], mask[sel])

    missing = [f"ucb_l/{L}" for L in space.layer_options if f"ucb_l/{L}" not in acc]
    missing += [f"ucb_h/{H}" for H in space.head_options if f"h/{H}" not in diff]
    missing += [f"ucb_cp/{a}" for a in space.cp_arms if f"cp/{plan_of[a]}" not in diff]
    if missing:
        raise ValueError(
            f"no sample reached arm(s) {', '.join(missing)}: the arm-feature pass saw too few samples "
            f"({assigned}) for {len(arms)} arms; raise dht.features.arm_feature_samples"
        )
    out = {k: acc.mean(k) for k in acc}
    counts = {k: acc.count(k) for k in acc}
    for name in space.cp_arms:
        k = plan_of[name]
        out[f"ucb_cp/{name}"] = diff.mean(f"cp/{k}") + ref.mean(f"cp/{len(arms[k])}")
        counts[f"ucb_cp/{name}"] = diff.count(f"cp/{k}")
    for h in sorted({h for h, _ in h_ends}):
        n = diff.count(f"h/{h}")
        mixed = sum(c / n * ref.mean(f"h/{end}") for (hh, end), c in sorted(h_ends.items()) if hh == h)
        out[f"ucb_h/{h}"] = diff.mean(f"h/{h}") + mixed
        counts[f"ucb_h/{h}"] = n
    first = {k: name for name, k in reversed(plan_of.items())}  # each plan under the first arm that names it
    counts.update({f"pool/{first[k]}": int(n) for k, n in enumerate(ran_plan.tolist())})
    return {k: v.float() for k, v in out.items()}, counts


def warm_up(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    steps: int,
    train: TrainConfig,
    seed: int = 0,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """A copy of `model` after `steps` plain training steps: full depth, every head, cross-entropy, the
    profile's optimiser (AdamW, ``train.learning_rate``, ``weight_decay``, ``grad_clip``, batches of
    ``train.batch_size`` in seeded random order, a linear ramp over ``warmup_ratio`` of the steps, then a
    constant rate). Only the arm features are computed from it (docs/paper-notes.md, row 10); `model` is left
    as it is. Returns the copy (in eval mode) and the mean loss of its first and last ten steps."""
    model = copy.deepcopy(model)
    if steps == 0:
        return model.eval(), {}
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    ramp = max(1, math.ceil(train.warmup_ratio * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / ramp))
    gen = torch.Generator().manual_seed(seed)
    n, q = labels.numel(), train.batch_size
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    model.train()
    # Dropout draws from the global generator: a forked one, seeded here, makes the copy depend on `seed` only
    # and leaves the caller's random state as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for step in range(steps):
            if order.numel() < min(q, n):  # every sample once per pass over the data, passes end to end
                order = torch.cat([order, torch.randperm(n, generator=gen)])
            index, order = order[:q], order[q:]
            mask = attention_mask[index]
            width = max(int(mask.sum(dim=1).max()), 1)
            logits = model(input_ids=input_ids[index, :width].to(device),
                           attention_mask=mask[:, :width].to(device)).logits
            loss = F.cross_entropy(logits, labels[index].to(device))
            if not torch.isfinite(loss):
                raise ValueError(f"non-finite loss in warm-up step {step + 1} of {steps}: lower "
                                 "train.learning_rate or dht.features.warmup_steps")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    tail = min(10, steps)
    return model.eval(), {"loss_first": sum(losses[:tail]) / tail, "loss_last": sum(losses[-tail:]) / tail}


FAMILIES = ("ucb_l", "ucb_h", "ucb_cp", "tsb")


def arm_separation(features: dict[str, Tensor], fixed_layers: int, num_heads: int) -> dict[str, dict[str, Any]]:
    """How well each family's vectors tell its arms apart: the smallest distance between two of them, relative
    to the family's mean norm, and that pair. UCB_cp arms that run the same network (distinct_plans) count
    once: their vectors are the same by construction. A family with one arm is left out."""
    out: dict[str, dict[str, Any]] = {}
    for family in FAMILIES:
        # one order whatever the dict's (a loaded file's keys are sorted): shorter names first, so 9 < 10
        names = sorted((k.split("/", 1)[1] for k in features if k.startswith(family + "/")), key=lambda n: (len(n), n))
        if family == "ucb_cp":
            _, plan_of = distinct_plans(names, fixed_layers, num_heads)
            names = [n for i, n in enumerate(names) if plan_of[n] not in {plan_of[m] for m in names[:i]}]
        if len(names) < 2:
            continue
        z = torch.stack([features[f"{family}/{n}"] for n in names]).double()
        dist = torch.cdist(z, z)
        dist.fill_diagonal_(math.inf)
        i, j = divmod(int(dist.argmin()), len(names))
        norm = float(z.norm(dim=1).mean())
        out[family] = {"min_relative_distance": float(dist[i, j]) / max(norm, 1e-12), "pair": [names[i], names[j]],
                       "mean_norm": norm, "arms": len(names)}
    return out


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
