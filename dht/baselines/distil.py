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
from torch import Tensor

from dht.baselines import BaselineJob, BaselineRun, Loaded, LoadJob, loop
from dht.baselines.inference import predict_probs, static_predictions
from dht.evaluation import Predictions, SplitData
from dht.flops import forward_flops
from dht.guard import FiniteGuard
from dht.integrity import read_model
from dht.model import DHTConfig, DHTForSequenceClassification


def student_layers(teacher_layers: int, k: int) -> list[int]:
    """Teacher layers a k-layer student starts from: evenly spaced from the bottom (DistilBERT's rule)."""
    if not 1 <= k <= teacher_layers:
        raise ValueError(f"a student has 1..{teacher_layers} layers, got {k}")
    return [round(i * teacher_layers / k) for i in range(k)]


def student_from_teacher(teacher: DHTForSequenceClassification, k: int) -> DHTForSequenceClassification:
    """A k-layer copy of the teacher (its width, embeddings, pooler and classifier; the chosen layers)."""
    picked = student_layers(teacher.config.num_hidden_layers, k)
    fields = teacher.config.to_dict()
    # exit_heads shared: a student is read at its full depth alone (a per-depth teacher's other heads stay behind)
    fields.update(num_hidden_layers=k, fixed_layers=min(teacher.config.fixed_layers, k), exit_heads="shared")
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    student = DHTForSequenceClassification(DHTConfig(**fields))
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith("exit_heads."):
            continue
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
    epoch, the loss per optimizer step ((step, loss) pairs) and the training FLOPs (teacher forward + student forward and backward, full convention). A non-finite
    loss or weight stops it (:mod:`dht.guard`)."""
    guard = guard or FiniteGuard("distil: distillation", f"lower baselines.distil.learning_rate (now {lr:g})")
    teacher = teacher.to(device).eval()
    student = student.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    t_layers = teacher.config.num_hidden_layers
    per_sample = (forward_flops(seq_len, [teacher.config.num_attention_heads] * t_layers, teacher.config)
                  + 3 * forward_flops(seq_len, [student.config.num_attention_heads] * student.config.num_hidden_layers,
                                      student.config))

    def loss_of(index: Tensor) -> Tensor:
        ids, mask, labels = train.batch(index, device)
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
        return loss

    start = time.perf_counter()
    history = loop.train(student, optimizer, loss_of, len(train), epochs=epochs, batch_size=batch_size,
                         generator=torch.Generator().manual_seed(seed), guard=guard, clip=1.0,
                         progress=f"distil-{student.config.num_hidden_layers} distillation")
    flops = 0.0
    for epoch in history:
        for size in epoch.sizes:
            flops += per_sample * size
    return {"loss_per_epoch": [epoch.sample_mean() for epoch in history], "step_losses": loop.step_losses(history),
            "train_flops": flops, "seconds": time.perf_counter() - start}


def predict_student(model: DHTForSequenceClassification, data: SplitData, device: torch.device, batch_size: int,
                    seq_len: int) -> Predictions:
    """Plain inference of a (student) model: every sample runs all its layers and heads."""
    model = model.to(device).eval()
    conf = model.config
    probs, seconds = predict_probs(lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits, data,
                                   batch_size, device)
    full = [conf.num_attention_heads] * conf.num_hidden_layers
    # rows of `heads` have room for the reference model's layers
    return static_predictions(probs, full, forward_flops(seq_len, full, conf, "full"),
                              forward_flops(seq_len, full, conf, "linear"), seconds,
                              width=max(conf.num_hidden_layers, 12))


def run(layers: float, job: BaselineJob) -> BaselineRun:
    """The ``distil-<layers>`` baseline (:func:`dht.baselines.run_baseline`): a student of ``layers`` of the
    teacher's layers, distilled and written to ``job.out_model``; it predicts with every layer it has."""
    c = job.cfg.baselines.distil
    model = student_from_teacher(job.teacher, int(layers))
    info = distill(model, job.teacher, job.train, epochs=c.epochs, lr=c.learning_rate, temperature=c.temperature,
                   alpha_kd=c.alpha_kd, alpha_ce=c.alpha_ce, alpha_cos=c.alpha_cos,
                   batch_size=job.cfg.train.batch_size, device=job.device, seed=job.cfg.training_seed, seq_len=job.seq_len)
    model.save_pretrained(job.out_model)
    return BaselineRun(lambda data: predict_student(model, data, job.device, job.cfg.train.eval_batch_size, job.seq_len),
                       info["train_flops"], c.epochs, info["loss_per_epoch"], {"train_loss": info["step_losses"]})


def load(job: LoadJob) -> Loaded:
    """A ``distil-<layers>`` model directory read back (:func:`dht.baselines.saved.load_baseline`)."""
    student = read_model(job.directory, job.fix).to(job.device).eval()
    c = student.config
    return Loaded(student, lambda data, batch_size, seq_len: predict_student(student, data, job.device, batch_size,
                                                                             seq_len),
                  c.vocab_size, c.max_position_embeddings, c.num_labels)
