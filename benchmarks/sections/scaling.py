"""Section 4: random-init models of the profile's architecture (no trained model needed): inference and one
training step of a DHT mode, its arms drawn uniformly at random (untrained bandits pick arbitrarily), against
12-VaBERT as sequence length and batch size grow, each wall-time ratio next to its FLOP ratio. It reuses
section 1's counterfactual (one head set per head count) and decision timers.

Read top to bottom: the random arms, the grid, one grid point (inference, training step), the section."""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from _common import fmt_ratio, fmt_seconds, interleaved, sync, table
from report import Section, shortfall_text

from dht.arm_features import arm_space, compute_arm_features
from dht.config import Config
from dht.evaluation import Predictions, SplitData, evaluate
from dht.model import DHTForSequenceClassification, model_from_params
from dht.policy import LayerQueue, Policy, predict
from dht.trainer import Trainer
from sections.inference import WALL_GOAL, median_decision_seconds, shared_head_sets
from sections.inputs import BenchmarkError, patched, synthetic_split


@contextmanager
def random_arms(policy: Policy, gen: torch.Generator) -> Iterator[None]:
    """LinUCB choices (UCB_L / UCB_cp, and UCB_H for tree search) drawn uniformly: untrained bandits would pick
    arbitrarily, so a known, even mix of the mode's arms makes the ratios mean something."""
    bandits = [b for b in (policy.ucb, policy.ucb_h) if b is not None]
    for b in bandits:
        def select(contexts: torch.Tensor, extra: Any = None, greedy: bool = False, allowed: Any = None,
                   k: int = b.num_arms) -> torch.Tensor:
            return torch.randint(k, (contexts.shape[0],), generator=gen)

        b.select = select
    try:
        yield
    finally:
        for b in bandits:
            del b.select


def depth_weights(policy: Policy) -> dict[int, tuple[float, list[int]]]:
    """L -> (share of uniformly drawn arms with that depth, the arm indices of that depth)."""
    arms = list(range(len(policy.layer_options))) if policy.search == "tree" else list(range(len(policy.arms)))
    layers = policy.layers_of(torch.tensor(arms)).tolist()
    out: dict[int, tuple[float, list[int]]] = {}
    for L in sorted(set(layers)):
        members = [a for a, la in zip(arms, layers, strict=True) if la == L]
        out[L] = (len(members) / len(arms), members)
    return out


def scaling_grid(seqs: list[int], batches: list[int]) -> list[tuple[int, int]]:
    """A cross through the middle values: every length at the middle batch, every batch at the middle length."""
    mid_s, mid_b = sorted(seqs)[len(seqs) // 2], sorted(batches)[len(batches) // 2]
    grid = [(s, mid_b) for s in sorted(seqs)] + [(mid_s, b) for b in sorted(batches) if b != mid_b]
    return list(dict.fromkeys(grid))


class ScalingPoint:
    """One (seq, batch) point of the scaling grid: 12-VaBERT and a DHT mode on the same random-init weights."""

    def __init__(self, cfg: Config, model: DHTForSequenceClassification, arm_feats: dict[str, torch.Tensor],
                 mode_name: str, data: SplitData, seq_len: int, batch: int, device: torch.device) -> None:
        self.cfg, self.model, self.arm_feats, self.mode_name = cfg, model, arm_feats, mode_name
        self.data, self.seq_len, self.batch, self.device = data, seq_len, batch, device
        self.arm_gen = torch.Generator()

    def _seeded_arms(self, policy: Policy) -> Any:
        self.arm_gen.manual_seed(self.cfg.training_seed)  # the same arms every run: the FLOP ratio holds for each timed run
        return random_arms(policy, self.arm_gen)

    def inference(self, repeats: int, warmup: int) -> dict[str, Any]:
        """Timing of predict over the split (12-VaBERT, the DHT mode, and the DHT mode with one head set per head
        count), the DHT's FLOP ratio by evaluate, and its decision time (in 12-VaBERT time units)."""
        cfg, model, shared = self.cfg, self.model, f"{self.mode_name} [one head set per count]"
        reference = cfg.run.reference
        ref_policy = Policy(cfg, cfg.dht.modes[reference], self.arm_feats, model.config)
        dht_policy = Policy(cfg, cfg.dht.modes[self.mode_name], self.arm_feats, model.config)

        def run_ref() -> Predictions:
            return predict(model, ref_policy, self.data, self.device, self.batch, self.seq_len)

        def run_dht() -> Predictions:
            with self._seeded_arms(dht_policy):
                return predict(model, dht_policy, self.data, self.device, self.batch, self.seq_len)

        def run_shared() -> Predictions:
            with shared_head_sets(dht_policy):
                return run_dht()

        flops = evaluate(run_dht(), self.data, model.config, self.seq_len, None)["infer_flop_ratio"]
        timing = interleaved({reference: lambda: run_ref().seconds, self.mode_name: lambda: run_dht().seconds,
                              shared: lambda: run_shared().seconds}, reference, repeats, warmup)
        decide = median_decision_seconds(run_dht, max(1, repeats // 2)) / timing.median(reference)
        heads = statistics.median(a - b for a, b in zip(timing.ratios[self.mode_name], timing.ratios[shared],
                                                            strict=True))
        return {"timing": timing, "flops": flops, "decisions": decide, "head sets": heads}

    def training(self, repeats: int, warmup: int) -> tuple[Any, float]:
        """One training step: S1 + depth decisions for `batch` samples entering the queues (Trainer._enqueue),
        then one queue batch of `batch` samples (Trainer.train_batch), its time averaged over the depths by how
        often uniform arms pick them. Returns (timing, the DHT's training FLOP ratio as the trainer counts it)."""
        cfg, batch, device = patched(self.cfg, **{"train.batch_size": self.batch}), self.batch, self.device
        reference = cfg.run.reference
        ref = Trainer(cfg, reference, copy.deepcopy(self.model), self.arm_feats, self.data, device,
                      seq_len=self.seq_len)
        dht = Trainer(cfg, self.mode_name, copy.deepcopy(self.model), self.arm_feats, self.data, device,
                      seq_len=self.seq_len)
        chunk = torch.arange(batch)
        policy, frozen = dht.active(dht.mode.warmup_epochs)  # P-DHT: its own phase, after the warm-up
        weights = depth_weights(policy)
        context = torch.zeros(policy.context_size)
        flop_parts: dict[int, float] = {}

        def ref_step() -> float:
            ref.queue = LayerQueue(batch)
            sync(device)
            start = time.perf_counter()
            for layers, items in ref._enqueue(ref.policy, chunk):  # one full queue of L = 12
                ref.train_batch(ref.policy, False, layers, items)
            sync(device)
            return time.perf_counter() - start

        def dht_step() -> float:
            with self._seeded_arms(policy):
                dht.queue = LayerQueue(batch)
                sync(device)
                start = time.perf_counter()
                dht._enqueue(policy, chunk)
                sync(device)
                total = time.perf_counter() - start
                for L, (share, members) in weights.items():
                    items = [(i, members[i % len(members)], context) for i in range(batch)]
                    before = dht.progress.train_flops
                    start = time.perf_counter()
                    dht.train_batch(policy, frozen, L, items)
                    sync(device)
                    total += share * (time.perf_counter() - start)
                    flop_parts[L] = dht.progress.train_flops - before
            return total

        timing = interleaved({reference: ref_step, self.mode_name: dht_step}, reference, repeats, warmup)
        flops = sum(share * flop_parts[L] for L, (share, _) in weights.items()) / (batch * dht.reference_step)
        return timing, flops


def scaling_section(cfg: Config, args: argparse.Namespace, device: torch.device) -> Section:
    title = "4. Scaling with sequence length and batch size (random-init models)"
    reference = cfg.run.reference
    mode_name = args.scaling_mode
    if mode_name not in cfg.dht.modes or cfg.dht.modes[mode_name].search == "fixed":
        raise BenchmarkError(f"--scaling-mode {mode_name!r} is not a DHT mode of profile '{cfg.profile}'; "
                             f"allowed: {', '.join(m for m, v in cfg.dht.modes.items() if v.search != 'fixed')}")
    grid = scaling_grid(args.scaling_seq, args.scaling_batch)
    max_seq = max(s for s, _ in grid)
    vocab, labels = 1000, 4
    scfg = patched(cfg, **{"model.max_position_embeddings": max(cfg.model.max_position_embeddings, max_seq),
                           # the modes in use (the profile's and the scaling mode): the others may be another
                           # profile's, with arms deeper than this model
                           "run.models": list(dict.fromkeys([*cfg.run.models, mode_name]))})
    torch.manual_seed(cfg.data_seed)  # as the arm_features stage builds the initial model
    model = model_from_params(scfg, labels, vocab).to(device)
    gen = torch.Generator().manual_seed(cfg.data_seed)
    space = arm_space(scfg)
    # Arm features from the random model itself (as the arm_features stage does for the initial model).
    feat_seq = min(s for s, _ in grid)
    n_batches = max(1, math.ceil(2 * len(space.pool) / 64))  # the random-arm pass must reach every arm
    batches = [(synthetic_split(64, feat_seq, vocab, labels, gen).input_ids,
                torch.ones(64, feat_seq, dtype=torch.long)) for _ in range(n_batches)]
    arm_feats, _ = compute_arm_features(model, batches, space, scfg.dht.features, seed=cfg.data_seed)

    infer_rows, train_rows, shortfalls = [], [], []
    print(f"[scaling] {mode_name} vs {reference} at (seq, batch) {grid}", flush=True)
    for seq_len, batch in grid:
        data = synthetic_split(2 * batch, seq_len, vocab, labels, gen)
        point = ScalingPoint(scfg, model, arm_feats, mode_name, data, seq_len, batch, device)
        res = point.inference(args.repeats, args.warmup)
        t, flops = res["timing"], res["flops"]
        wall = t.ratio(mode_name)
        rest = wall - flops - res["decisions"] - res["head sets"]
        infer_rows.append([seq_len, batch, fmt_seconds(t.median(reference)), fmt_seconds(t.median(mode_name)),
                           fmt_ratio(wall), fmt_ratio(flops), f"{wall / flops:.2f}", f"{res['decisions']:+.3f}",
                           f"{res['head sets']:+.3f}", f"{rest:+.3f}"])
        if wall > WALL_GOAL * flops:
            shortfalls.append(
                f"scaling, inference at seq {seq_len}, batch {batch}: wall {wall:.2f}x for {flops:.2f}x FLOPs "
                f"({wall / flops:.2f} > {WALL_GOAL}); in 12-VaBERT time: bandit decisions {res['decisions']:+.3f}, "
                f"per-sample head sets {res['head sets']:+.3f}, the rest (depth groups, small matrices, costs FLOPs "
                f"do not count) {rest:+.3f}")
        ts, train_flops = point.training(args.repeats, args.warmup)
        train_wall = ts.ratio(mode_name)
        train_rows.append([seq_len, batch, fmt_seconds(ts.median(reference)), fmt_seconds(ts.median(mode_name)),
                           fmt_ratio(train_wall), fmt_ratio(train_flops), f"{train_wall / train_flops:.2f}"])
    mix = depth_weights(Policy(scfg, scfg.dht.modes[mode_name], arm_feats, model.config))
    arms_note = "arms drawn uniformly: depth " + ", ".join(f"{L} {share:.0%}" for L, (share, _) in mix.items())
    body = [
        f"{mode_name} ({arms_note}; heads by the untrained TSB, i.e. per-sample sets) against {reference}, both "
        f"random-init at the profile's architecture (hidden {cfg.model.hidden_size}, "
        f"{cfg.model.num_hidden_layers} layers, {cfg.model.num_attention_heads} heads, FFN "
        f"{cfg.model.intermediate_size}), unpadded synthetic samples of exactly `seq` tokens. Median of "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up.",
        "",
        "Inference (`dht.policy.predict` over 2 batches; FLOP ratio by `evaluate`). As in section 1, in units of "
        "12-VaBERT's time: *decisions* = the bandits inside predict, *head sets* = the extra time of per-sample "
        "TSB head sets over one head set per head count (same FLOPs), *rest* = wall - FLOPs - both (depth "
        "groups, small matrices, work FLOPs do not count). Fixed per-batch costs shrink relative to the encoder "
        "as sequences and batches grow, so the ratio should approach the FLOP ratio down the table.",
        "",
        table(["seq", "batch", reference, mode_name, "wall ratio", "FLOP ratio", "wall / FLOPs", "decisions",
               "head sets", "rest"], infer_rows),
        "",
        "One training step: for DHT, S1 and the depth decisions for one batch of samples entering the queues "
        "(`Trainer._enqueue`) plus one queue batch (`Trainer.train_batch`: forward with the per-group head "
        "decisions, backward, optimizer step, bandit updates), the batch's time averaged over the depths with the "
        "uniform arms' frequencies; for 12-VaBERT the same two calls. FLOP ratio: the trainer's count for those "
        "batches. Below 1 in wall / FLOPs means more time saved than FLOPs: work the count leaves out shrinks "
        "with depth too (AdamW and gradient clipping skip the weights of layers a batch did not reach; element-wise "
        "ops; activation memory); not broken down here.",
        "",
        table(["seq", "batch", reference, mode_name, "wall ratio", "FLOP ratio", "wall / FLOPs"], train_rows),
        "",
        shortfall_text(shortfalls, f"inference goal (wall <= {WALL_GOAL} x FLOPs)"),
    ]
    return Section(title, "\n".join(body), shortfalls)
