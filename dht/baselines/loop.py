"""The optimisation loop the baselines share: batches over a seeded permutation, forward and loss, the guard's
check, backward, clipping, the optimizer and scheduler steps, the guard's check of the weights.

DistilBERT (:mod:`dht.baselines.distil`), FastBERT's self-distillation (:mod:`dht.baselines.fastbert`), NAS
pruning's fine-tuning (:mod:`dht.baselines.nas_prune`) and FlexiBERT's training of a queried architecture
(:mod:`dht.baselines.flexibert.search`) run :func:`train`; NAS pruning's search, which alternates two updates on
two halves of the data, runs :func:`batches`, :func:`cycle` and :func:`update` itself. What differs between them is
the loss (``loss_of``), the module trained, the optimizer and scheduler, clipping and the seeding around the loop,
all chosen by the caller. Random numbers are drawn only by :func:`batches` (one ``randperm`` per epoch from the
caller's generator) and by the caller's forward (dropout), in that order, so a seed gives the same run.
(The DHT trainer's loop, Algorithms 2-3 of the paper, is its own: :mod:`dht.trainer`.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dht.guard import FiniteGuard

LossOf = Callable[[Tensor], "Tensor | tuple[Tensor, Mapping[str, Tensor | float]]"]


def batches(rows: int | Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """One epoch: ``range(rows)`` (or the index tensor ``rows``) in an order drawn from ``generator``, cut into
    batches of ``batch_size`` (the last one shorter). The order is drawn when the first batch is asked for."""
    if isinstance(rows, int):
        order = torch.randperm(rows, generator=generator)
    else:
        order = rows[torch.randperm(len(rows), generator=generator)]
    for lo in range(0, len(order), batch_size):
        yield order[lo : lo + batch_size]


def cycle(rows: int | Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Epoch after epoch of :func:`batches`, without end (a new order for every epoch)."""
    while True:
        yield from batches(rows, batch_size, generator)


def update(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    guard: FiniteGuard,
    step: int,
    epoch: int | None = None,
    *,
    model: nn.Module | None = None,
    clip: float | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    what: str = "loss",
) -> None:
    """One optimisation step on ``loss``: stop on a non-finite loss (before its backward pass, :mod:`dht.guard`),
    backward, clip the gradient norm of ``model``'s parameters to ``clip``, step the optimizer and the scheduler,
    then stop on a non-finite weight of ``model`` (none checked without a model). ``step`` counts from 1; the
    guard's messages name ``epoch`` when given, and call the loss ``what``."""
    guard.loss(loss, step, epoch, what=what)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        if model is None:
            raise ValueError("update: clipping needs the model whose gradients to clip")
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if model is not None:
        guard.parameters(model.named_parameters(), step, epoch)


@dataclass
class Epoch:
    """What one epoch of :func:`train` saw, step by step: the batch sizes, the losses and the extra values
    ``loss_of`` returned (as floats, in step order)."""

    sizes: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    extras: dict[str, list[float]] = field(default_factory=dict)

    def mean(self, key: str = "loss") -> float:
        """The mean over the epoch's steps of the loss (``key="loss"``) or of an extra value."""
        values = self.losses if key == "loss" else self.extras.get(key, [])
        total = 0.0
        for value in values:  # in step order (not sum(), whose float rounding differs between Pythons)
            total += value
        return total / max(len(values), 1)

    def sample_mean(self) -> float:
        """The mean loss per sample (each step's loss weighted by its batch size)."""
        total = 0.0
        for loss, size in zip(self.losses, self.sizes, strict=True):
            total += loss * size
        return total / sum(self.sizes)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_of: LossOf,
    rows: int,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    guard: FiniteGuard,
    clip: float | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_steps: int | None = None,
    name_epoch: bool = True,
    on_epoch: Callable[[int, Epoch], None] | None = None,
    progress: str | None = None,
) -> list[Epoch]:
    """Train ``model`` for ``epochs`` passes over ``rows`` samples, in batches of a new seeded order every epoch
    (:func:`batches`), one :func:`update` per batch; stop early after ``max_steps`` updates.

    ``loss_of(index)`` runs the forward pass of the batch of sample indices ``index`` and returns its loss, or
    (loss, extras): named values recorded per step in :attr:`Epoch.extras` (a tensor is detached first).
    ``model`` is put in train mode at the start of every epoch; its gradients are clipped (``clip``) and its
    weights checked by the guard, whose messages name the epoch unless ``name_epoch`` is false. ``on_epoch`` is
    called after every epoch with (epoch number from 1, the epoch). ``progress`` names the training on a progress
    bar over all its steps (:func:`dht.progress.bar`: steps, ETA, epoch and recent loss; none without a name).
    Returns one :class:`Epoch` per epoch run.
    """
    from dht.progress import bar, finish, recent_mean

    history: list[Epoch] = []
    step = 0
    total = epochs * -(-rows // batch_size)
    shown = bar(total if max_steps is None else min(total, max_steps), progress or "", enabled=progress is not None)
    for epoch in range(1, epochs + 1):
        if max_steps is not None and step >= max_steps:
            break
        model.train()
        seen = Epoch()
        for index in batches(rows, batch_size, generator):
            if max_steps is not None and step >= max_steps:
                break
            out = loss_of(index)
            loss, extras = out if isinstance(out, tuple) else (out, {})
            step += 1
            update(loss, optimizer, guard, step, epoch if name_epoch else None, model=model, clip=clip,
                   scheduler=scheduler)
            seen.sizes.append(len(index))
            seen.losses.append(float(loss.detach()))
            for key, value in extras.items():
                seen.extras.setdefault(key, []).append(float(value.detach() if isinstance(value, Tensor) else value))
            shown.set_postfix(epoch=f"{epoch}/{epochs}", loss=f"{recent_mean(seen.losses):.4f}", refresh=False)
            shown.update(1)
        history.append(seen)
        if on_epoch is not None:
            on_epoch(epoch, seen)
    finish(shown)
    return history


def step_losses(history: list[Epoch], first_step: int = 1) -> list[tuple[int, float]]:
    """(optimizer step, loss) of every step of :func:`train`'s history, steps counted from `first_step`: the
    baselines' training curve on the step axis the DHT runs use (MLflow's ``train_loss``)."""
    losses = [loss for epoch in history for loss in epoch.losses]
    return list(enumerate(losses, start=first_step))
