"""DHT training and inference: Algorithm 2 (architecture space search) and Algorithm 3 (queueing).

One epoch (Algorithm 3 around Algorithm 2):

1. the training samples are visited in a seeded random order, in rounds of q (``train.queue_size``, = train.batch_size);
2. each sample's state S1 is the output of the first b layers with the current weights, without gradient
   (Algorithm 2, line 2); UCB_L (tree search) or UCB_cp (integrated search) picks its depth L (lines 3-6) and
   the sample joins the queue of its L (Algorithm 3, line 2);
3. a full queue releases a batch (Algorithm 3, lines 3-5): the batch re-passes the b layers with gradient
   (S2,0, line 7), then for each group of c layers UCB_H (tree) picks the number of heads and the TSB picks
   which heads, from the state reached so far, and the batch runs those c layers (lines 9-14); the loss gives
   the rewards of Section 4.3 and every bandit is updated (lines 15-16);
4. at the end of the epoch the partly filled queues are trained too: every sample is used exactly once.

12-VaBERT (BL1) is the same loop with one fixed arm (12L12H): no S1 pass, no bandits.

The loop runs in a :class:`~dht.distributed.World`: one process, or N ranks under torchrun (docs/distributed.md) in
lockstep, each queueing its share of every epoch, the bandits deciding jointly on every rank's contexts, the
gradient pass under DDP and every rank replaying every rank's bandit updates. With one process every collective is
the identity, so there is one loop, and every mode and lever runs on any number of processes.

The bandits' decisions and updates, the queues and inference live in :mod:`dht.policy`; what a model is
evaluated on and the metrics in :mod:`dht.evaluation`. This module is the training loop around them, its
checkpoints, and saving / loading a trained model with its bandits.

Readings of the paper taken here are listed in docs/training.md.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dht.arm_features import ArmSpace, arm_layer_heads, arm_matrix, arm_space, compute_arm_features
from dht.arms import parse_arm
from dht.config import Config, ModeSpec, run_param_keys
from dht.distributed import World, digest, shard, share_length
from dht.evaluation import SplitData
from dht.flops import (
    depth_feedback_flops,
    exit_loss_flops,
    exit_pass_flops,
    forward_flops,
    full_model_flops,
    train_flops,
)
from dht.guard import FiniteGuard, TrainingError  # noqa: F401 (TrainingError: raised and re-exported here)
from dht.integrity import IntegrityError, read_checkpoint, write_checkpoint
from dht.model import DHTForSequenceClassification
from dht.policy import Decision, LayerQueue, Policy, exit_uncertainty
from dht.results import POLICY_FILE
from dht.walk import At, Next, Run, exit_logits, path_points, start, walk

BANDITS_FILE = "bandits.pt"
CHECKPOINT_FILE = "checkpoint.pt"


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Everything a resumed run needs to continue exactly where it stopped."""

    epoch: int = 0
    position: int = 0  # samples of this epoch's order (a distributed run: of each rank's share) sent to the queues
    step: int = 0
    train_flops: float = 0.0
    reference_flops: float = 0.0
    samples_seen: int = 0
    seconds: float = 0.0
    selections: dict[str, dict[str, int]] = field(default_factory=dict)  # per epoch: "layers/6" -> count
    pending_log: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, layers) not yet logged
    history: list[tuple[int, int, float, float]] = field(default_factory=list)  # (step, epoch, loss, layers)
    run_id: str | None = None  # the MLflow run, resumed with the checkpoint


def run_params(cfg: Config, mode_name: str) -> dict[str, Any]:
    """:func:`run_param_keys` with their resolved values, the mode's own entry as `mode` (and its warm-up mode's
    as `warmup_mode`, the reference's as `reference_mode` with ``init: reference``), so that every model's MLflow
    run has the same parameter names; and the run's training seed (not a key: one of run.training_seeds)."""
    out: dict[str, Any] = {"training_seed": cfg.training_seed}
    warmup = cfg.dht.modes[mode_name].warmup_mode
    for key in run_param_keys(cfg, mode_name):
        # the mode's own name wins: a reference's run calls its entry `mode`
        name = {f"dht.modes.{cfg.run.reference}": "reference_mode", f"dht.modes.{warmup}": "warmup_mode",
                f"dht.modes.{mode_name}": "mode"}.get(key, key)
        out[name] = cfg.section(key)
    return out


def fingerprint(cfg: Config, mode_name: str, dataset: str, data_meta: dict[str, Any]) -> str:
    """Hash of everything that makes a checkpoint belong to this run: what it reads (:func:`run_params`), the
    dataset and its data."""
    payload = {"mode_name": mode_name, "dataset": dataset, "data": data_meta, **run_params(cfg, mode_name)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


Batch = tuple[int, list[tuple[int, int, Tensor]]]  # (L, [(sample index, arm, context)]) as a queue releases it


class Trainer:
    """Trains one mode on one dataset (Algorithms 2-3), resumable, on one process or on the ranks of a
    :class:`~dht.distributed.World` in lockstep, and evaluates it (inference policy)."""

    def __init__(self, cfg: Config, mode_name: str, model: DHTForSequenceClassification, arm_features: dict[str, Tensor],
                 train: SplitData, device: torch.device, seq_len: int, checkpoint_dir: Path | None = None,
                 run_fingerprint: str = "", on_step: Callable[[int], None] | None = None, world: World | None = None):
        self.cfg = cfg
        self.mode_name = mode_name
        self.mode = cfg.dht.modes[mode_name]
        self.model = model.to(device)
        self.device = device
        self.train_data = train
        self.seq_len = seq_len
        self.checkpoint_dir = checkpoint_dir
        self.fingerprint = run_fingerprint
        self.on_step = on_step
        self.arm_features = arm_features
        self.warmup = cfg.dht.modes[self.mode.warmup_mode] if self.mode.warmup_mode else None
        self.policy = Policy(cfg, self.mode, arm_features, model.config)
        self.warmup_policy = Policy(cfg, self.warmup, arm_features, model.config) if self.warmup else None
        # dht.features.refresh = epoch (docs/training.md, T14): the arms of each policy's own mode, for the
        # pass that recomputes their features from the model being trained
        self.refresh_spaces: dict[int, ArmSpace] = {}
        if cfg.dht.features.refresh == "epoch":
            for policy, name in ((self.policy, mode_name), (self.warmup_policy, self.mode.warmup_mode)):
                if policy is not None and policy.search != "fixed":
                    self.refresh_spaces[id(policy)] = arm_space(cfg, [name], warmup_modes=False)
        # The processes this model trains on (docs/distributed.md; None: this one alone), what runs the gradient pass
        # (DDP around the model with several), the batches the queues released that wait for a step every rank takes,
        # and with several ranks what a run leaves for its checks: the samples this rank trained per epoch (when set)
        # and the digests of the weights and bandits, equal on every rank.
        self.world = world if world is not None else World(device=device)
        self.parallel: Callable[[Callable[[], Tensor]], Tensor] | None = self.world.parallel(self.model)
        self.ready: list[Batch] = []
        self.trace: dict[str, list[int]] | None = None
        self.digests: tuple[str, str] | None = None
        q = cfg.train.queue_size
        # global: one set of queues for all ranks; read with several processes only (one process has one set either
        # way, and its training must not depend on, nor rerun for, a key it cannot act on)
        self.global_queues = self.world.size > 1 and cfg.train.distributed.queues == "global"
        self.queue = LayerQueue(q * self.world.size if self.global_queues else q)
        share = share_length(len(train), self.world.size)  # samples this rank queues an epoch
        steps_per_epoch = math.ceil(share / q) + 8  # queues release at most a few partial batches more
        total = steps_per_epoch * cfg.train.epochs
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate,
                                           weight_decay=cfg.train.weight_decay)
        warm = int(cfg.train.warmup_ratio * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / max(warm, 1), max(0.0, (total - s) / max(total - warm, 1))))
        self.progress = Progress()
        self.reference_step = full_model_flops(seq_len, model.config, "full", "train")

    # ---- which policy is active ----------------------------------------------------------------------------

    def active(self, epoch: int) -> tuple[Policy, bool]:
        """(policy, frozen) for an epoch: P-DHT runs its warm-up mode first, then its own arms, frozen."""
        if self.warmup_policy is not None and epoch < self.mode.warmup_epochs:
            return self.warmup_policy, False
        return self.policy, self.warmup_policy is not None and self.cfg.dht.p_dht_freeze != "none"

    # ---- epochs (Algorithm 3) --------------------------------------------------------------------------------

    def order(self, epoch: int) -> Tensor:
        return torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(self.cfg.training_seed * 1000 + epoch))

    def fit(self, log: Callable[[list[tuple[int, float, float]], Progress], None] | None = None,
            progress_bar: bool = True) -> Progress:
        """Train every epoch, resuming from a checkpoint when one fits; returns the accounting.

        Each rank queues its share of the epoch's order (:func:`dht.distributed.shard`; one process: all of it) in
        rounds of q (Algorithm 3) into its own per-L queues, or every rank's rows into one shared set
        (``train.distributed.queues: global``); the depth decisions of a round are taken jointly on every rank's
        contexts (:meth:`_enqueue`), the released batches train in steps every rank takes together
        (:meth:`_train_ready`, :meth:`train_batch`), and at the end of the epoch the partly filled queues train too:
        every sample once per epoch. With several ranks every rank ends with the same weights and bandits
        (checked)."""
        from dht import progress

        cfg, p, world = self.cfg, self.progress, self.world
        q = cfg.train.queue_size
        length = share_length(len(self.train_data), world.size)
        start_time = time.perf_counter() - p.seconds
        since_checkpoint = 0
        while p.epoch < cfg.train.epochs:
            policy, frozen = self.active(p.epoch)
            if p.epoch > 0 and p.position == 0:
                # Position 0: no sample of this epoch has been queued. A checkpoint with position 0 was written at
                # the end of the previous epoch, before these, so a resumed run does them here too.
                if id(policy) in self.refresh_spaces:
                    self._refresh_arm_features(policy)
                if policy.mode.depth_memory == "epoch":
                    policy.forget_depths()  # T28
            share = shard(self.order(p.epoch), world.rank, world.size)
            bar = progress.bar(length, f"{self.mode_name} epoch {p.epoch + 1}/{cfg.train.epochs}", initial=p.position,
                               unit="sample", enabled=progress_bar and world.is_main)
            while p.position < length:  # rounds in lockstep: a shorter share sends an empty chunk last
                self.ready += self._enqueue(policy, share[p.position : p.position + q])
                since_checkpoint += self._train_ready(policy, frozen, drain=False)
                done = min(q, length - p.position)
                p.position += done
                bar.update(done)
                if p.pending_log:
                    recent = p.pending_log[-10:]
                    bar.set_postfix(loss=f"{np.mean([x[1] for x in recent]):.3f}",
                                    layers=f"{np.mean([x[2] for x in recent]):.1f}", refresh=False)
                if since_checkpoint >= cfg.train.checkpoint_every and p.position < length:
                    self._checkpoint_now(log, start_time)
                    since_checkpoint = 0
            self.ready += self.queue.drain()  # partly filled queues: every sample once per epoch
            self._train_ready(policy, frozen, drain=True)
            progress.finish(bar)
            self._end_epoch(log, start_time)
            since_checkpoint = 0
        p.seconds = time.perf_counter() - start_time
        self._check_in_step()
        return p

    def _enqueue(self, policy: Policy, chunk: Tensor) -> list[Batch]:
        """S1 and the depth decision for a round of samples (``chunk``: this rank's part of it); the queues that fill
        up (Algorithm 2, lines 2-6; Algorithm 3, lines 2-5).

        The decision is joint: every rank pools the S1 contexts of its own chunk, they are gathered in rank order and
        UCB_L / UCB_cp decide on all of them on every rank (the same normaliser update, the same draws). Each rank
        queues its own rows, or, with ``train.distributed.queues: global``, every rank's rows in its copy of the
        shared queues."""
        x = None
        if policy.uses_s1 and len(chunk):
            ids, mask, _ = self.train_data.batch(chunk, self.device)
            self.model.eval()  # S1: the previous weights, no gradient, no dropout
            with torch.no_grad():
                s1 = self.model.encode_prefix(ids, mask)
                u = exit_uncertainty(self.model, s1, mask) if policy.exit_confidence else None
            x = policy.arm_context(s1, mask, u)
        parts = self.world.all_gather((chunk, x))
        chunks = [c for c, _ in parts]
        total = sum(map(len, chunks))
        if not total:
            return []
        rows = [x for _, x in parts if x is not None]
        arm, context = policy.decide_arms(torch.cat(rows) if rows else None, total, greedy=False, learn=True)
        if not self.global_queues:  # this rank queues its own rows
            first = sum(map(len, chunks[: self.world.rank]))
            arm, context, chunks = arm[first : first + len(chunk)], context[first : first + len(chunk)], [chunk]
        layers = policy.layers_of(arm)
        released = []
        for row, index in enumerate(torch.cat(chunks).tolist()):  # rank order, as the decisions
            full = self.queue.push(int(layers[row]), index, int(arm[row]), context[row])
            if full is not None:
                released.append((int(layers[row]), full))
        return released

    def _train_ready(self, policy: Policy, frozen: bool, drain: bool) -> int:
        """Train the ready batches in steps every rank takes together; returns the steps taken.

        Within an epoch, as many steps as the rank with the fewest ready batches has (the others' wait for the next
        round: a rank's released batches never run ahead of another's by more than its number of queues); at the
        epoch's end (``drain``), as many as the rank with the most, the others taking part with an empty batch. With
        ``queues: global`` every rank holds the same released batches: each is one step, split over the ranks (every
        size-th sample from the rank's on; a rank left without samples takes part with an empty batch). One process
        trains every batch as it is released."""
        world = self.world
        if self.global_queues:
            released, self.ready = self.ready, []
            for layers, items in released:
                self.train_batch(policy, frozen, layers, items[world.rank :: world.size])
            return len(released)
        sizes = world.all_gather(len(self.ready))
        steps = max(sizes) if drain else min(sizes)
        mine, self.ready = self.ready[:steps], self.ready[steps:]
        for j in range(steps):
            layers, items = mine[j] if j < len(mine) else (0, [])
            self.train_batch(policy, frozen, layers, items)
        return steps

    # ---- one step (Algorithm 2, lines 7-16) --------------------------------------------------------------------

    def train_batch(self, policy: Policy, frozen: bool, layers: int, items: list[tuple[int, int, Tensor]]) -> float:
        """One optimizer step of every rank: this rank's queue batch ``items``, all of depth ``layers`` (none: an
        empty part, with which a rank takes part in a step of the others); returns the step's loss.

        UCB_H and the TSB decide each group's heads from the states reached so far (jointly over the ranks, from the
        clean states of an eval-mode pass or, with ``decision_states: train``, from this pass's), the batch runs its
        layers with gradient, and the loss gives every bandit its update (Section 4.3). The gradient pass runs under
        the world's DDP, whose all-reduce averages the ranks' gradients: each rank's loss is its samples' summed
        loss x ranks / the step's samples on all ranks, so the step's gradient is the mean over all of them. The
        ranks' decisions and losses are gathered and every rank replays every rank's bandit updates and accounting
        in rank order, so the bandits and the accounting stay identical on every rank."""
        model, cfg, world, p = self.model, self.cfg, self.world, self.progress
        n = len(items)
        index = torch.tensor([i for i, _, _ in items], dtype=torch.long)
        arm = torch.tensor([a for _, a, _ in items], dtype=torch.long)
        context = torch.stack([c for _, _, c in items]) if policy.uses_s1 and n else torch.zeros(n, 0)
        ids = mask = labels = None
        trainable: set[int] = set()
        if n:
            ids, mask, labels = self.train_data.batch(index, self.device)
            trainable = self._trainable_layers(layers, frozen)
        decided: list[dict[str, Any]] | None = None
        decision_layers = 0  # layers of the eval-mode decision pass, for the FLOP count
        seq = self._sequential_pass(policy, ids, mask, labels) if policy.search == "sequential" else None
        if policy.search == "sequential":  # T31: the heads, the stops and every exit's error from one no-grad pass
            decided = seq["groups"] if seq is not None else []  # no batch: it took part in the pass's decisions
        elif cfg.dht.decision_states == "clean" and policy.search != "fixed":
            # UCB_H and the TSB decide from the states inference would give them (no dropout, the current
            # weights: S2,0 and S2,l of Algorithm 2 without the training noise); docs/training.md, T2.
            decided = self._clean_decisions(policy, ids, mask, arm, layers)
            if decided:
                decision_layers = policy.groups[len(decided) - 1].start
        depth_losses = self._depth_losses(policy, ids, mask, labels) if n and self._all_depths(policy) else None
        # exit_loss: path (T26): the classifier also reads, and trains on, every shallower depth option passed
        exits = set(policy.layer_options) - {layers} if policy.mode.exit_loss == "path" else set()
        reads: list[Tensor] = []  # per-sample losses of every exit read with gradient, the chosen depth's first
        groups: list[dict[str, Any]] = []
        heads_rows = torch.full((n, layers), model.config.num_attention_heads, dtype=torch.long)
        if seq is not None:  # a path's layers are filled in as it runs them
            heads_rows[:, policy.b :] = 0

        def gradient_pass() -> Tensor:
            if not n:  # an empty part: one parameter in the graph, so DDP all-reduces (zeros) with the others
                if decided is None:
                    self._take_part(policy, 0)
                return model.classifier.weight.sum() * 0.0
            exit_reads: list[Tensor] = []
            chosen: list[Tensor] = []
            if seq is not None:
                groups[:] = seq["groups"]
                walk(start(model, ids, mask), path_points(model.config, layers), self._sequential_reads(
                    policy, seq, labels, heads_rows, reads), run=self._runner(trainable))
                return reads[0].sum()

            def at_point(at: At) -> Next | None:
                if at.next is None:  # L: the chosen depth's exit
                    chosen.append(at.logits())
                    return None
                if at.depth in exits:
                    exit_reads.append(F.cross_entropy(at.logits(), labels, reduction="none"))
                if decided is not None:
                    info = decided[at.group]
                else:  # decision_states: train (or one fixed arm), the dropout-noised states of this pass
                    info = self._choose_heads(policy, at.group, at.state.detach(), at.mask, arm)
                plan = info["plan"][:, : at.next - at.depth]
                heads_rows[:, at.depth : at.next] = plan.sum(dim=2)
                groups.append(info)
                return Next(heads=plan)

            # S2,0 (the b layers again, with gradient), then group by group to L
            walk(start(model, ids, mask), path_points(model.config, layers), at_point, run=self._runner(trainable))
            if decided is None:
                self._take_part(policy, len(groups))
            # the chosen depth's per-sample loss (what the bandits learn), then the exits'; every read weighs the
            # same, and a sample's loss keeps the scale of one cross-entropy
            reads[:] = [F.cross_entropy(chosen[0], labels, reduction="none"), *exit_reads]
            return (torch.stack(reads) if len(reads) > 1 else reads[0]).sum()

        model.train()
        out = self.parallel(gradient_pass)
        record = None if not n else {
            "index": index, "arm": arm, "context": context, "layers": layers, "out": out.detach().cpu(),
            "reads": len(reads), "loss": reads[0].detach().double().cpu(),
            "depth_losses": None if depth_losses is None else depth_losses.cpu(), "groups": groups,
            "sequential": None if seq is None else {key: seq[key] for key in ("contexts", "errs", "depth", "exits",
                                                                              "stop_loss", "pass_heads")},
            "heads_rows": heads_rows, "trainable": sorted(trainable), "decision_layers": decision_layers,
            "embeddings_train": any(q.requires_grad for q in model.bert.embeddings.parameters())}
        records = world.all_gather(record)
        ranks = [r for r, rec in enumerate(records) if rec is not None]  # the ranks with samples in this step
        done = [records[r] for r in ranks]
        total = sum(len(rec["index"]) for rec in done)

        def scale(x: Tensor, rec: dict[str, Any]) -> Tensor:  # a rank's summed reads -> its share of the step's mean
            return x / (rec["reads"] * total / world.size)

        values = [float(scale(rec["out"], rec)) for rec in done]
        for r, rec, value in zip(ranks, done, values, strict=True):
            if not math.isfinite(value):
                rank = f", on rank {r}" if world.size > 1 else ""
                raise TrainingError(
                    f"non-finite loss ({value}) at epoch {p.epoch + 1}, step {p.step + 1}{rank}, in a batch of "
                    f"{len(rec['index'])} samples with L = {rec['layers']} (sample indices {rec['index'][:8].tolist()}"
                    "...); lower train.learning_rate or check the data; no model was written"
                )
        loss = scale(out, record) if n else out
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        for rec in done:  # rank order: "the previous batch" of a reward is the previous one of this order
            if rec["sequential"] is not None:
                sq = rec["sequential"]
                policy.learn_sequential(sq["contexts"], sq["errs"], rec["groups"], sq["stop_loss"], sq["depth"])
            else:
                policy.learn(Decision(rec["arm"], rec["context"], rec["layers"]), rec["groups"], rec["loss"],
                             rec["depth_losses"])
            self._account(policy, rec["layers"], rec["heads_rows"], set(rec["trainable"]), rec["groups"], rec["arm"],
                          rec["decision_layers"], rec["embeddings_train"], exits=rec["reads"] - 1,
                          sequential=rec["sequential"])
        if self.trace is not None and n:
            self.trace.setdefault(str(p.epoch), []).extend(index.tolist())
        p.step += 1
        # a non-finite loss stopped above; a weight the update made non-finite stops here (dht.guard)
        FiniteGuard(f"train {self.mode_name}", f"lower train.learning_rate (now {cfg.train.learning_rate:g})"
                    ).parameters(model.named_parameters(), p.step, p.epoch + 1)
        loss_value = sum(values) / world.size  # the mean over the step's samples on every rank
        layers_value = float(sum(float(rec["sequential"]["depth"].sum()) if rec["sequential"] is not None
                                 else len(rec["index"]) * rec["layers"] for rec in done) / total)
        p.pending_log.append((p.step, loss_value, layers_value))
        p.history.append((p.step, p.epoch, loss_value, layers_value))
        if self.on_step is not None:
            self.on_step(p.step)
        return loss_value

    def _choose_heads(self, policy: Policy, g: int, state: Tensor | None, mask: Tensor | None,
                      arm: Tensor | None) -> dict[str, Any] | None:
        """UCB_H (tree) and the TSB for group g (Algorithm 2, lines 9-13) on the rows of every rank whose path
        reaches it (``state`` None: this rank's does not): contexts gathered in rank order, one decision on all of
        them on every rank, this rank's rows returned ({} when it has none; None when no rank reaches the group).
        One fixed arm has no bandit to share: its plan is this rank's alone."""
        if policy.search == "fixed":
            return None if state is None else policy.choose_heads(g, state, mask, arm, greedy=False, learn=True)
        mine = None if state is None else (*policy.head_contexts(state, mask), arm)
        parts = self.world.all_gather(mine)
        rows = [part for part in parts if part is not None]
        if not rows:
            return None
        xt = torch.cat([r[0] for r in rows])
        xh = torch.cat([r[1] for r in rows]) if rows[0][1] is not None else None
        info = policy.decide_heads(g, xt, xh, torch.cat([r[2] for r in rows]), greedy=False, learn=True)
        if mine is None:
            return {}
        first = sum(len(part[2]) for part in parts[: self.world.rank] if part is not None)
        return {key: value[first : first + len(arm)] for key, value in info.items()}

    def _take_part(self, policy: Policy, g: int) -> None:
        """This rank's path ended before group g (or it has no batch): it still takes part in the joint decision of
        every later group some other rank's path reaches."""
        while g < len(policy.groups) and self._choose_heads(policy, g, None, None, None) is not None:
            g += 1

    def _clean_decisions(self, policy: Policy, ids: Tensor | None, mask: Tensor | None, arm: Tensor,
                         layers: int) -> list[dict[str, Any]]:
        """``decision_states: clean`` (T2): each group's heads decided on the states of an eval-mode, no-grad walk
        with the current weights, every rank taking part in each group's joint decision, reached or not. The last
        group's output decides nothing and is not run. Returns this rank's decisions, one per group it reaches."""
        model = self.model
        model.eval()
        decided: list[dict[str, Any]] = []

        def at_group(at: At) -> Next | None:
            info = self._choose_heads(policy, at.group, at.state, at.mask, arm)
            decided.append(info)
            return None if at.next is None else Next(heads=info["plan"][:, : at.next - at.depth])

        starts = [group.start for group in policy.groups if group.start < layers]
        with torch.no_grad():
            if ids is not None and starts:
                walk(start(model, ids, mask), starts, at_group)
            self._take_part(policy, len(decided))
        return decided

    # ---- the sequential mode (docs/training.md T31) -------------------------------------------------------------

    def _sequential_pass(self, policy: Policy, ids: Tensor | None, mask: Tensor | None,
                         labels: Tensor | None) -> dict[str, Any] | None:
        """The sequential mode's one eval-mode, no-grad pass of the step (T31), before the update: every sample walks
        to the deepest depth (none leaves: full information), UCB_H and the TSB choosing each group's heads for all of
        them; at each depth it may stop at, the exit is read (the sample's error there, ``depth_loss``: T27) and the
        boundary's bandit decides stop or continue from the pooled state and the exit's statistics; a sample's stop
        is its first boundary that says stop (the deepest if none). Every decision is joint over the ranks (a rank
        without a batch takes part with none). Returns this rank's plan (None without a batch): the head decisions
        per group, the normalised stop contexts per boundary, the errors [B, K], each sample's stop depth, the
        deepest exit's logits (the self-distillation teacher), the heads each layer ran and the exits read."""
        model = self.model
        model.eval()
        options = policy.layer_options
        points = path_points(model.config, max(options))
        if ids is None:  # no batch: take part in every boundary's and group's decision
            for point in points:
                if point != points[-1]:
                    self._joint_stops(policy, options.index(point), None)
                    self._choose_heads(policy, options.index(point), None, None, None)
            return None
        n = ids.shape[0]
        groups: list[dict[str, Any]] = []
        contexts: list[Tensor] = []
        errs: list[Tensor] = []
        stops: list[Tensor] = []
        teacher: list[Tensor] = []
        pass_heads = torch.full((n, max(options)), model.config.num_attention_heads, dtype=torch.long)
        none = torch.zeros(n, dtype=torch.long)

        def at_point(at: At) -> Next | None:
            logits = at.logits().float()
            errs.append(self._depth_loss(policy, logits, labels))
            if at.next is None:
                teacher.append(logits)
                return None
            k = options.index(at.depth)
            stop, x = self._joint_stops(policy, k, policy.stop_context(at.state, at.mask, logits))
            stops.append(stop)
            contexts.append(x)
            info = self._choose_heads(policy, at.group, at.state, at.mask, none)
            groups.append(info)
            plan = info["plan"][:, : at.next - at.depth]
            pass_heads[:, at.depth : at.next] = plan.sum(dim=2)
            return Next(heads=plan)

        with torch.no_grad():
            walk(start(model, ids, mask), points, at_point)
        err = torch.stack(errs, dim=1).cpu()
        stop = torch.stack(stops, dim=1) if stops else torch.zeros(n, 0, dtype=torch.bool)
        stop = torch.cat([stop, torch.ones(n, 1, dtype=torch.bool)], dim=1)  # everyone stops at the deepest
        first = stop.long().argmax(dim=1)  # the first boundary that says stop
        depth = torch.tensor(options)[first]
        return {"groups": groups, "contexts": contexts, "errs": err, "depth": depth, "teacher": teacher[0].detach(),
                "exits": first + 1, "pass_heads": pass_heads, "stop_loss": err.gather(1, first[:, None]).squeeze(1)}

    def _joint_stops(self, policy: Policy, k: int, x: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """Boundary k's stop decisions (T31) on every rank's contexts gathered in rank order (the same normaliser
        update and draws on every rank); this rank's rows (None when it has none)."""
        parts = self.world.all_gather(x)
        rows = [part for part in parts if part is not None]
        if not rows:
            return None
        stop, xn = policy.decide_stops(k, torch.cat(rows), greedy=False, learn=True)
        if x is None:
            return None
        first = sum(len(part) for part in parts[: self.world.rank] if part is not None)
        return stop[first : first + len(x)], xn[first : first + len(x)]

    def _sequential_reads(self, policy: Policy, seq: dict[str, Any], labels: Tensor, heads_rows: Tensor,
                          reads: list[Tensor]) -> Callable[[At], Next | None]:
        """The gradient pass's decision callback of the sequential mode (T31): the samples stop where the no-grad
        pass decided and run its heads; every exit on a sample's path is read with gradient, its cross-entropy
        weighed by ``exit_weights`` (``depth``: in proportion to the depth) and, below the deepest depth, mixed
        with ``distil_weight`` x the KL divergence from the no-grad pass's deepest exit (self-distillation, as
        FastBERT's students). Each sample's loss, the weighted mean of its reads, lands in ``reads[0]`` [B]."""
        mode, deepest = policy.mode, max(policy.layer_options)
        device = labels.device
        n = labels.shape[0]
        total = torch.zeros(n, device=device)
        weight = torch.zeros(n, device=device)
        teacher = seq["teacher"].float().log_softmax(-1)

        def at_point(at: At) -> Next | None:
            nonlocal total, weight
            rows = at.rows.to(device)
            logits = at.logits().float()
            loss = F.cross_entropy(logits, labels[rows], reduction="none")
            if mode.distil_weight and at.depth < deepest:
                kl = F.kl_div(logits.log_softmax(-1), teacher[rows], log_target=True, reduction="none").sum(-1)
                loss = (1 - mode.distil_weight) * loss + mode.distil_weight * kl
            w = float(at.depth) if mode.exit_weights == "depth" else 1.0
            total = total.index_add(0, rows, w * loss)
            weight = weight.index_add(0, rows, torch.full_like(loss, w))
            if at.next is None:
                reads[:] = [total / weight]
                return None
            stop = seq["depth"][at.rows] == at.depth
            go = at.rows[~stop]
            plan = seq["groups"][at.group]["plan"][go, : at.next - at.depth]
            heads_rows[go, at.depth : at.next] = plan.sum(dim=2)
            if bool(stop.all()):
                reads[:] = [total / weight]
            return Next(stop=stop, heads=plan)

        return at_point

    def _depth_loss(self, policy: Policy, logits: Tensor, labels: Tensor) -> Tensor:
        """A sample's loss read at one exit for the depth rewards: 1 - p(true class) or the cross-entropy
        (``depth_loss`` of the mode or dht.bandits, T27)."""
        if policy.bandit_cfg.depth_loss == "error_probability":
            return 1.0 - logits.float().softmax(-1).gather(1, labels[:, None]).squeeze(1)
        return F.cross_entropy(logits, labels, reduction="none")

    def _all_depths(self, policy: Policy) -> bool:
        return policy.search == "tree" and policy.mode.depth_feedback == "all_depths"

    def _depth_losses(self, policy: Policy, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """Each sample's loss at every depth option [B, K] (``depth_feedback: all_depths``, T24): one eval-mode,
        no-grad pass with every head to the deepest option, the classifier read after each option's layers,
        before this step's update (the weights the chosen depth's loss is measured with); the loss is the
        cross-entropy or 1 - p(true class) (``depth_loss`` of the mode or dht.bandits, T27). Eval mode draws no
        dropout, so the step's own randomness is the same as without it. Its FLOPs are counted in
        :meth:`_account`."""
        self.model.eval()
        depths = sorted(set(policy.layer_options))
        losses = {}
        with torch.no_grad():
            for depth, logits in zip(depths, exit_logits(self.model, ids, mask, depths), strict=True):
                losses[depth] = self._depth_loss(policy, logits, labels)
        return torch.stack([losses[depth] for depth in policy.layer_options], dim=1)  # UCB_L's arm order

    def _trainable_layers(self, layers: int, frozen: bool) -> set[int]:
        """Layers whose weights train. P-DHT after its warm-up (Section 6.1, docs/training.md): with
        `all_but_last_two` only the last two layers of the sample's path (and the classifier) train, with
        `last_two` everything but them."""
        everything = set(range(layers))
        freeze_embeddings = frozen and self.cfg.dht.p_dht_freeze == "all_but_last_two"
        for p in self.model.bert.embeddings.parameters():
            p.requires_grad_(not freeze_embeddings)
        if not frozen:
            return everything
        tail = set(range(max(layers - 2, 0), layers))
        return tail if self.cfg.dht.p_dht_freeze == "all_but_last_two" else everything - tail

    def _runner(self, trainable: set[int]) -> Run:
        """How the gradient pass runs its layers (:func:`dht.walk.walk`'s ``run``): the weights of ``trainable``
        layers train; frozen layers before any trainable one run without gradient (their backward is never needed),
        frozen layers after one still pass gradients through but do not update."""

        def run(hidden: Tensor, keep: Tensor | None, first: int, stop: int, plan: Tensor | None) -> Tensor:
            for layer in range(first, stop):
                sub = None if plan is None else plan[:, layer - first : layer - first + 1].to(self.device)
                if sub is not None and bool(sub.all()):
                    sub = None  # every head kept: the plain projections, no weight slices copied
                needs_grad = layer in trainable or hidden.requires_grad
                module = self.model.bert.encoder.layer[layer]
                for p in module.parameters():
                    p.requires_grad_(layer in trainable)
                if needs_grad:
                    hidden = self.model.run_layers(hidden, keep, layer, layer + 1, sub)
                else:
                    with torch.no_grad():
                        hidden = self.model.run_layers(hidden, keep, layer, layer + 1, sub)
            return hidden

        return run

    def _account(self, policy: Policy, layers: int, heads_rows: Tensor, trainable: set[int],
                 groups: list[dict[str, Any]], arm: Tensor, decision_layers: int, embeddings_train: bool,
                 exits: int = 0, sequential: dict[str, Any] | None = None) -> None:
        """Training FLOPs of the batch, sample by sample (Table 1), and the selection counts (Figure 2).

        Each sample's step is counted by :func:`dht.flops.train_flops` (docs/training.md, T12), from what this
        step ran: its heads per layer, the layers whose weights trained, whether the embeddings did (so a
        gradient enters layer 0), the S1 pass when counted, the eval-mode decision pass of ``decision_layers``
        layers, and ``exits`` shallower exits read with gradient (``exit_loss: path``). The sequential mode's step
        (``sequential``, T31): each sample's path to its stop, its no-grad pass to the deepest depth with the heads
        it chose and an exit read at each depth (:func:`dht.flops.exit_pass_flops`), and the exits its path read
        below its stop (:func:`dht.flops.exit_loss_flops`)."""
        cfg, conf = self.cfg, self.model.config
        n = heads_rows.shape[0]
        frozen_layers = set(range(layers)) - trainable
        include_s1 = policy.uses_s1 and cfg.dht.count_s1_flops
        p = self.progress
        rows = [tuple(r) for r in heads_rows.tolist()]
        depths = [layers] * n
        if sequential is not None:
            depths = sequential["depth"].tolist()
            rows = [r[:d] for r, d in zip(rows, depths, strict=True)]
            options = len(policy.layer_options)
            for row, count in Counter(tuple(r) for r in sequential["pass_heads"].tolist()).items():
                p.train_flops += count * float(exit_pass_flops(self.seq_len, row, options, conf))
            exits = 0
            p.train_flops += float(exit_loss_flops(int(sequential["exits"].sum()) - n, conf))
        for row, count in Counter(rows).items():
            p.train_flops += count * float(train_flops(
                self.seq_len, row, conf, "full", fixed_layers=cfg.dht.fixed_layers, include_s1=include_s1,
                frozen_layers=frozen_layers, embeddings_train=embeddings_train, decision_layers=decision_layers))
        if self._all_depths(policy):
            p.train_flops += n * float(depth_feedback_flops(self.seq_len, policy.layer_options, conf))
        p.train_flops += n * float(exit_loss_flops(exits, conf))  # exit_loss: path, T26
        p.reference_flops += n * self.reference_step
        p.samples_seen += n
        sel = p.selections.setdefault(str(p.epoch), {})
        for d, c in Counter(depths).items():
            sel[f"layers/{d}"] = sel.get(f"layers/{d}", 0) + c
        if policy.search not in ("tree", "sequential"):
            for a in arm.tolist():
                sel[f"arm/{policy.arms[a]}"] = sel.get(f"arm/{policy.arms[a]}", 0) + 1
        for g, info in enumerate(groups):
            ran = torch.tensor(depths) > policy.groups[g].start  # the rows whose path ran the group
            for k, c in Counter(info["counts"][ran, 0].tolist()).items():
                sel[f"heads/{k}"] = sel.get(f"heads/{k}", 0) + c
            if "chosen" in info:
                counts = info["chosen"][ran].sum(dim=0).tolist()
                for h, c in enumerate(counts):
                    if c:
                        sel[f"head_g{g}/{h}"] = sel.get(f"head_g{g}/{h}", 0) + int(c)

    def _checkpoint_now(self, log: Callable[[list[tuple[int, float, float]], Progress], None] | None,
                        start_time: float) -> None:
        """Bring the time and the MLflow log up to date, then checkpoint, so a resumed run logs every step once."""
        self.progress.seconds = time.perf_counter() - start_time
        self._flush_log(log)
        self.save_checkpoint()

    def _end_epoch(self, log: Callable[[list[tuple[int, float, float]], Progress], None] | None,
                   start_time: float) -> None:
        """The epoch is done: the next one starts at position 0, with a checkpoint unless it was the last."""
        p = self.progress
        p.epoch += 1
        p.position = 0
        if p.epoch < self.cfg.train.epochs:
            self._checkpoint_now(log, start_time)
        else:
            p.seconds = time.perf_counter() - start_time
            self._flush_log(log)

    def _refresh_arm_features(self, policy: Policy) -> None:
        """``dht.features.refresh: epoch`` (docs/training.md, T14): Section 4.2's pass, on the model being trained
        and the arms of `policy`'s mode, over the training split (all of it, or a seeded subset of
        ``arm_feature_samples`` drawn anew each epoch); the new vectors replace the bandits' arm matrices (their
        A, b and posteriors stay). The pass's forward FLOPs count as training FLOPs: unlike the stage's one-off pass, it is paid
        every epoch by this mode only."""
        cfg, p, conf = self.cfg, self.progress, self.model.config
        features_cfg = cfg.dht.features
        space = self.refresh_spaces[id(policy)]
        seed = cfg.training_seed * 1000 + p.epoch
        n = len(self.train_data)
        rows = torch.arange(n)
        if features_cfg.arm_feature_samples is not None and features_cfg.arm_feature_samples < n:
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: features_cfg.arm_feature_samples]
            rows = pick.sort().values
        size = features_cfg.batch_size
        batches = (self.train_data.batch(rows[i : i + size], self.device)[:2] for i in range(0, len(rows), size))
        # one pass, on rank 0, sent to every rank: every rank's bandits must read the same vectors
        features, counts = self.world.broadcast(
            compute_arm_features(self.model, batches, space, features_cfg, seed=seed) if self.world.is_main else None)
        if policy.search in ("tree", "sequential"):
            if policy.ucb is not None:  # the sequential mode's stop bandits have no arm features
                policy.ucb.replace_arm_features(arm_matrix(features, "ucb_l", policy.layer_options))
            policy.ucb_h.replace_arm_features(arm_matrix(features, "ucb_h", policy.head_options))
        else:
            policy.ucb.replace_arm_features(arm_matrix(features, "ucb_cp", policy.arms))
        if policy.tsb.use_arm_features:
            policy.tsb.replace_arm_features(arm_matrix(features, "tsb", range(conf.num_attention_heads)))
        self.arm_features = features
        # cost: the full pass for every sample, plus the random-arm pass (each sample runs one arm of the pool)
        full = forward_flops(self.seq_len, [conf.num_attention_heads] * conf.num_hidden_layers, conf, "full")
        arms = sum(c * forward_flops(self.seq_len, arm_layer_heads(parse_arm(k.split("/", 1)[1]), conf.fixed_layers,
                                                                   conf.num_attention_heads), conf, "full")
                   for k, c in counts.items() if k.startswith("pool/"))
        p.train_flops += float(len(rows) * full + arms)

    def _flush_log(self, log: Callable[[list[tuple[int, float, float]], Progress], None] | None) -> None:
        if log is not None and self.progress.pending_log:
            log(self.progress.pending_log, self.progress)
        self.progress.pending_log = []

    # ---- several processes (docs/distributed.md) ----------------------------------------------------------------

    def close_distributed(self) -> None:
        """Leave the process group after a distributed run: DDP first, while the group is still registered, then the
        group. DDP's reducer holds the group too, and when it drops the last reference it destroys the group with the
        GIL held, which deadlocks when gloo's worker thread is still releasing the last collective's tensors (seen
        here at exit; pytorch/pytorch#56297); the group's own Python handle releases the GIL first."""
        self.parallel = None
        gc.collect()
        self.world.close()

    def _check_in_step(self) -> None:
        """With several ranks, they must end with bit-identical weights and bandits: DDP keeps the weights so, the
        joint decisions and replayed updates the bandits; a difference is a bug, and is not written as a result.
        Sets :attr:`digests`."""
        if self.world.size == 1:
            return
        bandits = {"policy": self.policy.state_dict(),
                   "warmup": self.warmup_policy.state_dict() if self.warmup_policy is not None else None}
        mine = (digest(self.model.state_dict()), digest(bandits))
        every = self.world.all_gather(mine)
        if len(set(every)) > 1:
            raise TrainingError(
                "the ranks ended training out of step (sha256 of weights, bandits per rank: "
                f"{[(w[:12], s[:12]) for w, s in every]}); this is a bug, no model was written"
            )
        self.digests = mine

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """The weights, optimizer, bandits and accounting (the same on every rank) and, with several ranks, every
        rank's own state (its queues, its ready batches, its dropout RNG), gathered: rank 0 writes the one checkpoint,
        the others wait until it is written."""
        if self.checkpoint_dir is None:
            return
        cuda = self.device.type == "cuda"
        mine = {"queue": self.queue.state_dict(), "ready": self.ready, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None}
        ranks = self.world.all_gather(mine)
        if self.world.is_main:
            self._write_checkpoint(ranks if len(ranks) > 1 else None)
        self.world.barrier()

    def _write_checkpoint(self, ranks: list[dict[str, Any]] | None) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "fingerprint": self.fingerprint,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "policy": self.policy.state_dict(),
            "warmup_policy": self.warmup_policy.state_dict() if self.warmup_policy else None,
            "queue": self.queue.state_dict(),
            "progress": self.progress.__dict__,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "ranks": ranks,  # several processes: each rank's queues, ready batches and RNG
        }
        tmp = self.checkpoint_dir / (CHECKPOINT_FILE + ".tmp")
        write_checkpoint(state, tmp)  # behind the SHA-256 of its bytes, checked before a resume reads any (dht.integrity)
        os.replace(tmp, self.checkpoint_dir / CHECKPOINT_FILE)  # atomic: a kill never leaves half a checkpoint

    def load_checkpoint(self) -> bool:
        """Resume from the checkpoint if there is one; refuse one that is corrupt or belongs to another run."""
        if self.checkpoint_dir is None:
            return False
        path = self.checkpoint_dir / CHECKPOINT_FILE
        if not path.is_file():
            return False
        try:  # its checksum first, then tensors and plain data only: a checkpoint never runs code
            state = read_checkpoint(path)
        except IntegrityError as err:
            raise TrainingError(f"{err}. It is not resumed and not overwritten; delete it to start this run over: "
                                f"rm -r {self.checkpoint_dir}") from err
        if state.get("fingerprint") != self.fingerprint:
            raise TrainingError(
                f"{path}: this checkpoint was written by a run with other parameters, data or code inputs "
                f"(fingerprint {state.get('fingerprint')} != {self.fingerprint}). "
                f"It is not resumed and not overwritten; delete it to start over: rm -r {self.checkpoint_dir}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.policy.load_state_dict(state["policy"])
        if self.warmup_policy is not None:
            self.warmup_policy.load_state_dict(state["warmup_policy"])
        self.queue.load_state_dict(state["queue"])
        self.progress = Progress(**state["progress"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self._restore_rank(path, state.get("ranks"))  # refuses another process count
        return True

    def _restore_rank(self, path: Path, ranks: list[dict[str, Any]] | None) -> None:
        """This rank's part of a checkpoint (a one-process checkpoint has none); one of another process count is
        refused (its queues are per rank), by a one-process run too."""
        if (1 if ranks is None else len(ranks)) != self.world.size:
            raise TrainingError(
                f"{path}: written by a run of {1 if ranks is None else len(ranks)} process(es), this run has "
                f"{self.world.size} (train.distributed.nproc_per_node). It is not resumed; delete it to start over: "
                f"rm -r {self.checkpoint_dir}"
            )
        if ranks is None:
            return
        mine = ranks[self.world.rank]
        self.queue.load_state_dict(mine["queue"])
        self.ready = list(mine["ready"])
        torch.set_rng_state(mine["torch_rng"])
        if mine["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)

    def remove_checkpoint(self) -> None:
        if self.checkpoint_dir is not None:
            (self.checkpoint_dir / CHECKPOINT_FILE).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# What a run starts from (dht.modes.<mode>.init, model.exit_heads)
# --------------------------------------------------------------------------------------------------------------

# The config fields a run's starting weights must share with the initial model: the shapes of the weights (the
# architecture a checkpoint fixes), how they are read (layer norm, pooling, labels) and the depths of the exits.
_START_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size", "layer_norm", "classifier_pooling", "num_labels",
                 "fixed_layers", "group_size")


@dataclass(frozen=True)
class ReferenceStart:
    """A run with ``init: reference`` starts where the trained reference ended (docs/training.md, T30)."""

    model_dir: Path  # the reference's model directory (models/<dataset>/<reference>[/seed-<s>])
    metrics_file: Path  # and its results' metrics.json, which the train stage writes last
    metrics: dict[str, Any]  # its metrics.json: its training is the start of this run's (dht.results.training_metrics)
    digest: str  # SHA-256 of its weights' checksums: part of the checkpoint fingerprint, so a retrained reference
    #              is a new start

    @classmethod
    def locate(cls, cfg: Config, dataset: str, model_dir: Path, metrics_file: Path) -> ReferenceStart:
        """The trained reference (run.reference) of `dataset` in `model_dir`, with its `metrics_file`; TrainingError
        naming what is missing or foreign and the command that trains it."""
        from dht.integrity import MANIFEST_FILE, sha256_file
        from dht.results import read_start

        fix = f"train it first: snakemake --cores 4 {metrics_file}"
        policy_file = model_dir / POLICY_FILE
        if not policy_file.is_file() or not metrics_file.is_file():
            missing = policy_file if not policy_file.is_file() else metrics_file
            raise TrainingError(f"init: reference needs the trained reference {cfg.run.reference!r}, but {missing} "
                                f"is missing; {fix}")
        info = json.loads(policy_file.read_text())
        if (info.get("mode_name"), info.get("dataset", dataset)) != (cfg.run.reference, dataset):
            raise TrainingError(
                f"{model_dir}: not the trained reference {cfg.run.reference!r} of {dataset} ({policy_file} names "
                f"{info.get('mode_name')!r} on {info.get('dataset')!r}); {fix}")
        manifest = model_dir / MANIFEST_FILE
        digest = sha256_file(manifest if manifest.is_file() else model_dir / "model.safetensors")
        try:  # its training budget is this run's start (dht.results.training_budget): checked before training
            metrics = read_start(metrics_file)
        except ValueError as err:
            raise TrainingError(f"init: reference: {err}") from None
        return cls(model_dir, metrics_file, metrics, digest)


def initial_model(cfg: Config, mode_name: str, dataset: str, init_dir: Path, reference_dir: Path | None = None,
                  reference_metrics: Path | None = None) -> tuple[DHTForSequenceClassification, ReferenceStart | None]:
    """The model a run of `mode_name` on `dataset` starts from (``dht.modes.<mode>.init``, docs/training.md T30),
    and with ``init: reference`` where it came from.

    ``pretrained``: the arm_features stage's initial model (`init_dir`). ``reference``: the fine-tuned run.reference
    of the same dataset and seed (`reference_dir` and its `reference_metrics`; default: the pipeline's
    ``models/<run>`` and ``results/<run>/metrics.json`` below the working directory, :func:`dht.results.run_subdir`),
    checked against its checksums and required to have the initial model's architecture. Then
    the mode's own ``exit_heads`` or ``model.exit_heads`` (T29): with ``per_depth`` every exit below the full depth
    starts as a copy of the full-depth head, so a model trained at full depth alone (the reference; a directory
    saved with one head) gives each exit its trained classifier. Raises :class:`TrainingError` with the command that fixes it."""
    from dht.integrity import IntegrityError, load_checked_model
    from dht.model import DHTConfig
    from dht.results import run_subdir

    reference = None
    mode = cfg.dht.modes[mode_name]
    if mode.init == "pretrained":
        model = DHTForSequenceClassification.from_pretrained(init_dir, use_safetensors=True)
    else:
        run = run_subdir(cfg, dataset, cfg.run.reference, cfg.training_seed)
        reference = ReferenceStart.locate(cfg, dataset, reference_dir or Path("models") / run,
                                          reference_metrics or Path("results") / run / "metrics.json")
        fix = f"retrain it: snakemake --cores 4 --force {reference.metrics_file}"
        try:
            model = load_checked_model(reference.model_dir, fix)
        except IntegrityError as err:
            raise TrainingError(str(err)) from err
        init = DHTConfig.from_pretrained(init_dir)
        differ = [f"{name} {getattr(model.config, name)} (initial model: {getattr(init, name)})"
                  for name in _START_FIELDS if getattr(model.config, name) != getattr(init, name)]
        if differ:
            raise TrainingError(
                f"{reference.model_dir}: the reference's architecture is not the initial model's ({'; '.join(differ)}), "
                f"so dht.modes.{mode_name} cannot start from it; {fix}")
    heads = mode.exit_heads or cfg.model.exit_heads  # the mode's own, over the model section's (T29)
    if reference is not None or model.config.exit_heads != heads:
        model.set_exit_heads(heads)
    return model, reference


# --------------------------------------------------------------------------------------------------------------
# Saving a trained model with its bandits
# --------------------------------------------------------------------------------------------------------------


def save_trained(out_dir: Path, model: DHTForSequenceClassification, policy: Policy, mode_name: str,
                 cfg: Config, extra: dict[str, Any]) -> None:
    """`save_pretrained` weights + the policy (description, resolved config, bandit state), loadable by
    :func:`load_trained` without params.yaml."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    torch.save(policy.state_dict(), out_dir / BANDITS_FILE)
    info = {"mode_name": mode_name, **policy.describe(), "config": cfg.model_dump(mode="json"),
            "training_seed": cfg.training_seed, **extra}  # the dump lists every seed of the profile, not the run's
    (out_dir / POLICY_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")


def export_trained(out_dir: Path, trainer: Trainer, cfg: Config, info: dict[str, Any], tokenizer: Path,
                   arm_features: Path) -> None:
    """The train stage's model directory, replaced whole: :func:`save_trained` (weights, policy, bandits), the
    dataset's tokenizer and the arm features the bandits were built on (what ``dht predict`` and
    :func:`load_trained` need beside them), and last the checksums of every file (:mod:`dht.integrity`), which
    whatever loads the model verifies."""
    import shutil

    from dht.integrity import write_manifest

    if out_dir.exists():
        shutil.rmtree(out_dir)
    save_trained(out_dir, trainer.model, trainer.policy, trainer.mode_name, cfg, info)
    shutil.copytree(tokenizer, out_dir / "tokenizer")
    shutil.copy2(arm_features, out_dir / "arm_features.safetensors")
    write_manifest(out_dir)


def _saved_training_seed(info: dict[str, Any], model_dir: Path, seeds: list[int]) -> int:
    """The training seed of a saved model of a profile with several: its policy file's `training_seed`, or for a
    directory saved before that key, the seed of the pipeline's layout (models/<dataset>/<model>/seed-<s>), or the
    first seed (it seeds the bandits' generators only: ties and sampled inference)."""
    if "training_seed" in info:
        return int(info["training_seed"])
    name = model_dir.resolve().name
    if name.startswith("seed-") and name[5:].isdigit() and int(name[5:]) in seeds:
        return int(name[5:])
    return seeds[0]


def load_trained(model_dir: str | Path, device: torch.device,
                 allow_unverified: bool = False) -> tuple[DHTForSequenceClassification, Policy, dict[str, Any]]:
    """A trained model, its policy (bandits restored) and its description, as written by the train stage: every
    file checked against the directory's checksums.sha256 before any is read (a directory without one is refused
    unless ``allow_unverified``), the weights read as safetensors and the bandits weights-only (:mod:`dht.integrity`)."""
    from dht.arm_features import load_arm_features
    from dht.integrity import (
        IntegrityError,
        description,
        load_checked_model,
        load_tensors,
        read_error,
        retrain_hint,
    )

    model_dir = Path(model_dir)
    policy_path = model_dir / POLICY_FILE
    if not policy_path.is_file():
        raise FileNotFoundError(f"{model_dir}: not a trained DHT model directory (no {POLICY_FILE}); "
                                "train it first (snakemake --cores 4 results/<dataset>/<model>/metrics.json)")
    fix = retrain_hint(description(policy_path))
    model = load_checked_model(model_dir, fix, allow_unverified).to(device)  # checksums.sha256 first
    try:
        info = json.loads(policy_path.read_text())
    except ValueError as err:
        raise IntegrityError(f"{policy_path}: not valid JSON ({err}); {fix}") from err
    cfg = Config.model_validate(info["config"])
    if len(cfg.run.training_seeds) > 1:  # a profile of several seeds: the run's own (its bandits' generators)
        cfg = cfg.for_training_seed(_saved_training_seed(info, model_dir, cfg.run.training_seeds))
    mode = ModeSpec.model_validate(info["mode"])
    for name in ("arm_features.safetensors", BANDITS_FILE):  # the train stage writes both with the model
        if not (model_dir / name).is_file():
            raise IntegrityError(f"{model_dir / name}: missing; {fix}")
    try:
        arm_features = load_arm_features(model_dir)
    except Exception as err:  # a damaged file, in a directory loaded unverified
        raise read_error(model_dir, err, fix) from err
    bandits = load_tensors(model_dir / BANDITS_FILE, fix)  # weights-only: tensors and plain data, never code
    policy = Policy(cfg, mode, arm_features, model.config)
    policy.load_state_dict(bandits)
    return model, policy, info
