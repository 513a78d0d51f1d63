"""DistilBERT students (Sanh et al. 2019) of the trained 12-VaBERT: the paper's BL2, 1/3/6-DisBERT.

A student keeps the teacher's width and takes k of its layers, evenly spaced as DistilBERT does ("taking one
layer out of two": layers 0, 2, ..., 10 for k = 6; 0, 4, 8 for k = 3; 0 for k = 1), with the teacher's
embeddings, pooler and classifier. It is trained with the distillation loss of Sanh et al.:
alpha_kd * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + alpha_ce * CE(z_s, y)
+ alpha_cos * (1 - cos(h_s, h_t)) on the last hidden states of the real tokens.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from dht.flops import forward_flops
from dht.guard import FiniteGuard
from dht.model import DHTConfig, DHTForSequenceClassification
from dht.trainer import Predictions, SplitData


def student_layers(teacher_layers: int, k: int) -> list[int]:
    """Teacher layers a k-layer student starts from: evenly spaced from the bottom (DistilBERT's rule)."""
    if not 1 <= k <= teacher_layers:
        raise ValueError(f"a student has 1..{teacher_layers} layers, got {k}")
    return [round(i * teacher_layers / k) for i in range(k)]


def student_from_teacher(teacher: DHTForSequenceClassification, k: int) -> DHTForSequenceClassification:
    """A k-layer copy of the teacher (its width, embeddings, pooler and classifier; the chosen layers)."""
    picked = student_layers(teacher.config.num_hidden_layers, k)
    fields = teacher.config.to_dict()
    fields.update(num_hidden_layers=k, fixed_layers=min(teacher.config.fixed_layers, k))
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    student = DHTForSequenceClassification(DHTConfig(**fields))
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith("bert.encoder.layer."):
            index = int(name.split(".")[3])
            if index in picked:
                new = picked.index(index)
                state[name.replace(f"bert.encoder.layer.{index}.", f"bert.encoder.layer.{new}.", 1)] = tensor.clone()
        else:
            state[name] = tensor.clone()
    student.load_state_dict(state, strict=True)
    return student


def distill(
    student: DHTForSequenceClassification,
    teacher: DHTForSequenceClassification,
    train: SplitData,
    *,
    epochs: int,
    lr: float,
    temperature: float,
    alpha_kd: float,
    alpha_ce: float,
    alpha_cos: float,
    batch_size: int,
    device: torch.device,
    seed: int,
    seq_len: int,
    guard: FiniteGuard | None = None,
) -> dict[str, Any]:
    """Train the student on the teacher's softened distribution (and the labels); returns the mean loss per
    epoch and the training FLOPs (teacher forward + student forward and backward, full convention). A non-finite
    loss or weight stops it (:mod:`dht.guard`)."""
    guard = guard or FiniteGuard("distil: distillation", f"lower baselines.distil.learning_rate (now {lr:g})")
    teacher = teacher.to(device).eval()
    student = student.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t_layers = teacher.config.num_hidden_layers
    per_sample = (forward_flops(seq_len, [teacher.config.num_attention_heads] * t_layers, teacher.config)
                  + 3 * forward_flops(seq_len, [student.config.num_attention_heads] * student.config.num_hidden_layers,
                                      student.config))
    flops = 0.0
    start = time.perf_counter()
    step = 0
    for epoch in range(1, epochs + 1):
        student.train()
        order = torch.randperm(len(train), generator=gen)
        total, count = 0.0, 0
        for lo in range(0, len(order), batch_size):
            ids, mask, labels = train.batch(order[lo : lo + batch_size], device)
            with torch.no_grad():
                t_out = teacher(input_ids=ids, attention_mask=mask)
            s_out = student(input_ids=ids, attention_mask=mask, labels=labels)
            kd = F.kl_div(F.log_softmax(s_out.logits / temperature, -1), F.softmax(t_out.logits / temperature, -1),
                          reduction="batchmean") * temperature**2
            loss = alpha_kd * kd + alpha_ce * s_out.loss
            if alpha_cos:
                keep = mask.bool()
                cos = F.cosine_similarity(s_out.last_hidden_state[keep], t_out.last_hidden_state[keep], dim=-1)
                loss = loss + alpha_cos * (1 - cos).mean()
            step += 1
            guard.loss(loss, step, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            guard.parameters(student.named_parameters(), step, epoch)
            total += float(loss.detach()) * len(labels)
            count += len(labels)
            flops += per_sample * len(labels)
        losses.append(total / count)
    return {"loss_per_epoch": losses, "train_flops": flops, "seconds": time.perf_counter() - start}


@torch.no_grad()
def predict_student(model: DHTForSequenceClassification, data: SplitData, device: torch.device, batch_size: int,
                    seq_len: int) -> Predictions:
    """Plain inference of a (student) model: every sample runs all its layers and heads."""
    model = model.to(device).eval()
    conf = model.config
    probs = []
    start = time.perf_counter()
    for lo in range(0, len(data), batch_size):
        ids, mask, _ = data.batch(torch.arange(lo, min(lo + batch_size, len(data))), device)
        probs.append(model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1).cpu())
    seconds = time.perf_counter() - start
    p = torch.cat(probs)
    n, layers, heads = len(data), conf.num_hidden_layers, conf.num_attention_heads
    full = [heads] * layers
    teacher_layers = max(layers, 12)  # rows of `heads` have room for the reference model's layers
    heads_rows = torch.zeros(n, teacher_layers, dtype=torch.long)
    heads_rows[:, :layers] = heads
    flops = torch.full((n,), float(forward_flops(seq_len, full, conf, "full")), dtype=torch.float64)
    flops_lin = torch.full((n,), float(forward_flops(seq_len, full, conf, "linear")), dtype=torch.float64)
    return Predictions(p.argmax(-1), p, torch.full((n,), layers), heads_rows, flops, flops_lin, seconds)
