"""BOSHNAS-style search over FlexiBERT architectures (Tuli et al. 2022, BOSHNAS), adapted.

BOSHNAS (Bayesian Optimization using Second-order gradients and Heteroscedastic models for NAS) repeats:

1. fit the heteroscedastic surrogate on the embeddings of the architectures trained so far;
2. with probability 1 - alpha - beta pick the next query by an upper confidence bound (UCB) on the surrogate,
   with probability alpha the candidate of largest epistemic uncertainty, with probability beta a random one
   ("uncertainty" and "diversity" sampling; alpha = beta = 0.1 in the authors' ``run_boshnas.py``);
3. train the query, initialising it from the nearest already trained neighbour by copying every weight whose
   name and shape match (weight transfer), and add its accuracy to the data.

The acquisition here is evaluated exactly over a finite candidate set (the enumerated or sampled space, filtered
by the FLOP budget): UCB = mean + kappa * sqrt(epistemic + aleatoric). BOSHNAS instead runs gradient ascent with
AdaHessian (the "second-order" of its name) from random starts in the continuous embedding space and snaps each
result to the nearest valid embedding. On a candidate set of thousands, exhaustive evaluation finds the exact
maximiser of what that optimisation approximates, and budget filtering is exact; see docs/baselines-flexibert.md.

The caller supplies ``evaluate_fn(arch, parent) -> accuracy``; :class:`TrainingEvaluator` is one that trains
briefly with :func:`train_and_evaluate` and remembers every trained model for inheritance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dht.baselines import loop
from dht.guard import FiniteGuard

from .embedding import ArchEmbedder
from .flops import flop_ratio, model_flops, within_budget
from .model import FlexiBertConfig, FlexiBertForSequenceClassification
from .space import Architecture, SpaceConfig, enumerate_space, sample_unique
from .surrogate import HeteroscedasticEnsemble

__all__ = [
    "EvaluateFn",
    "TrainResult",
    "TrainingEvaluator",
    "best_under_budget",
    "candidate_pool",
    "inherit_weights",
    "inheritance_overlap",
    "nearest",
    "pareto_front",
    "predict_proba",
    "search",
    "train_and_evaluate",
]

EvaluateFn = Callable[[Architecture, Architecture | None], float]
Split = Mapping[str, np.ndarray]  # input_ids [N, T], attention_mask [N, T], label [N] (dht.tokenization.load_processed)


# --- weight inheritance ---------------------------------------------------------------------------------------


def _state_dict_of(source: nn.Module | Mapping[str, Tensor] | str | Path) -> Mapping[str, Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, str | Path):
        return FlexiBertForSequenceClassification.from_pretrained(source).state_dict()
    return source


@torch.no_grad()
def inherit_weights(model: nn.Module, source: nn.Module | Mapping[str, Tensor] | str | Path) -> list[str]:
    """Copy into ``model`` every tensor of ``source`` (a model, a state dict or a saved directory) whose name and
    shape match (FlexiBERT's weight transfer); returns the copied names. The rest keeps its fresh initialisation."""
    src = _state_dict_of(source)
    copied = []
    for name, tensor in model.state_dict().items():
        other = src.get(name)
        if other is not None and tuple(other.shape) == tuple(tensor.shape):
            tensor.copy_(other.to(dtype=tensor.dtype, device=tensor.device))
            copied.append(name)
    return copied


def _shapes(arch: Architecture, vocab_size: int, num_labels: int, max_len: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = FlexiBertForSequenceClassification(FlexiBertConfig(arch, vocab_size, num_labels, max_len))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def inheritance_overlap(child: Architecture, parent: Architecture, vocab_size: int = 1000, num_labels: int = 2,
                        max_len: int = 128) -> float:
    """Share of the child's parameters (by count) that :func:`inherit_weights` would copy from the parent (the
    authors' "overlap"; they transfer only from neighbours with overlap >= 0.8)."""
    c, p = _shapes(child, vocab_size, num_labels, max_len), _shapes(parent, vocab_size, num_labels, max_len)
    total = sum(math.prod(s) for s in c.values())
    same = sum(math.prod(s) for k, s in c.items() if p.get(k) == s)
    return same / total


# --- training -------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    accuracy: float
    model: FlexiBertForSequenceClassification
    steps: int
    train_loss: float  # mean loss of the last epoch
    step_losses: list[tuple[int, float]] = field(default_factory=list)  # (optimizer step, loss) of every step
    inherited: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _tensors(split: Split) -> tuple[Tensor, Tensor, Tensor]:
    for key in ("input_ids", "attention_mask", "label"):
        if key not in split:
            raise KeyError(f"split needs {key!r} (as dht.tokenization.load_processed returns)")
    # np.array copies: arrays read from parquet are read-only, which torch warns about (and may not write to).
    ids = torch.as_tensor(np.array(split["input_ids"]), dtype=torch.long)
    mask = torch.as_tensor(np.array(split["attention_mask"]), dtype=torch.long)
    labels = torch.as_tensor(np.array(split["label"]), dtype=torch.long)
    return ids, mask, labels


@torch.no_grad()
def predict_proba(model: FlexiBertForSequenceClassification, split: Split, batch_size: int = 128,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """Class probabilities [N, num_labels] (eval mode, full padded length)."""
    ids, mask, _ = _tensors({**split, "label": split.get("label", np.zeros(len(split["input_ids"])))})
    model.eval().to(device)
    out = [model(ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device)).logits.softmax(-1).cpu()
           for i in range(0, ids.shape[0], batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.num_labels), dtype=np.float32)


def train_and_evaluate(
    arch: Architecture,
    train_split: Split,
    val_split: Split,
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    inherit_from: nn.Module | Mapping[str, Tensor] | str | Path | None = None,
    vocab_size: int | None = None,
    num_labels: int | None = None,
    max_len: int | None = None,
    dropout: float = 0.1,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    grad_clip: float | None = 1.0,
    eval_batch_size: int = 128,
    device: torch.device | str = "cpu",
    guard: FiniteGuard | None = None,
    progress: str | None = None,
) -> TrainResult:
    """Train ``arch`` briefly on ``train_split`` and return its accuracy on ``val_split``.

    FlexiBERT fine-tunes each queried model for a few epochs; here training is from scratch or
    from ``inherit_from`` (weights copied by :func:`inherit_weights`), AdamW with linear warm-up and decay in the
    baselines' loop (:func:`dht.baselines.loop.train`), seeded: the same arguments give the same result. The global torch RNG is left untouched.

    ``vocab_size`` / ``num_labels`` default to what the data show (max id + 1, max label + 1); pass the
    tokenizer's and dataset's real sizes (``meta.json``) when the splits may not contain them all.
    ``max_len`` defaults to the padded length. Sequences are not trimmed to the longest sample: DFT/DCT mix over
    the padded length, and the FLOPs of :mod:`dht.baselines.flexibert.flops` are counted at that length.
    A non-finite loss or weight stops it (``guard``, :mod:`dht.guard`; default: names the architecture and
    ``baselines.flexibert.learning_rate``). ``progress`` names the training on a progress bar
    (:func:`dht.baselines.loop.train`).
    """
    guard = guard or FiniteGuard(f"flexibert: training {arch.id}",
                                 f"lower baselines.flexibert.learning_rate (now {lr:g})")
    start = time.perf_counter()
    ids, mask, labels = _tensors(train_split)
    vids, vmask, vlabels = _tensors(val_split)
    if ids.shape[0] == 0:
        raise ValueError("empty training split")
    vocab_size = vocab_size or int(max(ids.max(), vids.max() if vids.numel() else 0)) + 1
    num_labels = num_labels or max(int(max(labels.max(), vlabels.max() if vlabels.numel() else 0)) + 1, 2)
    max_len = max_len or ids.shape[1]
    steps_per_epoch = math.ceil(ids.shape[0] / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FlexiBertForSequenceClassification(FlexiBertConfig(arch, vocab_size, num_labels, max_len, dropout))
        inherited = inherit_weights(model, inherit_from) if inherit_from is not None else []
        model.to(device).train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr)
        warm = max(1, int(warmup_ratio * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))

        def loss_of(index: Tensor) -> Tensor:
            return model(ids[index].to(device), mask[index].to(device), labels[index].to(device)).loss

        # `total` steps bound the epochs; the guard's messages name the step only.
        history = loop.train(model, opt, loss_of, ids.shape[0], epochs=epochs, batch_size=batch_size,
                             generator=torch.Generator().manual_seed(seed), guard=guard, clip=grad_clip,
                             scheduler=sched, max_steps=total, name_epoch=False, progress=progress)
    step = sum(len(epoch.losses) for epoch in history)
    epoch_losses = history[-1].losses if history else []  # the last epoch's
    probs = predict_proba(model, val_split, eval_batch_size, device)
    accuracy = float((probs.argmax(-1) == vlabels.numpy()).mean()) if len(probs) else float("nan")
    return TrainResult(accuracy=accuracy, model=model.cpu(), steps=step,
                       train_loss=float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
                       step_losses=loop.step_losses(history),
                       inherited=inherited, seconds=time.perf_counter() - start)


class TrainingEvaluator:
    """An ``evaluate_fn`` for :func:`search`: trains with :func:`train_and_evaluate`, inheriting from the
    parent's trained weights, and keeps every trained model's state dict (CPU) and result by architecture id.

    ``keep_models=False`` drops state dicts (no inheritance then) to bound memory on long searches.
    """

    def __init__(self, train_split: Split, val_split: Split, keep_models: bool = True, **train_kwargs: Any):
        self.train_split, self.val_split = train_split, val_split
        self.keep_models, self.train_kwargs = keep_models, train_kwargs
        self.state_dicts: dict[str, dict[str, Tensor]] = {}
        self.results: dict[str, dict[str, Any]] = {}

    def __call__(self, arch: Architecture, parent: Architecture | None) -> float:
        source = self.state_dicts.get(parent.id) if parent is not None else None
        result = train_and_evaluate(arch, self.train_split, self.val_split, inherit_from=source, **self.train_kwargs)
        if self.keep_models:
            self.state_dicts[arch.id] = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
        self.results[arch.id] = {"accuracy": result.accuracy, "steps": result.steps, "train_loss": result.train_loss,
                                 "inherited": len(result.inherited), "seconds": result.seconds,
                                 "parent_id": parent.id if source is not None and parent is not None else None}
        return result.accuracy

    def model(self, arch: Architecture | str) -> FlexiBertForSequenceClassification:
        """Rebuild a trained model (needs ``keep_models``)."""
        arch_id = arch if isinstance(arch, str) else arch.id
        if arch_id not in self.state_dicts:
            raise KeyError(f"{arch_id}: not trained by this evaluator (or keep_models=False)")
        state = self.state_dicts[arch_id]
        a = Architecture.from_id(arch_id)
        vocab = state["word_embeddings.weight"].shape[0]
        num_labels = state["classifier.weight"].shape[0]
        max_len = state["position_embeddings.weight"].shape[0]
        model = FlexiBertForSequenceClassification(
            FlexiBertConfig(a, vocab, num_labels, max_len, self.train_kwargs.get("dropout", 0.1)))
        model.load_state_dict(state)
        return model.eval()


# --- candidates, search and read-out --------------------------------------------------------------------------


def candidate_pool(
    space: SpaceConfig,
    rng: np.random.Generator,
    *,
    max_candidates: int = 5000,
    seq_len: int | None = None,
    max_ratio: float | None = None,
    max_flops: int | None = None,
    reference: Any = None,
    num_labels: int = 2,
) -> list[Architecture]:
    """The search's candidate set: the whole space if it has at most ``max_candidates`` architectures,
    otherwise ``max_candidates`` distinct samples; then filtered by the FLOP budget when one is given."""
    archs = enumerate_space(space) if space.size() <= max_candidates else sample_unique(space, max_candidates, rng)
    if max_ratio is None and max_flops is None:
        return archs
    if seq_len is None:
        raise ValueError("a FLOP budget needs seq_len")
    return within_budget(archs, seq_len, max_flops=max_flops, max_ratio=max_ratio, reference=reference,
                         num_labels=num_labels)


def nearest(target: np.ndarray, pool: np.ndarray) -> int:
    """Index of the row of ``pool`` closest (Euclidean) to ``target``; ties go to the earliest."""
    return int(np.argmin(np.linalg.norm(pool - target[None], axis=1)))


def search(
    candidates: Sequence[Architecture],
    evaluate_fn: EvaluateFn,
    budget: int,
    n_init: int,
    rng: np.random.Generator,
    kappa: float = 0.5,
    *,
    embedder: ArchEmbedder | None = None,
    surrogate_factory: Callable[[int], HeteroscedasticEnsemble] | None = None,
    unc_prob: float = 0.1,
    div_prob: float = 0.1,
    inherit: bool = True,
    seq_len: int | None = None,
    num_labels: int = 2,
    reference: Any = None,
    on_query: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run BOSHNAS for ``budget`` evaluations over ``candidates``; returns the trace (one dict per query).

    Args:
        candidates: the architectures allowed (e.g. :func:`candidate_pool`, already within the FLOP budget).
        evaluate_fn: ``(arch, parent) -> validation accuracy``; ``parent`` is the nearest already evaluated
            architecture to inherit weights from (None for the initial random queries or with ``inherit=False``).
        budget: total evaluations, ``n_init`` of them random (BOSHNAS's initial sample).
        rng: numpy Generator; all randomness (initial sample, the alpha/beta draws, surrogate seeds) comes from it.
        kappa: UCB weight of sqrt(epistemic + aleatoric) (0.5 in the authors' ``acq.py``).
        embedder: architecture embedding (default: fitted to the candidates).
        surrogate_factory: ``seed -> unfitted surrogate``; default a 5-member :class:`HeteroscedasticEnsemble`.
        unc_prob, div_prob: probabilities of uncertainty and diversity sampling (0.1 each, as the authors).
        seq_len, num_labels, reference: for the trace's ``flops`` (needs seq_len) and ``flop_ratio`` (needs
            reference, a :mod:`dht.flops` config-like such as 12-VaBERT's).
        on_query: called with each trace entry as soon as it exists (logging, checkpointing).

    Trace entry keys: step, method (init / ucb / uncertainty / diversity), arch_id, arch, accuracy, flops,
    flop_ratio, predicted_mean, epistemic, aleatoric, acquisition, parent_id, seconds.
    """
    unique: dict[str, Architecture] = {}
    for a in candidates:
        unique.setdefault(a.id, a)
    pool = list(unique.values())
    if not pool:
        raise ValueError("no candidates (is the FLOP budget below every architecture?)")
    if budget < 1 or n_init < 1:
        raise ValueError("budget and n_init must be >= 1")
    if not 0 <= unc_prob + div_prob <= 1 or unc_prob < 0 or div_prob < 0:
        raise ValueError("unc_prob and div_prob must be >= 0 with sum <= 1")
    budget = min(budget, len(pool))
    n_init = min(n_init, budget)
    embedder = embedder or ArchEmbedder.for_architectures(pool)
    X = embedder.embed_many(pool)
    factory = surrogate_factory or (lambda seed: HeteroscedasticEnsemble(seed=seed))

    trace: list[dict[str, Any]] = []
    done: list[int] = []  # indices into pool, in query order
    remaining = np.ones(len(pool), dtype=bool)

    def run(i: int, method: str, pred: tuple[float, float, float, float] | None) -> None:
        arch = pool[i]
        parent = pool[done[nearest(X[i], X[done])]] if inherit and done and method != "init" else None
        t0 = time.perf_counter()
        acc = float(evaluate_fn(arch, parent))
        flops = model_flops(arch, seq_len, num_labels) if seq_len is not None else None
        entry = {
            "step": len(trace),
            "method": method,
            "arch_id": arch.id,
            "arch": arch.to_dict(),
            "accuracy": acc,
            "flops": flops,
            "flop_ratio": flop_ratio(arch, seq_len, reference, num_labels) if seq_len and reference is not None else None,
            "predicted_mean": None if pred is None else pred[0],
            "epistemic": None if pred is None else pred[1],
            "aleatoric": None if pred is None else pred[2],
            "acquisition": None if pred is None else pred[3],
            "parent_id": parent.id if parent is not None else None,
            "seconds": time.perf_counter() - t0,
        }
        trace.append(entry)
        done.append(i)
        remaining[i] = False
        if on_query is not None:
            on_query(entry)

    for i in rng.choice(len(pool), size=n_init, replace=False):
        run(int(i), "init", None)

    while len(trace) < budget:
        y = np.array([e["accuracy"] for e in trace])
        surrogate = factory(int(rng.integers(2**31))).fit(X[done], y)
        idx = np.flatnonzero(remaining)
        p = surrogate.predict(X[idx])
        ucb = p.mean + kappa * np.sqrt(p.epistemic + p.aleatoric)
        u = rng.random()
        if u < div_prob:
            j, method = int(rng.integers(len(idx))), "diversity"
        elif u < div_prob + unc_prob:
            j, method = int(np.argmax(p.epistemic)), "uncertainty"
        else:
            j, method = int(np.argmax(ucb)), "ucb"
        run(int(idx[j]), method, (float(p.mean[j]), float(p.epistemic[j]), float(p.aleatoric[j]), float(ucb[j])))
    return trace


def best_under_budget(trace: Sequence[Mapping[str, Any]], ratio: float, key: str = "flop_ratio") -> dict[str, Any] | None:
    """The most accurate queried architecture with ``trace[key] <= ratio`` (fewer FLOPs breaks ties); None if
    no entry fits. ``key="flops"`` applies an absolute FLOP budget instead."""
    fits = [e for e in trace if e.get(key) is not None and e[key] <= ratio * (1 + 1e-12)]
    if not fits:
        return None
    return dict(max(fits, key=lambda e: (e["accuracy"], -e[key])))


def pareto_front(trace: Sequence[Mapping[str, Any]], cost: str = "flops") -> list[dict[str, Any]]:
    """Entries not dominated in (lower ``cost``, higher accuracy), cheapest first."""
    rows = sorted((e for e in trace if e.get(cost) is not None), key=lambda e: (e[cost], -e["accuracy"]))
    front: list[dict[str, Any]] = []
    for e in rows:
        if not front or e["accuracy"] > front[-1]["accuracy"]:
            front.append(dict(e))
    return front
