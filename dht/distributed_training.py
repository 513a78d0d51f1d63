"""The DHT training loop on several processes in lockstep (docs/distributed.md): Algorithms 2-3 as
:class:`dht.trainer.Trainer` runs them, with every rank taking each decision and each step together.

:meth:`Trainer.fit <dht.trainer.Trainer.fit>` hands over to :func:`fit` when the trainer has a
:class:`~dht.distributed.World`. One epoch:

1. each rank queues its share of the epoch's order (:func:`dht.distributed.shard`) in rounds of q into its own
   per-L queues (Algorithm 3), or every rank's rows into one shared set (``train.distributed.queues: global``);
2. the depth decisions of a round are taken jointly (:func:`enqueue`): every rank's S1 contexts are gathered and
   UCB_L / UCB_cp decide on all of them, on every rank alike;
3. the released batches train in steps every rank takes together (:func:`train_steps`), one batch or an empty part
   per rank: the head decisions are joint too (:func:`decide_jointly`), the gradient pass runs under DDP and every
   rank replays every rank's bandit updates and accounting in rank order (:func:`train_batch`);
4. checkpoints gather every rank's own state and rank 0 writes them (:func:`checkpoint`, :func:`restore_rank`);
   the run ends by checking that the ranks hold bit-identical weights and bandits (:func:`check_in_step`).

These are functions of the trainer: they use its model, policies, queues, optimizer and accounting, and its
helpers for what one process does the same way (``_run``, ``_trainable_layers``, ``_account``, the epoch-end
bookkeeping). The process group itself (the world, shards, DDP, digests) is :mod:`dht.distributed`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dht.distributed import digest, shard, share_length
from dht.guard import TrainingError
from dht.policy import Decision, Policy, exit_uncertainty

if TYPE_CHECKING:  # the trainer imports this module: it is named here for the types only
    from dht.trainer import Progress, Trainer

Batch = tuple[int, list[tuple[int, int, Tensor]]]  # (L, [(sample index, arm, context)]) as a queue releases it


def fit(trainer: Trainer, log: Callable[[list[tuple[int, float, float]], Progress], None] | None,
        progress_bar: bool) -> Progress:
    """:meth:`Trainer.fit <dht.trainer.Trainer.fit>` on several ranks: each queues its share of the epoch's order
    (:func:`dht.distributed.shard`) in rounds of q into its own queues (Algorithm 3), or all ranks' rows into shared
    ones (``train.distributed.queues: global``); the decisions of a round are taken jointly on every rank's
    contexts, and the released batches train in steps every rank takes together (one batch or an empty part per
    rank; docs/distributed.md). Every rank ends with the same weights and bandits (checked)."""
    from dht import progress

    cfg, p, world = trainer.cfg, trainer.progress, trainer.world
    q = cfg.train.queue_size
    length = share_length(len(trainer.train_data), world.size)
    save = partial(checkpoint, trainer)
    start_time = time.perf_counter() - p.seconds
    since_checkpoint = 0
    while p.epoch < cfg.train.epochs:
        policy, frozen = trainer.active(p.epoch)
        if p.epoch > 0 and p.position == 0 and id(policy) in trainer.refresh_spaces:
            trainer._refresh_arm_features(policy)  # as in Trainer.fit: before any sample of the epoch is queued
        order = trainer.order(p.epoch)
        shares = [shard(order, r, world.size) for r in range(world.size)]  # every rank's, for global queues
        bar = progress.bar(length, f"{trainer.mode_name} epoch {p.epoch + 1}/{cfg.train.epochs}", initial=p.position,
                           unit="sample", enabled=progress_bar and world.is_main)
        while p.position < length:  # rounds in lockstep: a shorter share sends an empty chunk last
            trainer.ready += enqueue(trainer, policy, [s[p.position : p.position + q] for s in shares])
            since_checkpoint += train_steps(trainer, policy, frozen, drain=False)
            p.position += q
            bar.update(min(q, length - bar.n))
            if since_checkpoint >= cfg.train.checkpoint_every and p.position < length:
                trainer._checkpoint_now(log, start_time, save)
                since_checkpoint = 0
        trainer.ready += trainer.queue.drain()  # partly filled queues: every sample once per epoch
        train_steps(trainer, policy, frozen, drain=True)
        progress.finish(bar)
        trainer._end_epoch(log, start_time, save)
        since_checkpoint = 0
    p.seconds = time.perf_counter() - start_time
    check_in_step(trainer)
    return p


def enqueue(trainer: Trainer, policy: Policy, chunks: list[Tensor]) -> list[Batch]:
    """:meth:`Trainer._enqueue <dht.trainer.Trainer._enqueue>` for a round (``chunks``: every rank's part of it),
    deciding jointly: every rank pools the S1 contexts of its own chunk, they are gathered in rank order and UCB_L /
    UCB_cp decide on all of them on every rank (the same normaliser update, the same draws). Each rank queues its
    own rows, or, with ``train.distributed.queues: global``, every rank queues all rows in its copy of the shared
    queues."""
    world, model = trainer.world, trainer.model
    chunk = chunks[world.rank]
    n = len(chunk)
    shared = trainer.cfg.train.distributed.queues == "global"
    if policy.ucb is None:  # one fixed arm: nothing to decide or share
        total = sum(map(len, chunks)) if shared else n
        arm, context = policy.decide_arms(None, total, greedy=False, learn=True)
        if not shared:
            chunks = [chunk]
    else:
        x = None
        if n:
            ids, mask, _ = trainer.train_data.batch(chunk, trainer.device)
            model.eval()  # S1: the previous weights, no gradient, no dropout
            with torch.no_grad():
                s1 = model.encode_prefix(ids, mask)
                u = exit_uncertainty(model, s1, mask) if policy.exit_confidence else None
                x = policy.arm_context(s1, mask, u)
        parts = world.all_gather(x)
        rows = [part for part in parts if part is not None]
        if not rows:
            return []
        arm, context = policy.decide_arms(torch.cat(rows), sum(len(r) for r in rows), greedy=False, learn=True)
        if not shared:
            start = sum(len(part) for part in parts[: world.rank] if part is not None)
            arm, context, chunks = arm[start : start + n], context[start : start + n], [chunk]
    layers = policy.layers_of(arm)
    released = []
    for row, index in enumerate(torch.cat(chunks).tolist()):  # rank order, as the decisions
        full = trainer.queue.push(int(layers[row]), index, int(arm[row]), context[row])
        if full is not None:
            released.append((int(layers[row]), full))
    return released


def train_steps(trainer: Trainer, policy: Policy, frozen: bool, drain: bool) -> int:
    """Train the ready batches in steps every rank takes together; returns the steps taken.

    Within an epoch, as many steps as the rank with the fewest ready batches has (the others' wait for the
    next round: a rank's released batches never run ahead of another's by more than its number of queues);
    at the epoch's end, as many as the rank with the most, the others taking part with an empty batch. With
    ``queues: global`` every rank holds the same released batches: each is one step, split over the ranks
    (every size-th sample from the rank's on; a rank left without samples takes part with an empty batch)."""
    world = trainer.world
    if trainer.cfg.train.distributed.queues == "global":
        released, trainer.ready = trainer.ready, []
        for layers, items in released:
            mine = items[world.rank :: world.size]
            train_batch(trainer, policy, frozen, (layers, mine) if mine else None, len(items))
        return len(released)
    sizes = world.all_gather([len(items) for _, items in trainer.ready])
    steps = max(map(len, sizes)) if drain else min(map(len, sizes))
    mine, trainer.ready = trainer.ready[:steps], trainer.ready[steps:]
    for j in range(steps):
        total = sum(s[j] for s in sizes if j < len(s))
        train_batch(trainer, policy, frozen, mine[j] if j < len(mine) else None, total)
    return steps


def train_batch(trainer: Trainer, policy: Policy, frozen: bool, batch: Batch | None, total: int) -> None:
    """One step of every rank (Algorithm 2, lines 7-16, under DDP): this rank's batch (None: an empty part) of
    the step's ``total`` samples.

    As :meth:`Trainer.train_batch <dht.trainer.Trainer.train_batch>`, except: the head decisions are joint
    (:func:`decide_jointly`); the gradient pass runs inside DDP, whose all-reduce averages the ranks' gradients, so
    each rank's loss is its samples' sum x ranks / total (the step's gradient is then the mean over all its
    samples); the ranks' losses and decisions are gathered, and every rank replays every rank's bandit updates and
    accounting in rank order, so the bandits, their baselines and the accounting stay identical on every rank."""
    model, cfg, world, p = trainer.model, trainer.cfg, trainer.world, trainer.progress
    layers, items = batch if batch is not None else (0, [])
    n = len(items)
    index = torch.tensor([i for i, _, _ in items], dtype=torch.long)
    arm = torch.tensor([a for _, a, _ in items], dtype=torch.long)
    context = torch.stack([c for _, _, c in items]) if policy.uses_s1 and n else torch.zeros(n, 0)
    ids = mask = labels = None
    trainable: set[int] = set()
    if n:
        ids, mask, labels = trainer.train_data.batch(index, trainer.device)
        trainable = trainer._trainable_layers(layers, frozen)
    b = min(cfg.dht.fixed_layers, layers)
    decided: list[dict[str, Any]] | None = None
    decision_layers = 0
    if cfg.dht.decision_states == "clean" and policy.search != "fixed":
        # T2 as in Trainer.train_batch; every rank takes part in each group's joint decision, reached or not
        model.eval()
        decided = []
        with torch.no_grad():
            state = keep = None
            if n and layers > b:
                state, keep = model.embed(ids, mask)
                state = model.run_layers(state, keep, 0, b)
            for g, group in enumerate(policy.groups):
                reaches = state is not None and group.start < layers
                info = decide_jointly(trainer, policy, g, state if reaches else None, mask, arm)
                if info is None:
                    break
                if not reaches:
                    continue
                decided.append(info)
                stop = min(group.stop, layers)
                if stop < layers:  # the last group's output decides nothing
                    plan = info["plan"][:, : stop - group.start]
                    state = model.run_layers(state, keep, group.start, stop,
                                             None if bool(plan.all()) else plan.to(state.device))
        if decided:
            decision_layers = policy.groups[len(decided) - 1].start
    groups: list[dict[str, Any]] = []
    heads_rows = torch.full((n, layers), model.config.num_attention_heads, dtype=torch.long)

    def gradient_pass() -> Tensor:
        hidden = keep = None
        if n:
            hidden, keep = model.embed(ids, mask)
            hidden = trainer._run(hidden, keep, 0, b, None, trainable)  # S2,0
        for g, group in enumerate(policy.groups):
            reaches = n > 0 and group.start < layers
            if decided is not None or policy.search == "fixed":
                if not reaches:
                    break
                info = decided[g] if decided is not None else policy.choose_heads(
                    g, hidden.detach(), mask, arm, greedy=False, learn=True)
            else:  # decision_states: train, jointly on the dropout-noised states of this pass
                info = decide_jointly(trainer, policy, g, hidden.detach() if reaches else None, mask, arm)
                if info is None:
                    break
                if not reaches:
                    continue
            stop = min(group.stop, layers)
            plan = info["plan"][:, : stop - group.start]
            hidden = trainer._run(hidden, keep, group.start, stop, plan.to(trainer.device), trainable)
            heads_rows[:, group.start : stop] = plan.sum(dim=2)
            groups.append(info)
        if not n:  # an empty part: one parameter in the graph, so DDP all-reduces (zeros) with the others
            return model.classifier.weight.sum() * 0.0
        return model.classify(hidden, keep, layers)  # the exit head of the batch's depth

    model.train()
    out = trainer.ddp(gradient_pass)
    per_sample = F.cross_entropy(out, labels, reduction="none") if n else None
    loss = per_sample.sum() * (world.size / total) if n else out
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    record = None if not n else {
        "index": index, "arm": arm, "context": context, "layers": layers, "loss": per_sample.detach().double().cpu(),
        "groups": groups, "heads_rows": heads_rows, "trainable": sorted(trainable), "decision_layers": decision_layers,
        "embeddings_train": any(q.requires_grad for q in model.bert.embeddings.parameters())}
    records = world.all_gather(record)
    for rank, rec in enumerate(records):
        if rec is not None and not bool(torch.isfinite(rec["loss"]).all()):
            raise TrainingError(
                f"non-finite loss at epoch {p.epoch + 1}, step {p.step + 1}, on rank {rank}, in a batch of "
                f"{len(rec['index'])} samples with L = {rec['layers']} (sample indices {rec['index'][:8].tolist()}"
                "...); lower train.learning_rate or check the data; no model was written"
            )
    if cfg.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    trainer.optimizer.step()
    trainer.scheduler.step()
    for rec in records:  # rank order: "the previous batch" of a reward is the previous one of this order
        if rec is not None:
            policy.learn(Decision(rec["arm"], rec["context"], rec["layers"]), rec["groups"], rec["loss"])
            trainer._account(policy, rec["layers"], rec["heads_rows"], set(rec["trainable"]), rec["groups"],
                             rec["arm"], rec["decision_layers"], embeddings_train=rec["embeddings_train"])
    if trainer.trace is not None and n:
        trainer.trace.setdefault(str(p.epoch), []).extend(index.tolist())
    done = [rec for rec in records if rec is not None]
    loss_value = float(torch.cat([rec["loss"] for rec in done]).sum()) / total
    layers_value = sum(len(rec["index"]) * rec["layers"] for rec in done) / total
    p.step += 1
    p.pending_log.append((p.step, loss_value, float(layers_value)))
    p.history.append((p.step, p.epoch, loss_value, float(layers_value)))
    if trainer.on_step is not None:
        trainer.on_step(p.step)


def decide_jointly(trainer: Trainer, policy: Policy, g: int, state: Tensor | None, mask: Tensor | None, arm: Tensor
                   ) -> dict[str, Any] | None:
    """UCB_H (tree) and the TSB for group g on the rows of every rank whose path reaches it (``state`` None: this
    rank's does not): contexts gathered in rank order, one decision on all of them on every rank, this rank's
    rows returned ({} when it has none; None when no rank reaches the group)."""
    world = trainer.world
    mine = None if state is None else (*policy.head_contexts(state, mask), arm)
    parts = world.all_gather(mine)
    rows = [part for part in parts if part is not None]
    if not rows:
        return None
    xt = torch.cat([r[0] for r in rows])
    xh = torch.cat([r[1] for r in rows]) if rows[0][1] is not None else None
    info = policy.decide_heads(g, xt, xh, torch.cat([r[2] for r in rows]), greedy=False, learn=True)
    if mine is None:
        return {}
    start = sum(len(part[2]) for part in parts[: world.rank] if part is not None)
    return {key: value[start : start + len(arm)] for key, value in info.items()}


# ---- checkpoints and the end of a run ---------------------------------------------------------------------------


def checkpoint(trainer: Trainer) -> None:
    """Every rank's own state (its queues, its ready batches, its dropout RNG) is gathered; rank 0 writes
    the one checkpoint (the weights, the bandits and the accounting are the same on every rank); the others
    wait until it is written."""
    if trainer.checkpoint_dir is None:
        return
    cuda = trainer.device.type == "cuda"
    mine = {"queue": trainer.queue.state_dict(), "ready": trainer.ready, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(trainer.device) if cuda else None}
    ranks = trainer.world.all_gather(mine)
    if trainer.world.is_main:
        trainer.rank_states = ranks
        trainer.save_checkpoint()
    trainer.world.barrier()


def restore_rank(trainer: Trainer, path: Path, ranks: list[dict[str, Any]] | None) -> None:
    """This rank's part of a checkpoint (a one-process checkpoint has none); one of another process count is
    refused (its queues are per rank), by a one-process run too."""
    size = 1 if trainer.world is None else trainer.world.size
    if (1 if ranks is None else len(ranks)) != size:
        raise TrainingError(
            f"{path}: written by a run of {1 if ranks is None else len(ranks)} process(es), this run has {size} "
            f"(train.distributed.nproc_per_node). It is not resumed; delete it to start over: "
            f"rm -r {trainer.checkpoint_dir}"
        )
    if ranks is None:
        return
    mine = ranks[trainer.world.rank]
    trainer.queue.load_state_dict(mine["queue"])
    trainer.ready = list(mine["ready"])
    torch.set_rng_state(mine["torch_rng"])
    if mine["cuda_rng"] is not None and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda_rng"], trainer.device)


def check_in_step(trainer: Trainer) -> None:
    """The ranks must end with bit-identical weights and bandits: DDP keeps the weights so, the joint decisions
    and replayed updates the bandits; a difference is a bug, and is not written as a result. Sets
    ``trainer.digests``."""
    bandits = {"policy": trainer.policy.state_dict(),
               "warmup": trainer.warmup_policy.state_dict() if trainer.warmup_policy is not None else None}
    mine = (digest(trainer.model.state_dict()), digest(bandits))
    every = trainer.world.all_gather(mine)
    if len(set(every)) > 1:
        raise TrainingError(
            "the ranks ended training out of step (sha256 of weights, bandits per rank: "
            f"{[(w[:12], s[:12]) for w, s in every]}); this is a bug, no model was written"
        )
    trainer.digests = mine
