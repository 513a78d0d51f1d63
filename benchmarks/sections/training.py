"""Section 2: one short epoch of each DHT mode and of 12-VaBERT through Trainer.fit, from the same initial weights;
the wall-time ratio next to the training FLOP ratio the trainer counts, and the share of the fit that the bandits,
pooling and queueing take (goal < 3%), from timers wrapped around the library's methods at runtime."""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import Timers, fmt_pct, fmt_ratio, fmt_seconds, instrumented, interleaved, sync, table
from report import Section, shortfall_text

import dht.arm_features
import dht.policy
from dht.arm_features import load_arm_features
from dht.bandits import LinUCB, LogisticThompsonHeads
from dht.config import Config
from dht.contexts import RunningNormalizer
from dht.evaluation import SplitData
from dht.model import DHTForSequenceClassification
from dht.policy import LayerQueue, Policy
from dht.trainer import Trainer
from sections.inputs import BenchmarkError, DataInfo, patched, subset

SHARE_GOAL = 0.03  # bandits + pooling + queueing < 3% of the training step time

# Training timers: (owner, method, label). Exclusive times, so nested labels do not double count. Pooling is a
# function: timed where the policy and the arm-feature refresh (dht.features.refresh) look it up.
TRAIN_TIMERS: list[tuple[Any, str, str]] = [
    (dht.policy, "multi_granularity_pool", "pooling"),
    (dht.arm_features, "multi_granularity_pool", "pooling"),
    (RunningNormalizer, "__call__", "normalisation"),
    (LinUCB, "select", "LinUCB select"),
    (LinUCB, "update", "LinUCB update"),
    (LogisticThompsonHeads, "select", "TSB select"),
    (LogisticThompsonHeads, "update", "TSB update"),
    (Policy, "arm_context", "policy glue"),
    (Policy, "decide_arms", "policy glue"),
    (Policy, "head_contexts", "policy glue"),
    (Policy, "decide_heads", "policy glue"),
    (Policy, "layers_of", "policy glue"),
    (Policy, "learn", "rewards"),
    (Policy, "stop_context", "policy glue"),  # search: sequential (docs/training.md T31)
    (Policy, "decide_stops", "policy glue"),
    (Policy, "learn_sequential", "rewards"),
    (LayerQueue, "push", "queueing"),
    (LayerQueue, "drain", "queueing"),
    (Trainer, "_enqueue", "queueing"),
    (DHTForSequenceClassification, "encode_prefix", "S1 pass"),
    (Trainer, "_account", "FLOP accounting"),
    (SplitData, "batch", "data"),
]
# The goal's three parts: what DHT adds around the encoder.
OVERHEAD_GROUPS: dict[str, list[str]] = {
    "bandits": ["LinUCB select", "LinUCB update", "TSB select", "TSB update", "rewards", "policy glue"],
    "pooling": ["pooling", "normalisation"],
    "queueing": ["queueing"],
}


def training_config(cfg: Config) -> Config:
    """One epoch; P-DHT (any mode with a warm-up) in its own phase from the first step, since its warm-up steps
    are the warm-up mode's (F-DHT's row)."""
    changes: dict[str, Any] = {"train.epochs": 1}
    for name, mode in cfg.dht.modes.items():
        if mode.warmup_mode:
            changes[f"dht.modes.{name}.warmup_epochs"] = 0
    return patched(cfg, **changes).for_training_seed(cfg.training_seed)  # the patched copy forgets the run's seed


def training_section(cfg: Config, args: argparse.Namespace, root: Path, device: torch.device) -> Section:
    dataset = args.dataset
    title = "2. Training: wall time vs FLOPs, and the bandits' share"
    processed = root / "data" / "processed" / dataset
    features = root / "data" / "features" / dataset
    needed = [processed / "train.parquet", features / "init_model" / "config.json",
              features / "arm_features.safetensors"]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        why = (f"{', '.join(str(p) for p in missing)} not found; make them with "
               f"`snakemake --cores 4 {features.relative_to(root)}/meta.json"
               + ("" if cfg.profile == "default" else f" --config profile={cfg.profile}") + "`")
        if not args.quick:
            raise BenchmarkError(why)
        return Section(title, f"Skipped: {why}.", [f"training not measured: {why}"])
    q = cfg.train.batch_size
    data = DataInfo.load(processed, "train")
    init = DHTForSequenceClassification.from_pretrained(features / "init_model", use_safetensors=True).to(device)
    c = init.config
    why = data.problem(str(features / "init_model"), c.vocab_size, c.max_position_embeddings, c.num_labels)
    if why:
        why += ("; the data and the features come from different runs, rebuild them together: `snakemake --cores 4 "
                f"{features.relative_to(root)}/meta.json"
                + ("" if cfg.profile == "default" else f" --config profile={cfg.profile}") + "`")
        if not args.quick:
            raise BenchmarkError(why)
        return Section(title, f"Skipped: {why}.", [f"training not measured: {why}"])
    arm_features = load_arm_features(features)
    n = min(args.train_steps * q, len(data.split))
    order = torch.randperm(len(data.split), generator=torch.Generator().manual_seed(cfg.training_seed))[:n]
    train = subset(data.split, order)
    seq_len = int(data.meta["max_length"])
    bench_cfg = training_config(cfg)
    reference = cfg.run.reference
    modes = list(dict.fromkeys([reference, *[m for m in cfg.run.models if m in cfg.dht.modes]]))

    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    timers = Timers()

    def fit(mode: str) -> float:
        model = copy.deepcopy(init)  # the same initial weights for every mode and round
        trainer = Trainer(bench_cfg, mode, model, arm_features, train, device, seq_len=seq_len)
        torch.manual_seed(cfg.training_seed)  # the same dropout masks: every round does the same work
        timers.reset()
        with instrumented(timers, TRAIN_TIMERS):
            sync(device)
            start = time.perf_counter()
            progress = trainer.fit(progress_bar=False)
            sync(device)
            seconds = time.perf_counter() - start
        results[mode].append({"seconds": seconds, "timers": timers.snapshot(), "steps": progress.step,
                              "flop_ratio": progress.train_flops / progress.reference_flops})
        return seconds

    print(f"[training] {len(modes)} modes x {args.warmup + args.repeats} rounds, {n} samples each", flush=True)
    timing = interleaved({m: (lambda m=m: fit(m)) for m in modes}, reference, args.repeats, args.warmup)
    kept = {m: r[args.warmup:] for m, r in results.items()}  # the warm-up rounds' records are discarded too

    rows, share_rows, shortfalls = [], [], []
    for mode in modes:
        runs = kept[mode]
        flops = statistics.median(r["flop_ratio"] for r in runs)
        steps = runs[0]["steps"]
        wall = timing.ratio(mode)
        lo, hi = timing.spread(mode)
        per_step = timing.median(mode) / steps
        rows.append([mode, steps, fmt_seconds(per_step), f"{wall:.2f}x ({lo:.2f}-{hi:.2f})", fmt_ratio(flops),
                     f"{wall / flops:.2f}"])

        def share(labels: list[str], runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(sum(r["timers"].get(k, 0.0) for k in labels) / r["seconds"] for r in runs)

        parts = {group: share(labels) for group, labels in OVERHEAD_GROUPS.items()}
        total = sum(parts.values())
        s1 = share(["S1 pass"])
        accounting = share(["FLOP accounting"])
        is_dht = mode != reference
        goal = ("yes" if total < SHARE_GOAL else "**no**") if is_dht else "—"
        share_rows.append([mode, fmt_pct(parts["bandits"]), fmt_pct(parts["pooling"]), fmt_pct(parts["queueing"]),
                           fmt_pct(total), goal, fmt_pct(s1), fmt_pct(accounting)])
        if is_dht and total >= SHARE_GOAL:
            labels = [k for group in OVERHEAD_GROUPS.values() for k in group]
            ms = {k: statistics.median(r["timers"].get(k, 0.0) / r["steps"] for r in runs) * 1e3 for k in labels}
            top = sorted(ms.items(), key=lambda kv: kv[1], reverse=True)[:4]
            where = ", ".join(f"{k} {v:.2f} ms/step" for k, v in top if v > 0)
            shortfalls.append(f"training {mode}: bandits + pooling + queueing take {total:.1%} of the step time "
                              f"(goal < {SHARE_GOAL:.0%}), at {per_step * 1e3:.0f} ms per step; "
                              f"where it goes: {where}")

    body = [
        f"{n} training samples (`--train-steps` {args.train_steps} x `train.batch_size` {q}), one epoch through "
        f"`Trainer.fit` per mode, from `{features.relative_to(root) if features.is_relative_to(root) else features}"
        f"/init_model` and its arm features, on {device}. Wall ratio: to {reference}'s fit in the same round, median "
        f"of {args.repeats} rounds after {args.warmup} warm-up (min-max). FLOP ratio: the trainer's own count for "
        "these steps (`train_flops / reference_flops`, the pipeline's `train_flop_ratio`). DHT modes take more "
        "steps than 12-VaBERT: partly filled depth queues are trained at the epoch's end (Algorithm 3), which a "
        "short epoch makes relatively more frequent. P-DHT: its frozen phase only (its warm-up is F-DHT).",
        "",
        table(["mode", "steps", "time / step", "wall ratio", "FLOP ratio", "wall / FLOPs"], rows),
        "",
        "Share of the fit's wall time (timers wrapped around the methods at runtime; exclusive times, no double "
        "counting): *bandits* = LinUCB and TSB selection and updates, rewards, the policy's tensor glue; "
        "*pooling* = multi-granularity pooling and running normalisation; *queueing* = Algorithm 3's depth queues "
        "and the enqueue loop. Goal: their sum < 3% for the DHT modes. For reference, not in the goal: the S1 "
        "pass (encoder work the FLOP ratio counts) and the trainer's FLOP accounting (12-VaBERT pays it too).",
        "",
        table(["mode", "bandits", "pooling", "queueing", "sum", "< 3%", "S1 pass", "FLOP accounting"], share_rows),
        "",
        shortfall_text(shortfalls, "3% goal"),
    ]
    return Section(title, "\n".join(body), shortfalls)
