"""The search (report Sections 4.1, 5.3, 5.5): first-order DARTS on the supernet, alternating an architecture
step (cross-entropy plus the cost loss) and a weight step, on two halves of the training data."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dht.baselines import loop
from dht.baselines.nas_prune.arch import PrunedArch, teacher_fields
from dht.baselines.nas_prune.cost import Convention, pruned_flops, tas_cost_loss
from dht.baselines.nas_prune.masks import unit_gates
from dht.baselines.nas_prune.pruned import KEEP_THRESHOLD, derive_arch, fit_threshold
from dht.baselines.nas_prune.supernet import Supernet
from dht.evaluation import SplitData
from dht.flops import full_model_flops, train_flops
from dht.guard import FiniteGuard
from dht.model import DHTForSequenceClassification
from dht.progress import bar, finish, recent_mean

ALPHA_CLIP = 10.0  # dimension alphas stay in [-10, 10] (see dht.baselines.nas_prune.masks._RescaledSigmoid)
HEAD_LR_SCALE = 0.1  # head alphas learn at 0.1 x lr_arch (see search)
SEARCH_FILE = "search.json"
ALPHAS_FILE = "alphas.pt"


@dataclass
class SearchResult:
    """What :func:`search` found.

    Attributes:
        alphas: the architecture variables ("embed" [d], "qk"/"v" [N_L, d], "ffn" [N_L, f], "heads" [N_L, N_H]).
        arch: the extracted architecture (units with a gate above ``threshold``, see :func:`fit_threshold`).
        threshold: the keep threshold used (0.01, the report's, unless moved to enter the cost band).
        history: one dict per epoch: mean CE of the architecture and weight steps, mean cost loss (equation (4)),
            mean sampled FLOP ratio F_cost / full, and at the epoch's end the expected ratio E_cost / full and the
            ratio of the architecture at the 0.01 threshold.
        train_flops: FLOPs spent by the search (full convention; forward + backward of every step).
        full_flops, target_flops: the teacher's FLOPs and R = r x full, per sample, in ``convention``.
        expected_flop_ratio: E_cost / full at the end of the search.
        flop_ratio: FLOPs of ``arch`` / full (``convention``); within_tolerance: |flop_ratio - r| <= t r.
        settings: the arguments of the search.
        step_losses: the weight step's CE of every search step, in order (the search's training curve).
    """

    alphas: dict[str, Tensor]
    arch: PrunedArch
    threshold: float
    history: list[dict[str, Any]]
    train_flops: float
    full_flops: float
    target_flops: float
    expected_flop_ratio: float
    flop_ratio: float
    within_tolerance: bool
    settings: dict[str, Any] = field(default_factory=dict)
    step_losses: list[float] = field(default_factory=list)

    @property
    def masks(self) -> dict[str, Tensor]:
        """sigmoid(alpha) of the dimensions and N_H * softmax(alpha) of the heads (per layer)."""
        return unit_gates(self.alphas)

    def save(self, out_dir: str | Path) -> None:
        """``search.json`` (everything but the alphas) and ``alphas.pt``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        info = {k: v for k, v in asdict(self).items() if k not in ("alphas", "arch")}
        info["arch"] = self.arch.to_dict()
        (out_dir / SEARCH_FILE).write_text(json.dumps(info, indent=1) + "\n")
        torch.save(self.alphas, out_dir / ALPHAS_FILE)

    @classmethod
    def load(cls, out_dir: str | Path) -> SearchResult:
        out_dir = Path(out_dir)
        info = json.loads((out_dir / SEARCH_FILE).read_text())
        info["arch"] = PrunedArch.from_dict(info["arch"])
        alphas = torch.load(out_dir / ALPHAS_FILE, map_location="cpu", weights_only=True)
        return cls(alphas=alphas, **info)


def _halves(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=generator)
    return perm[: n // 2], perm[n // 2 :]


def search(
    teacher: DHTForSequenceClassification,
    train: SplitData,
    target_ratio: float,
    lambda_cost: float,
    tolerance: float,
    epochs: int,
    lr_weights: float,
    lr_arch: float,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    seq_len: int,
    *,
    convention: Convention = "full",
    threshold: float = KEEP_THRESHOLD,
    alpha_clip: float = ALPHA_CLIP,
    head_lr_scale: float = HEAD_LR_SCALE,
    guard: FiniteGuard | None = None,
) -> SearchResult:
    """Differentiable architecture search for a pruned teacher (report Sections 5.3-5.5, first-order DARTS).

    The training data are split once (seeded) into two halves, as DARTS and TAS split train/validation (report
    Sections 4.1-4.2). Every step first updates the architecture variables on a batch of the second half with
    ``L_arch = CE + lambda_cost * L_cost`` (equations (3)-(4)) and the weights fixed (first-order: xi = 0 in
    Algorithm 1), then the supernet weights on a batch of the first half with CE and the architecture fixed.
    Both steps run an architecture sampled from the masks (TAS's sampling, report Section 4.2; see
    :meth:`Supernet.sampled_gates`); ``F_cost`` is the cost of the architecture sampled for the step and
    ``E_cost`` the expected cost. Architecture variables: Adam (betas (0.5, 0.999) as DARTS, no weight decay,
    which would pull alphas towards 0), dimension alphas clipped to ``[-alpha_clip, alpha_clip]``; weights:
    AdamW. Both learning rates follow a cosine schedule to 0 over the search (DARTS's schedule for the weights).
    An epoch is one pass over the first half.

    Args:
        teacher: the trained model; not modified (the supernet trains a private copy of its weights).
        train: training split. target_ratio: r, with R = r x the teacher's FLOPs (``convention``, ``seq_len``).
        lambda_cost: weight of the cost loss. tolerance: t of equation (4).
        epochs, lr_weights, lr_arch, batch_size: optimisation. device, seed: where and how reproducibly.
        seq_len: the padded length n that the FLOP counts use (the pipeline's ``seq_len``).
        convention: FLOP convention of E_cost, F_cost and R. threshold: the keep threshold of Section 5.5.1.
        alpha_clip: bound of the dimension alphas. head_lr_scale: the head alphas learn at
            ``head_lr_scale x lr_arch`` (their useful range, a few units of log-weight, is much narrower than the
            masks' [-5, 5], and Adam turns their often tiny CE gradients into full-size steps).
        guard: stops on a non-finite loss, weight or architecture variable (:mod:`dht.guard`; default: names
            ``baselines.nas_prune.lr_weights`` and ``lr_arch``).

    Returns:
        :class:`SearchResult` with the extracted architecture (:func:`fit_threshold`).
    """
    if not 0 < target_ratio <= 1:
        raise ValueError(f"target_ratio must be in (0, 1], got {target_ratio}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    if len(train) < 2:
        raise ValueError("search needs at least two training samples (one per half)")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    guard = guard or FiniteGuard("nas-prune: architecture search", f"lower baselines.nas_prune.lr_weights (now "
                                 f"{lr_weights:g}) or baselines.nas_prune.lr_arch (now {lr_arch:g})")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    fields = teacher_fields(teacher)
    conf = teacher.config
    full = float(full_model_flops(seq_len, conf, convention, "inference"))
    target = target_ratio * full
    # Training FLOPs per sample (full convention, the pipeline's accounting): the supernet computes every
    # dimension and head. Weight step: forward + backward (2x). Architecture step: the weights are frozen, so the
    # backward computes activation gradients only (dht.flops.train_flops with every layer frozen).
    all_heads = [conf.num_attention_heads] * conf.num_hidden_layers
    weight_step = train_flops(seq_len, all_heads, conf, "full", include_s1=False)
    arch_step = train_flops(seq_len, all_heads, conf, "full", include_s1=False,
                            frozen_layers=range(conf.num_hidden_layers))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        net = Supernet(teacher, generator=gen).to(device)
        weight_opt = torch.optim.AdamW(net.weight_parameters(), lr=lr_weights)
        arch_opt = torch.optim.Adam(
            [{"params": [net.alpha_embed, net.alpha_qk, net.alpha_v, net.alpha_ffn]},
             {"params": [net.alpha_heads], "lr": lr_arch * head_lr_scale}],
            lr=lr_arch, betas=(0.5, 0.999),
        )
        weight_half, arch_half = _halves(len(train), gen)
        total_steps = max(epochs * math.ceil(len(weight_half) / batch_size), 1)
        schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps) for opt in (weight_opt, arch_opt)]
        dims = [net.alpha_embed, net.alpha_qk, net.alpha_v, net.alpha_ffn]
        history: list[dict[str, Any]] = []
        spent = 0.0
        arch_iter = loop.cycle(arch_half, batch_size, gen)
        step = 0
        step_losses: list[float] = []
        shown = bar(total_steps, "nas-prune search")
        for epoch in range(epochs):
            sums = {"ce": 0.0, "ce_weights": 0.0, "cost_loss": 0.0, "sampled_flop_ratio": 0.0}
            steps = 0
            for w_index in loop.batches(weight_half, batch_size, gen):
                a_index = next(arch_iter)
                # Architecture step (equation (3)), weights fixed.
                for p in net.weight_parameters():
                    p.requires_grad_(False)
                ids, mask, labels = train.batch(a_index, device)
                gates = net.sampled_gates(gen)
                ce = F.cross_entropy(net(ids, mask, gates, dropout=True), labels)
                expected = net.expected_flops(seq_len, convention)
                actual = float(net.expected_flops(seq_len, convention, {k: t.detach() for k, t in gates.items()}))
                cost = tas_cost_loss(expected, actual, target, tolerance)
                step += 1
                arch_loss = ce + lambda_cost * cost
                loop.update(arch_loss, arch_opt, guard, step, epoch + 1, what="architecture loss")
                with torch.no_grad():
                    for alpha in dims:
                        alpha.clamp_(-alpha_clip, alpha_clip)
                for p in net.weight_parameters():
                    p.requires_grad_(True)
                # Weight step, architecture fixed (a fresh sample).
                ids, mask, labels = train.batch(w_index, device)
                with torch.no_grad():
                    gates = {k: t.detach() for k, t in net.sampled_gates(gen).items()}
                ce_w = F.cross_entropy(net(ids, mask, gates, dropout=True), labels)
                # The guard checks every parameter of the supernet, the alphas too.
                loop.update(ce_w, weight_opt, guard, step, epoch + 1, model=net, what="weight loss")
                for schedule in schedules:
                    schedule.step()
                spent += len(a_index) * arch_step + len(w_index) * weight_step
                sums["ce"] += float(ce.detach())
                sums["ce_weights"] += float(ce_w.detach())
                sums["cost_loss"] += float(cost.detach())
                sums["sampled_flop_ratio"] += actual / full
                steps += 1
                step_losses.append(float(ce_w.detach()))
                shown.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{recent_mean(step_losses):.4f}", refresh=False)
                shown.update(1)
            with torch.no_grad():
                expected_ratio = float(net.expected_flops(seq_len, convention)) / full
            at_threshold = pruned_flops(derive_arch(net.alphas(), fields, threshold), seq_len, convention)
            history.append({"epoch": epoch + 1, **{k: v / max(steps, 1) for k, v in sums.items()},
                            "expected_flop_ratio": expected_ratio, "threshold_flop_ratio": at_threshold / full})
        alphas = net.alphas()
        finish(shown)
    tau, arch = fit_threshold(alphas, fields, target, tolerance, seq_len, convention, threshold)
    ratio = pruned_flops(arch, seq_len, convention) / full
    settings = {"target_ratio": target_ratio, "lambda_cost": lambda_cost, "tolerance": tolerance, "epochs": epochs,
                "lr_weights": lr_weights, "lr_arch": lr_arch, "batch_size": batch_size, "seed": seed,
                "seq_len": seq_len, "convention": convention, "threshold": threshold, "alpha_clip": alpha_clip,
                "head_lr_scale": head_lr_scale}
    return SearchResult(alphas, arch, tau, history, spent, full, target, expected_ratio, ratio,
                        abs(ratio - target_ratio) <= tolerance * target_ratio + 1e-12, settings, step_losses)
