"""Fine-tuning of the extracted model by distillation from the teacher (report Section 4.2), and its predictions
in the pipeline's format."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dht.baselines import loop
from dht.baselines.inference import predict_probs, static_predictions
from dht.baselines.nas_prune.cost import pruned_flops
from dht.baselines.nas_prune.pruned import PrunedBert
from dht.evaluation import Predictions, SplitData
from dht.flops import full_model_flops
from dht.guard import FiniteGuard
from dht.model import DHTForSequenceClassification


def finetune(
    pruned: PrunedBert,
    teacher: DHTForSequenceClassification,
    train: SplitData,
    epochs: int,
    lr: float,
    temperature: float,
    alpha_kd: float,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    *,
    seq_len: int | None = None,
    guard: FiniteGuard | None = None,
) -> dict[str, Any]:
    """Fine-tune the extracted model by distillation from the teacher (report Section 4.2: TAS distils the
    unpruned network into the searched one; Hinton et al. 2015, report Section 2.2.4).

    Loss per batch: ``alpha_kd * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha_kd) * CE(z_s, y)``.
    AdamW (weight decay 0.01), constant learning rate, seeded order; the teacher runs in eval mode without
    gradient and is not modified.

    Returns:
        ``{"loss_per_epoch": [...], "kd_per_epoch": [...], "ce_per_epoch": [...]}`` (means per epoch),
        ``"step_losses"`` ((optimizer step, loss) pairs, from 1) and
        ``"train_flops"``: teacher forward + student forward and backward (3 x forward), full convention, per
        sample at ``seq_len`` (pass the pipeline's padded length; default: each batch's own width).
        A non-finite loss or weight stops it (``guard``, :mod:`dht.guard`; default: names
        ``baselines.nas_prune.lr_weights``, the rate the stage fine-tunes with).
    """
    guard = guard or FiniteGuard("nas-prune: fine-tuning", f"lower baselines.nas_prune.lr_weights (now {lr:g})")
    device = torch.device(device)
    pruned = pruned.to(device)
    teacher = teacher.to(device)
    was_training = teacher.training
    teacher.eval()
    optimizer = torch.optim.AdamW(pruned.parameters(), lr=lr, weight_decay=0.01)

    def loss_of(index: Tensor) -> tuple[Tensor, dict[str, Tensor | float]]:
        ids, mask, labels = train.batch(index, device)
        with torch.no_grad():
            t_logits = teacher(ids, attention_mask=mask).logits
        s_logits = pruned(ids, mask)
        kd = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.softmax(t_logits / temperature, -1),
                      reduction="batchmean") * temperature**2
        ce = F.cross_entropy(s_logits, labels)
        n = seq_len if seq_len is not None else ids.shape[1]
        flops = len(index) * (full_model_flops(n, teacher.config, "full") + 3 * pruned_flops(pruned.arch, n, "full"))
        return alpha_kd * kd + (1 - alpha_kd) * ce, {"kd": kd, "ce": ce, "flops": flops}

    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            history = loop.train(pruned, optimizer, loss_of, len(train), epochs=epochs, batch_size=batch_size,
                                 generator=torch.Generator().manual_seed(seed), guard=guard,
                                 progress="nas-prune fine-tuning")
    finally:
        pruned.eval()
        teacher.train(was_training)
    spent = 0.0
    for epoch in history:
        for flops in epoch.extras.get("flops", []):
            spent += flops
    return {"loss_per_epoch": [epoch.mean() for epoch in history], "step_losses": loop.step_losses(history),
            "kd_per_epoch": [epoch.mean("kd") for epoch in history],
            "ce_per_epoch": [epoch.mean("ce") for epoch in history], "train_flops": spent}


@torch.no_grad()
def predict_pruned(pruned: PrunedBert, data: SplitData, device: torch.device | str, batch_size: int,
                   seq_len: int) -> Predictions:
    """Predictions of the pruned model in the pipeline's format (:class:`dht.evaluation.Predictions`).

    Every sample runs the same static architecture: ``layers`` = N_L, ``heads`` = kept heads per layer, and
    ``flops`` / ``flops_linear`` = :func:`pruned_flops` at the padded length ``seq_len`` (as ``dht.policy.predict``
    counts), so :func:`dht.evaluation.evaluate` computes the FLOP ratios against the teacher's full model.
    """
    pruned = pruned.to(torch.device(device)).eval()
    probs, seconds = predict_probs(pruned, data, batch_size, device)
    return static_predictions(probs, pruned.arch.heads_per_layer(), pruned_flops(pruned.arch, seq_len, "full"),
                              pruned_flops(pruned.arch, seq_len, "linear"), seconds)
