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

The bandits' decisions and updates, the queues and inference live in :mod:`dht.policy`; what a model is
evaluated on and the metrics in :mod:`dht.evaluation`. This module is the training loop around them, its
checkpoints, and saving / loading a trained model with its bandits. With several processes (torchrun,
docs/distributed.md) :meth:`Trainer.fit` hands over to the lockstep loop of :mod:`dht.distributed_training`, which
runs on the same trainer.

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

from dht import distributed_training
from dht.arm_features import ArmSpace, arm_layer_heads, arm_matrix, arm_space, compute_arm_features
from dht.arms import parse_arm
from dht.config import Config, ModeSpec, run_param_keys
from dht.distributed import World, share_length, wrap
from dht.evaluation import SplitData
from dht.flops import depth_feedback_flops, exit_loss_flops, forward_flops, full_model_flops, train_flops
from dht.guard import FiniteGuard, TrainingError  # noqa: F401 (TrainingError: raised and re-exported here)
from dht.integrity import IntegrityError, read_checkpoint, write_checkpoint
from dht.model import DHTForSequenceClassification
from dht.policy import Decision, LayerQueue, Policy, decide_groups, exit_logits, exit_uncertainty
from dht.results import POLICY_FILE

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


class Trainer:
    """Trains one mode on one dataset (Algorithms 2-3), resumable, and evaluates it (inference policy)."""

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
        q = cfg.train.queue_size
        shared = world is not None and cfg.train.distributed.queues == "global"
        self.queue = LayerQueue(q * world.size if shared else q)  # global: one set of queues for all ranks
        # Several processes (docs/distributed.md, dht.distributed_training): this rank's place, DDP around the model
        # for the gradient pass, the batches its queues released that wait for a step, and the per-rank state a
        # checkpoint gathers.
        self.world = world
        self.ddp = wrap(self.model, world) if world is not None else None
        self.ready: list[tuple[int, list[tuple[int, int, Tensor]]]] = []
        self.rank_states: list[dict[str, Any]] | None = None
        self.trace: dict[str, list[int]] | None = None  # epoch -> sample indices this rank trained, when set
        self.digests: tuple[str, str] | None = None  # (weights, bandits) after a distributed run, equal on every rank
        share = share_length(len(train), world.size if world is not None else 1)  # samples this rank queues an epoch
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

    # ---- one queue batch (Algorithm 2, lines 7-16) -----------------------------------------------------------

    def train_batch(self, policy: Policy, frozen: bool, layers: int, items: list[tuple[int, int, Tensor]]) -> float:
        model, cfg = self.model, self.cfg
        index = torch.tensor([i for i, _, _ in items])
        arm = torch.tensor([a for _, a, _ in items])
        context = torch.stack([c for _, _, c in items]) if policy.uses_s1 else torch.zeros(len(items), 0)
        ids, mask, labels = self.train_data.batch(index, self.device)
        trainable = self._trainable_layers(layers, frozen)
        b = min(cfg.dht.fixed_layers, layers)
        decided: list[dict[str, Any]] | None = None
        decision_layers = 0  # layers of the eval-mode decision pass, for the FLOP count
        if cfg.dht.decision_states == "clean" and policy.search != "fixed" and layers > b:
            # UCB_H and the TSB decide from the states inference would give them (no dropout, the current
            # weights: S2,0 and S2,l of Algorithm 2 without the training noise); docs/training.md, T2.
            model.eval()
            with torch.no_grad():
                state, keep = model.embed(ids, mask)
                state = model.run_layers(state, keep, 0, b)
                decided, _ = decide_groups(model, policy, state, keep, mask, arm, layers, greedy=False, learn=True,
                                           run_last=False)
            decision_layers = policy.groups[len(decided) - 1].start
        depth_losses = self._depth_losses(policy, ids, mask, labels) if self._all_depths(policy) else None
        model.train()
        hidden, keep = model.embed(ids, mask)
        hidden = self._run(hidden, keep, 0, b, None, trainable)  # S2,0: the b layers again, with gradient
        # exit_loss: path (T26): the classifier also reads, and trains on, every shallower depth option passed
        exits = set(policy.layer_options) - {layers} if policy.mode.exit_loss == "path" else set()
        exit_losses = [F.cross_entropy(model.classify(hidden, keep, b), labels, reduction="none")] if b in exits else []
        groups: list[dict[str, Any]] = []
        heads_rows = torch.full((len(items), layers), model.config.num_attention_heads, dtype=torch.long)
        for g, group in enumerate(policy.groups):
            if group.start >= layers:
                break
            if decided is not None:
                info = decided[g]
            else:  # decision_states: train, the dropout-noised state of this pass
                info = policy.choose_heads(g, hidden.detach(), mask, arm, greedy=False, learn=True)
            stop = min(group.stop, layers)
            plan = info["plan"][:, : stop - group.start]
            hidden = self._run(hidden, keep, group.start, stop, plan.to(self.device), trainable)
            heads_rows[:, group.start : stop] = plan.sum(dim=2)
            groups.append(info)
            if stop in exits:
                exit_losses.append(F.cross_entropy(model.classify(hidden, keep, stop), labels, reduction="none"))
        logits = model.classify(hidden, keep, layers)
        per_sample = F.cross_entropy(logits, labels, reduction="none")  # the chosen depth's: what the bandits learn
        # every exit read weighs the same; a sample's loss keeps the scale of one cross-entropy
        loss = torch.stack([per_sample, *exit_losses]).mean() if exit_losses else per_sample.mean()
        if not torch.isfinite(loss):
            raise TrainingError(
                f"non-finite loss ({float(loss.detach())}) at epoch {self.progress.epoch + 1}, step {self.progress.step + 1}, "
                f"in a batch of {len(items)} samples with L = {layers} (sample indices {index[:8].tolist()}...); "
                "lower train.learning_rate or check the data; no model was written"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        policy.learn(Decision(arm, context, layers), groups, per_sample.detach(), depth_losses)
        self._account(policy, layers, heads_rows, trainable, groups, arm, decision_layers, exits=len(exit_losses))
        return float(loss.detach())

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
                if policy.bandit_cfg.depth_loss == "error_probability":  # T27
                    losses[depth] = 1.0 - logits.float().softmax(-1).gather(1, labels[:, None]).squeeze(1)
                else:
                    losses[depth] = F.cross_entropy(logits, labels, reduction="none")
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

    def _run(self, hidden: Tensor, keep: Tensor | None, start: int, stop: int, plan: Tensor | None,
             trainable: set[int]) -> Tensor:
        """Layers start..stop-1; frozen layers before any trainable one run without gradient (their backward is
        never needed), frozen layers after one still pass gradients through but do not update."""
        for layer in range(start, stop):
            sub = None if plan is None else plan[:, layer - start : layer - start + 1]
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

    def _account(self, policy: Policy, layers: int, heads_rows: Tensor, trainable: set[int],
                 groups: list[dict[str, Any]], arm: Tensor, decision_layers: int = 0,
                 embeddings_train: bool | None = None, exits: int = 0) -> None:
        """Training FLOPs of the batch, sample by sample (Table 1), and the selection counts (Figure 2).

        Each sample's step is counted by :func:`dht.flops.train_flops` (docs/training.md, T12), from what this
        step ran: its heads per layer, the layers whose weights trained, whether the embeddings did (so a
        gradient enters layer 0), the S1 pass when counted, the eval-mode decision pass of ``decision_layers``
        layers, and ``exits`` shallower exits read with gradient (``exit_loss: path``)."""
        cfg, conf = self.cfg, self.model.config
        n = heads_rows.shape[0]
        frozen_layers = set(range(layers)) - trainable
        if embeddings_train is None:  # this process's batch (a distributed run passes each rank's)
            embeddings_train = any(p.requires_grad for p in self.model.bert.embeddings.parameters())
        include_s1 = policy.uses_s1 and cfg.dht.count_s1_flops
        p = self.progress
        for row, count in Counter(tuple(r) for r in heads_rows.tolist()).items():
            p.train_flops += count * float(train_flops(
                self.seq_len, row, conf, "full", fixed_layers=cfg.dht.fixed_layers, include_s1=include_s1,
                frozen_layers=frozen_layers, embeddings_train=embeddings_train, decision_layers=decision_layers))
        if self._all_depths(policy):
            p.train_flops += n * float(depth_feedback_flops(self.seq_len, policy.layer_options, conf))
        p.train_flops += n * float(exit_loss_flops(exits, conf))  # exit_loss: path, T26
        p.reference_flops += n * self.reference_step
        p.samples_seen += n
        sel = p.selections.setdefault(str(p.epoch), {})
        sel[f"layers/{layers}"] = sel.get(f"layers/{layers}", 0) + n
        if policy.search != "tree":
            for a in arm.tolist():
                sel[f"arm/{policy.arms[a]}"] = sel.get(f"arm/{policy.arms[a]}", 0) + 1
        for g, info in enumerate(groups):
            for k, c in Counter(info["counts"][:, 0].tolist()).items():
                sel[f"heads/{k}"] = sel.get(f"heads/{k}", 0) + c
            if "chosen" in info:
                counts = info["chosen"].sum(dim=0).tolist()
                for h, c in enumerate(counts):
                    if c:
                        sel[f"head_g{g}/{h}"] = sel.get(f"head_g{g}/{h}", 0) + int(c)

    # ---- epochs (Algorithm 3) --------------------------------------------------------------------------------

    def order(self, epoch: int) -> Tensor:
        return torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(self.cfg.training_seed * 1000 + epoch))

    def fit(self, log: Callable[[list[tuple[int, float, float]], Progress], None] | None = None,
            progress_bar: bool = True) -> Progress:
        """Train every epoch, resuming from a checkpoint when one fits; returns the accounting."""
        from dht import progress

        if self.world is not None:  # several processes in lockstep (docs/distributed.md)
            return distributed_training.fit(self, log, progress_bar)
        cfg, p = self.cfg, self.progress
        q = cfg.train.queue_size
        start_time = time.perf_counter() - p.seconds
        since_checkpoint = 0
        while p.epoch < cfg.train.epochs:
            policy, frozen = self.active(p.epoch)
            if p.epoch > 0 and p.position == 0 and id(policy) in self.refresh_spaces:
                # Position 0: no sample of this epoch has been queued. A checkpoint with position 0 was written
                # at the end of the previous epoch, before this refresh, so a resumed run refreshes here too.
                self._refresh_arm_features(policy)
            if p.epoch > 0 and p.position == 0 and policy.mode.depth_memory == "epoch":
                policy.forget_depths()  # T28; position 0 as above: a run resumed at this epoch's start forgets too
            order = self.order(p.epoch)
            bar = progress.bar(len(order), f"{self.mode_name} epoch {p.epoch + 1}/{cfg.train.epochs}",
                               initial=p.position, unit="sample", enabled=progress_bar)
            while p.position < len(order):
                chunk = order[p.position : p.position + q]
                released = self._enqueue(policy, chunk)
                for layers, items in released:
                    self._step(policy, frozen, layers, items)
                    since_checkpoint += 1
                p.position += len(chunk)
                bar.update(len(chunk))
                if p.pending_log:
                    recent = p.pending_log[-10:]
                    bar.set_postfix(loss=f"{np.mean([x[1] for x in recent]):.3f}",
                                    layers=f"{np.mean([x[2] for x in recent]):.1f}", refresh=False)
                if since_checkpoint >= cfg.train.checkpoint_every and p.position < len(order):
                    self._checkpoint_now(log, start_time, self.save_checkpoint)
                    since_checkpoint = 0
            for layers, items in self.queue.drain():  # partly filled queues: every sample once per epoch
                self._step(policy, frozen, layers, items)
            progress.finish(bar)
            self._end_epoch(log, start_time, self.save_checkpoint)
            since_checkpoint = 0
        p.seconds = time.perf_counter() - start_time
        return p

    def _checkpoint_now(self, log: Callable[[list[tuple[int, float, float]], Progress], None] | None,
                        start_time: float, save: Callable[[], None]) -> None:
        """Bring the time and the MLflow log up to date, then checkpoint (``save``: one process's or the
        distributed one), so a resumed run logs every step once."""
        self.progress.seconds = time.perf_counter() - start_time
        self._flush_log(log)
        save()

    def _end_epoch(self, log: Callable[[list[tuple[int, float, float]], Progress], None] | None,
                   start_time: float, save: Callable[[], None]) -> None:
        """The epoch is done: the next one starts at position 0, with a checkpoint unless it was the last."""
        p = self.progress
        p.epoch += 1
        p.position = 0
        if p.epoch < self.cfg.train.epochs:
            self._checkpoint_now(log, start_time, save)
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
        if self.world is None:
            features, counts = compute_arm_features(self.model, batches, space, features_cfg, seed=seed)
        else:  # one pass, on rank 0, sent to every rank: every rank's bandits must read the same vectors
            features, counts = self.world.broadcast(
                compute_arm_features(self.model, batches, space, features_cfg, seed=seed) if self.world.is_main else None)
        if policy.search == "tree":
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

    def _enqueue(self, policy: Policy, chunk: Tensor) -> list[tuple[int, list[tuple[int, int, Tensor]]]]:
        """S1 and the depth decision for a round of samples; the queues that fill up (Algorithm 3, lines 2-5)."""
        ids, mask, _ = self.train_data.batch(chunk, self.device)
        s1 = u = None
        if policy.uses_s1:
            self.model.eval()  # S1: the previous weights, no gradient, no dropout
            with torch.no_grad():
                s1 = self.model.encode_prefix(ids, mask)
                u = exit_uncertainty(self.model, s1, mask) if policy.exit_confidence else None
        arm, context = policy.choose_arms(s1, mask, len(chunk), greedy=False, learn=True, uncertainty=u)
        layers = policy.layers_of(arm)
        released = []
        for row, index in enumerate(chunk.tolist()):
            full = self.queue.push(int(layers[row]), index, int(arm[row]), context[row])
            if full is not None:
                released.append((int(layers[row]), full))
        return released

    def _step(self, policy: Policy, frozen: bool, layers: int, items: list[tuple[int, int, Tensor]]) -> None:
        loss = self.train_batch(policy, frozen, layers, items)
        self.progress.step += 1
        # train_batch stops on a non-finite loss; a weight the update made non-finite stops here (dht.guard)
        FiniteGuard(f"train {self.mode_name}", f"lower train.learning_rate (now {self.cfg.train.learning_rate:g})"
                    ).parameters(self.model.named_parameters(), self.progress.step, self.progress.epoch + 1)
        self.progress.pending_log.append((self.progress.step, loss, float(layers)))
        self.progress.history.append((self.progress.step, self.progress.epoch, loss, float(layers)))
        if self.on_step is not None:
            self.on_step(self.progress.step)

    def _flush_log(self, log: Callable[[list[tuple[int, float, float]], Progress], None] | None) -> None:
        if log is not None and self.progress.pending_log:
            log(self.progress.pending_log, self.progress)
        self.progress.pending_log = []

    # ---- several processes (docs/distributed.md; the loop: dht.distributed_training) ----------------------------

    def close_distributed(self) -> None:
        """Leave the process group after a distributed run: DDP first, while the group is still registered, then the
        group. DDP's reducer holds the group too, and when it drops the last reference it destroys the group with the
        GIL held, which deadlocks when gloo's worker thread is still releasing the last collective's tensors (seen
        here at exit; pytorch/pytorch#56297); the group's own Python handle releases the GIL first."""
        if self.world is not None:
            self.ddp = None
            gc.collect()
            self.world.close()

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        if self.checkpoint_dir is None:
            return
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
            "ranks": self.rank_states,  # a distributed run: each rank's queues, ready batches and RNG
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
        distributed_training.restore_rank(self, path, state.get("ranks"))  # refuses another process count
        return True

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
    ``model.exit_heads`` (T29): with ``per_depth`` every exit below the full depth starts as a copy of the
    full-depth head, so a model trained at full depth alone (the reference; a directory saved with one head) gives
    each exit its trained classifier. Raises :class:`TrainingError` with the command that fixes it."""
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
    if reference is not None or model.config.exit_heads != cfg.model.exit_heads:
        model.set_exit_heads(cfg.model.exit_heads)
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
    info = {"mode_name": mode_name, **policy.describe(), "config": cfg.model_dump(mode="json"), **extra}
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
