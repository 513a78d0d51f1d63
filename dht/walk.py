"""The forward pass of the dynamic model walked from one stopping point to the next: the one loop over the layers
that training, its clean decision pass, inference, the exit ladder and FastBERT share.

A path stops at depths (Section 4.2: after the b fixed layers, then after each group of c layers; FastBERT: after
every layer). At each stopping point the walker hands a decision callback an :class:`At`: the depth, the hidden
states of the samples still walking, their masks and their rows in the batch. The callback reads what it needs (an
exit's logits, :meth:`At.logits`; pooled contexts for the bandits) and answers with a :class:`Next`: which samples
stop here (they leave the batch, which is cut to its longest remaining sample) and the heads the others run the
next segment with (Algorithm 2, lines 9-14). How depth is chosen is therefore the callback alone:

- UCB_L / UCB_cp choose each sample's L from S1 (:func:`dht.policy.predict`): the walk to b, then each depth's
  samples walk on, UCB_H and the TSB choosing each group's heads, and are read at L;
- FastBERT (:func:`dht.baselines.fastbert.predict_fastbert`) stops a sample at the first layer whose student is
  certain enough;
- a mode that decides stop or continue at every group boundary (from the pooled state and that depth's exit) stops
  the samples it chooses to at each :class:`At` and gives the others their heads.

The walker runs the layers with :meth:`DHTForSequenceClassification.run_layers` (a segment whose samples keep every
head runs the plain projections), or with the ``run`` a caller passes (training: which layers carry gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dht.model import DHTConfig, DHTForSequenceClassification

#: Runs layers ``start..stop-1`` on a state: ``run(state, keep, start, stop, heads)``, ``heads`` a BoolTensor
#: [B, stop - start, N_H] or None (every head).
Run = Callable[[Tensor, "Tensor | None", int, int, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class At:
    """Where a walk stands: the samples still walking, after ``depth`` layers."""

    model: DHTForSequenceClassification
    depth: int  # layers run so far (0: the embeddings)
    state: Tensor  # their hidden states [B', n, d], as the layers leave them (before a pre-LN model's final norm)
    keep: Tensor | None  # their key mask [B', n] (None: nothing is padded)
    mask: Tensor  # their attention mask [B', n] (what the pooled contexts read)
    rows: Tensor  # their rows in the batch the walk started with [B'] (CPU)
    next: int | None = None  # the next stopping point (None: this is the walk's last)

    @property
    def group(self) -> int | None:
        """The dynamic group (Section 4.2; ``config.dynamic_layer_groups()``) that starts here, if one does."""
        starts = [group.start for group in self.model.config.dynamic_layer_groups()]
        return starts.index(self.depth) if self.depth in starts else None

    def logits(self) -> Tensor:
        """The exit read here: the logits of this depth's exit head (:meth:`DHTForSequenceClassification.classify`)."""
        return self.model.classify(self.state, self.keep, self.depth)

    def select(self, rows: Tensor) -> At:
        """The walk of some of its samples (``rows``: their positions among this walk's, on the model's device)."""
        return replace(self, state=self.state[rows], keep=None if self.keep is None else self.keep[rows],
                       mask=self.mask[rows], rows=self.rows[rows.cpu()])


@dataclass(frozen=True)
class Next:
    """A decision callback's answer at a stopping point (None stands for ``Next()``: nobody stops, every head)."""

    stop: Tensor | None = None  # BoolTensor[B']: the samples that stop here
    heads: Tensor | None = None  # BoolTensor[B'' (those that go on), next - depth, N_H]: the next segment's heads


def start(model: DHTForSequenceClassification, ids: Tensor, mask: Tensor | None) -> At:
    """A walk's start: the embeddings of a batch (depth 0; ``mask`` None: nothing is padded)."""
    state, keep = model.embed(ids, mask)
    return At(model, 0, state, keep, torch.ones_like(ids) if mask is None else mask, torch.arange(ids.shape[0]))


def walk(at: At, points: Sequence[int], decide: Callable[[At], Next | None] | None = None,
         run: Run | None = None) -> At:
    """Walk on from ``at`` through ``points`` (ascending depths, none below ``at.depth``): run the layers to each
    point, ask ``decide`` there (no callback: nobody stops, every head), drop the samples that stop and run the
    others' next segment with the heads it chose. Returns where the walk ended: the last point with the samples
    that did not stop there (none when every sample stopped before it)."""
    model = at.model
    run = run or _run_layers(model)
    heads = None
    for i, point in enumerate(points):
        if point > at.depth:
            at = replace(at, depth=point, state=run(at.state, at.keep, at.depth, point, heads))
        at = replace(at, next=points[i + 1] if i + 1 < len(points) else None)
        step = (decide(at) if decide is not None else None) or Next()
        heads = step.heads
        if step.stop is not None and bool(step.stop.any()):
            at = _leave(at, step.stop)
            if not len(at.rows):
                break
    return at


def path_points(config: DHTConfig, layers: int) -> list[int]:
    """The stopping points of an L-layer path (Algorithm 2): after the b fixed layers, then after each dynamic group
    it enters (the last one cut at L), so the callback at a group's start chooses its heads and the one at L reads
    the exit."""
    b = min(config.fixed_layers, layers)
    return [b] + [min(group.stop, layers) for group in config.dynamic_layer_groups() if group.start < layers]


def exit_logits(model: DHTForSequenceClassification, ids: Tensor, mask: Tensor, depths: list[int]) -> list[Tensor]:
    """The logits after each of ``depths`` (ascending) with every head, each read by its depth's exit head (the one
    shared classifier, or with ``model.exit_heads: per_depth`` that depth's own), from one walk to the deepest: T24's
    counterfactual reads and the studies' exit ladder (dht.study_report). The caller sets the mode and the gradient."""
    out: list[Tensor] = []
    walk(start(model, ids, mask), depths, lambda at: out.append(at.logits()))
    return out


def _run_layers(model: DHTForSequenceClassification) -> Run:
    def run(state: Tensor, keep: Tensor | None, first: int, stop: int, heads: Tensor | None) -> Tensor:
        plain = heads is None or bool(heads.all())  # every head kept: the plain projections, no weight slices
        return model.run_layers(state, keep, first, stop, None if plain else heads.to(state.device))

    return run


def _leave(at: At, stop: Tensor) -> At:
    """The samples that stop leave the walk; the others' batch is cut to its longest remaining sample (right
    padding: the columns no remaining sample needs), and its key mask dropped when nothing is padded any more, so
    the unmasked kernels run (as :meth:`DHTForSequenceClassification.embed` does)."""
    stay = ~stop.to(at.state.device)
    at = replace(at, state=at.state[stay], keep=None if at.keep is None else at.keep[stay], mask=at.mask[stay],
                 rows=at.rows[stay.cpu()])
    if not len(at.rows):
        return at
    width = max(int(at.mask.sum(dim=1).max()), 1)
    state, keep, mask = at.state, at.keep, at.mask
    if width < state.shape[1]:
        state, mask = state[:, :width], mask[:, :width]
        keep = None if keep is None else keep[:, :width]
    if keep is not None and bool(keep.all()):
        keep = None
    return replace(at, state=state, keep=keep, mask=mask)
