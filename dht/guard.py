"""One guard for every training loop: a non-finite loss or parameter stops the run.

A loss that is NaN or infinite, or a weight that became so after an update, means the run has diverged (a
learning rate far too high, broken data); going on would write a model of NaNs and metrics that look like a
result (a NaN model predicts one class: an accuracy of 1/K, FLOPs of an architecture pruned to nothing). Every
training loop of the project (the DHT trainer, DistilBERT, FastBERT, NAS pruning's search and fine-tuning,
FlexiBERT's search and retraining) checks its loss before the backward pass and its parameters after the
optimizer step through :class:`FiniteGuard`, which raises :class:`NonFiniteError` naming the stage, the step
and what to change. The stage scripts turn it into one line and a non-zero exit before anything is written,
inside the MLflow run, which is then marked FAILED.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit); the message says why."""


class NonFiniteError(TrainingError):
    """A loss or a parameter became NaN or infinite; the message names the stage, the step and the fix."""


@dataclass(frozen=True)
class FiniteGuard:
    """Checks of one training loop. ``stage`` says what trains (``"distil: distillation"``), ``fix`` what to
    change (``"lower baselines.distil.learning_rate (now 1e+06)"``)."""

    stage: str
    fix: str

    def loss(self, value: Tensor, step: int, epoch: int | None = None, what: str = "loss") -> None:
        """Stop when ``value`` (a loss, before its backward pass) is not finite. ``step`` counts from 1."""
        if not bool(torch.isfinite(value.detach()).all()):
            shown = float(value.detach().float().flatten()[0]) if value.numel() == 1 else "not finite"
            raise NonFiniteError(self.message(f"non-finite {what} ({shown})", step, epoch))

    def parameters(self, named: Iterable[tuple[str, Tensor]], step: int, epoch: int | None = None) -> None:
        """Stop when a parameter is not finite (after the optimizer step ``step``)."""
        named = list(named)
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]) if named else None
        if finite is None or bool(finite.all()):
            return
        bad = [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
        listed = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise NonFiniteError(self.message(
            f"{len(bad)} of {len(named)} parameter tensors non-finite after the update ({listed})", step, epoch))

    def message(self, what: str, step: int, epoch: int | None = None) -> str:
        where = f"step {step}" if epoch is None else f"epoch {epoch}, step {step}"
        return f"{self.stage}: {what} at {where}; the run diverged: {self.fix}"
