"""FlexiBERT in the pipeline: the per-dataset BOSHNAS search and the retraining of the best architecture under a
FLOP budget, as the `flexibert_search` stage and the `baseline` stage's `flexibert-<ratio>` models use them.

The search (:func:`run_search`) trains each queried architecture on the training split and scores it on the
pipeline's validation split (``data.val_fraction``, held out of the training split by the data stage; the test
split is never seen), running BOSHNAS once per FLOP budget of ``run.baselines`` (ascending), each over the
candidates within that budget that were not queried yet, with ``evaluations`` split evenly between the budgets. An
architecture found for a smaller budget also counts for the larger ones. :func:`choose` then takes the most
accurate queried architecture within a budget, which :func:`retrain` trains on the training split (from
scratch: FlexiBERT fine-tunes a pre-trained model, which this project's scale does not have; see
docs/baselines-flexibert.md) and :func:`predictions` evaluates in the pipeline's :class:`dht.evaluation.Predictions`
format, so Table 2 compares it with every other model on the same terms.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dht.baselines.inference import static_predictions
from dht.config import Config, parse_baseline
from dht.evaluation import Predictions, SplitData
from dht.flops import FlopShape

from .flops import model_flops
from .model import FlexiBertForSequenceClassification
from .search import (
    TrainingEvaluator,
    best_under_budget,
    candidate_pool,
    pareto_front,
    predict_proba,
    search,
    train_and_evaluate,
)
from .space import Architecture, SpaceConfig

Arrays = Mapping[str, np.ndarray]


def budgets(cfg: Config) -> list[float]:
    """The FLOP budgets (ratios to the reference) of the `flexibert-<ratio>` baselines the profile runs, ascending."""
    found = {parse_baseline(name) for name in cfg.run.baselines}
    return sorted(value for kind, value in found if kind == "flexibert")


def reference_name(cfg: Config, reference: Any) -> str:
    """The FLOP ratios' 1.00x as the reports name it (dht.report.reference_label), "reference (vanilla-6, 6
    layers)": run.reference, with the depth of `reference`, the architecture as built from model.init (the
    search's FLOPs are counted against it; it is run.reference's full depth)."""
    return f"reference ({cfg.run.reference}, {FlopShape.of(reference).num_hidden_layers} layers)"


def space_of(cfg: Config) -> SpaceConfig:
    f = cfg.baselines.flexibert
    return SpaceConfig(hidden=tuple(f.hidden), layers=tuple(f.layers), heads=tuple(f.heads),
                       ffn_widths=tuple(f.ffn_widths), ffn_depths=tuple(f.ffn_depths), ops=tuple(f.ops))


def _train_kwargs(cfg: Config, meta: Mapping[str, Any], device: torch.device | str, seed: int) -> dict[str, Any]:
    f = cfg.baselines.flexibert
    return {"lr": f.learning_rate, "batch_size": cfg.train.batch_size, "seed": seed,
            "vocab_size": int(meta["vocab_size"]), "num_labels": int(meta["num_labels"]),
            "max_len": int(meta["max_length"]), "dropout": cfg.model.hidden_dropout_prob,
            "eval_batch_size": cfg.train.eval_batch_size, "device": device}


def run_search(cfg: Config, train: Arrays, val: Arrays, meta: Mapping[str, Any], reference: Any,
               device: torch.device | str = "cpu",
               on_query: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """BOSHNAS over the profile's design space, per FLOP budget, each query trained on `train` and scored on
    `val` (the validation split); the trace (one entry per trained architecture, with its validation accuracy,
    FLOPs, FLOP ratio to ``reference``, the surrogate's prediction and uncertainties, the budget it was searched
    for, and its training steps)."""
    f = cfg.baselines.flexibert
    wanted = budgets(cfg)
    if not wanted:
        raise ValueError("run.baselines has no flexibert-<ratio>: nothing to search for")
    if len(val["label"]) == 0:
        raise ValueError("the validation split is empty (data.val_fraction = 0): the search scores its queries on "
                         "it; set data.val_fraction above 0")
    n_search = len(train["label"])
    kwargs = _train_kwargs(cfg, meta, device, cfg.data_seed)  # one search per dataset, drawn with the data
    evaluator = TrainingEvaluator(train, val, epochs=f.search_epochs, max_steps=f.search_max_steps,
                                  progress="flexibert query", **kwargs)
    seq_len, num_labels = int(meta["max_length"]), int(meta["num_labels"])
    space = space_of(cfg)
    rng = np.random.default_rng(cfg.data_seed)
    trace: list[dict[str, Any]] = []
    for i, budget in enumerate(wanted):
        queried = {e["arch_id"] for e in trace}
        pool = [a for a in candidate_pool(space, rng, max_candidates=f.candidates, seq_len=seq_len, max_ratio=budget,
                                          reference=reference, num_labels=num_labels) if a.id not in queried]
        if not pool:
            raise ValueError(
                f"baselines.flexibert: no architecture of the design space is within {budget}x of the FLOPs of the "
                f"{reference_name(cfg, reference)} at length {seq_len}; allow smaller ones (hidden, layers, "
                "ffn_widths) or raise the budget")
        # Evaluations split evenly; the earlier budgets' leftovers go to the later ones.
        share = (f.evaluations - len(trace)) // (len(wanted) - i)

        def tag(entry: dict[str, Any], budget: float = budget, offset: int = len(trace)) -> None:
            steps = evaluator.results[entry["arch_id"]]["steps"]
            entry.update(step=offset + entry["step"], budget=budget, steps=steps,
                         train_samples=min(steps * cfg.train.batch_size, f.search_epochs * n_search))
            if on_query is not None:
                on_query(entry)

        trace += search(pool, evaluator, max(1, share), min(f.n_init, max(1, share)), rng, f.kappa,
                        seq_len=seq_len, num_labels=num_labels, reference=reference, on_query=tag)
    return trace


def search_train_flops(trace: list[Mapping[str, Any]]) -> float:
    """Training FLOPs the search spent: 3 x forward (backward = 2 x forward) per training sample per query."""
    return float(sum(3 * e["flops"] * e["train_samples"] for e in trace))


def choose(trace: list[Mapping[str, Any]], ratio: float) -> Architecture:
    best = best_under_budget(trace, ratio)
    if best is None:
        raise ValueError(
            f"no searched architecture is within {ratio}x of the reference's FLOPs; rerun the search with this budget "
            f"in run.baselines (flexibert-{ratio:g}) or more baselines.flexibert.evaluations")
    return Architecture.from_dict(best["arch"])


def retrain(cfg: Config, arch: Architecture, train: Arrays, val: Arrays, meta: Mapping[str, Any],
            device: torch.device | str = "cpu") -> tuple[FlexiBertForSequenceClassification, dict[str, Any]]:
    """Train ``arch`` on the training split for ``baselines.flexibert.epochs``; (model, what it cost, its loss per
    optimizer step and its ``val_accuracy`` on `val`, the validation split, NaN when empty)."""
    kwargs = _train_kwargs(cfg, meta, device, cfg.training_seed)  # one retraining per training seed
    result = train_and_evaluate(arch, train, val, epochs=cfg.baselines.flexibert.epochs,
                                progress="flexibert retraining", **kwargs)
    seq_len = int(meta["max_length"])
    # every sample once per epoch (the last batch of an epoch may be short, so steps x batch would overcount)
    samples = cfg.baselines.flexibert.epochs * len(train["label"])
    flops = 3 * model_flops(arch, seq_len, int(meta["num_labels"])) * samples
    return result.model, {"train_flops": float(flops), "train_loss": result.train_loss, "steps": result.steps,
                          "step_losses": result.step_losses, "val_accuracy": result.accuracy}


def predictions(model: FlexiBertForSequenceClassification, data: SplitData, batch_size: int, seq_len: int,
                device: torch.device | str = "cpu") -> Predictions:
    """A split's predictions in the pipeline's format: one static architecture for every sample, its FLOPs
    at the padded length (as :func:`dht.policy.predict` counts), heads per layer (1 for DFT/DCT mixing)."""
    arch: Architecture = model.config.arch
    split = {"input_ids": data.input_ids.numpy(), "attention_mask": data.attention_mask.numpy()}
    start = time.perf_counter()
    probs = torch.from_numpy(predict_proba(model, split, batch_size, device))
    seconds = time.perf_counter() - start
    num_labels = model.config.num_labels
    return static_predictions(probs, [layer.heads for layer in arch.layers],
                              model_flops(arch, seq_len, num_labels, "full"),
                              model_flops(arch, seq_len, num_labels, "linear"), seconds)


def search_plot(trace: list[Mapping[str, Any]], budget_ratios: list[float], title: str, reference: str) -> Any:
    """Accuracy against FLOP ratio of every queried architecture, the Pareto front, the budgets marked; the FLOP
    axis names `reference`, the ratios' 1.00x (:func:`reference_name`). A `matplotlib.figure.Figure`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), dpi=120, constrained_layout=True)
    ax = fig.add_subplot()
    x = [e["flop_ratio"] for e in trace]
    y = [e["accuracy"] for e in trace]
    sc = ax.scatter(x, y, c=[e["step"] for e in trace], cmap="viridis", s=36, edgecolors="black", linewidths=0.4)
    fig.colorbar(sc, ax=ax, label="query (order of the search)")
    front = pareto_front(trace, cost="flop_ratio")
    ax.step([e["flop_ratio"] for e in front], [e["accuracy"] for e in front], where="post", color="tab:red",
            linestyle="--", label="Pareto front")
    for b in budget_ratios:
        ax.axvline(b, color="grey", linewidth=0.8, linestyle=":")
        ax.text(b, ax.get_ylim()[1], f" {b:g}x", va="top", fontsize=8, color="grey")
    ax.set_xlabel(f"inference FLOPs relative to the {reference}")
    ax.set_ylabel("validation accuracy (the validation split)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def search_figure(trace: list[Mapping[str, Any]], budget_ratios: list[float], out: str | Path, title: str, *,
                  reference: str) -> Path:
    """:func:`search_plot` written to `out` (PNG, rendered by Agg: no GUI backend)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    search_plot(trace, budget_ratios, title, reference).savefig(out)
    return out
