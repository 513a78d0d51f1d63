"""FastBERT (Liu et al. 2020, "FastBERT: a self-distilling BERT with adaptive inference time"), the DHT paper's BL3.

FastBERT puts a small *student classifier* after every transformer layer but the last, whose classifier is the
*teacher* (FastBERT Section 3.1, Table 1). Training has two stages (Section 3.2): fine-tuning of the backbone with
the teacher, then *self-distillation*: backbone and teacher frozen, every student learns the teacher's output
distribution,

    L_distill = sum_{i=0}^{L-2} D_KL(p_t || p_s_i)                   (FastBERT eqs. 5-6; see docs/baselines-fastbert.md)

At inference (Section 3.3, *adaptive inference*) a sample leaves after the first layer whose student is certain
enough, the certainty being the normalised entropy

    Uncertainty = - sum_i p_s(i) log p_s(i) / log(1 / N)             (FastBERT eq. 7, N classes, in [0, 1])

and "the sample with Uncertainty lower than Speed" exits. Samples that reach the last layer are classified by
the teacher.

Here the backbone and the teacher are the already trained 12-VaBERT (BL1, :class:`DHTForSequenceClassification`
with its BERT pooler + linear classifier): stage one of FastBERT *is* 12-VaBERT's fine-tuning, so only the
students are new (:func:`distill`). :func:`predict_fastbert` runs batches whose non-exited samples continue as a
smaller batch, and returns the per-sample FLOPs of what was really computed (layers + every student evaluated +
the teacher head when reached), in both conventions of :mod:`dht.flops`.

Readings and adaptations are listed in ``docs/baselines-fastbert.md``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dht.baselines import BaselineJob, BaselineRun, Loaded, LoadJob, loop
from dht.curves import Dial
from dht.evaluation import Predictions, SplitData
from dht.flops import Convention, FlopShape, forward_flops, full_model_flops
from dht.guard import FiniteGuard
from dht.model import DHTForSequenceClassification
from dht.walk import At, Next, start, walk

__all__ = [
    "CONFIG_FILE",
    "STUDENTS_FILE",
    "FastBERT",
    "FastBERTClassifier",
    "classifier_flops",
    "distill",
    "distill_flops_per_sample",
    "exit_flops",
    "normalized_entropy",
    "predict_fastbert",
    "run",
]

STUDENTS_FILE = "fastbert_students.safetensors"
CONFIG_FILE = "fastbert.json"
_FORMAT = 1
_CONVENTIONS = ("full", "linear")


# --------------------------------------------------------------------------------------------------------------
# The student classifier (FastBERT Table 1)
# --------------------------------------------------------------------------------------------------------------


class _ClassifierAttention(nn.Module):
    """Multi-head self-attention of the student (UER's ``MultiHeadedAttention`` used by FastBERT's code):
    Q/K/V projections, scaled dot product with the padding mask on the keys, dropout on the probabilities, output
    projection. No residual and no LayerNorm (the classifier has none)."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"classifier hidden size {hidden} must be divisible by its {heads} heads")
        self.heads = heads
        self.head_size = hidden // heads
        self.linear_layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(3)])  # query, key, value
        self.final_linear = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_keep: Tensor | None) -> Tensor:
        batch, seq_len, width = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(batch, seq_len, self.heads, self.head_size).transpose(1, 2)

        q, k, v = (split(linear(x)) for linear in self.linear_layers)
        # Explicit matmuls (two bmm's that FlopCounterMode counts), as FastBERT's code does.
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size)
        if key_keep is not None:
            scores = scores.masked_fill(~key_keep[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = self.dropout(torch.softmax(scores, dim=-1))
        context = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq_len, width)
        return self.final_linear(context)


class FastBERTClassifier(nn.Module):
    """FastBERT's branch classifier (FastBERT Table 1; ``Classifier`` in its ``run_fastbert.py``):

        Linear(d -> 128), tanh, 2-head self-attention over the 128-dim sequence, [CLS] (position 0),
        Linear(128 -> 128), tanh, Linear(128 -> num_labels).

    Parameter names follow FastBERT's code (``output_layer_0``, ``self_atten``, ``output_layer_1``,
    ``output_layer_2``). Default PyTorch initialisation, as the classifiers get in FastBERT's code.
    """

    def __init__(
        self, hidden_size: int, num_labels: int, cla_hidden_size: int = 128, cla_heads: int = 2, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.output_layer_0 = nn.Linear(hidden_size, cla_hidden_size)
        self.self_atten = _ClassifierAttention(cla_hidden_size, cla_heads, dropout)
        self.output_layer_1 = nn.Linear(cla_hidden_size, cla_hidden_size)
        self.output_layer_2 = nn.Linear(cla_hidden_size, num_labels)

    def forward(self, hidden: Tensor, key_keep: Tensor | None = None) -> Tensor:
        """Logits [B, num_labels] from a layer's hidden states [B, n, d]; ``key_keep`` BoolTensor[B, n] (True =
        token) or None (no padding)."""
        x = torch.tanh(self.output_layer_0(hidden))
        x = self.self_atten(x, key_keep)[:, 0]  # FastBERT's default pooling "first": the [CLS] position
        return self.output_layer_2(torch.tanh(self.output_layer_1(x)))


def classifier_flops(
    seq_len: int, hidden: int, num_labels: int, convention: Convention = "full", cla_hidden_size: int = 128
) -> int:
    """FLOPs of one :class:`FastBERTClassifier` on one sample of ``seq_len`` tokens (2 FLOPs per MAC).

    The first projection and the self-attention run on the whole sequence (as in FastBERT), the last two
    Linear layers on [CLS] only:

        Linear d -> c on n tokens          2 n d c
        Q, K, V, O projections             4 * 2 n c c
        QK^T and AV (all heads together)   2 * 2 n n c          ("full" only: not Linear layers)
        Linear c -> c and c -> C           2 c c + 2 c C

    Head count does not change the total. ``"linear"`` is FastBERT's thop convention (Linear layers only).
    """
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}, got {convention!r}")
    n, d, c = seq_len, hidden, cla_hidden_size
    linear = 2 * n * d * c + 4 * 2 * n * c * c + 2 * c * c + 2 * c * num_labels
    attention = 2 * 2 * n * n * c if convention == "full" else 0
    return linear + attention


def normalized_entropy(probs: Tensor) -> Tensor:
    """FastBERT's Uncertainty (eq. 7): H(p) / log N, in [0, 1], computed in float64 (0 log 0 = 0)."""
    p = probs.double()
    h = -(p * torch.log(p.clamp_min(torch.finfo(torch.float64).tiny))).sum(-1)
    return h / math.log(p.shape[-1])


# --------------------------------------------------------------------------------------------------------------
# FastBERT = frozen 12-VaBERT (backbone + teacher classifier) + N_L - 1 students
# --------------------------------------------------------------------------------------------------------------


class FastBERT(nn.Module):
    """A trained :class:`DHTForSequenceClassification` (backbone and teacher classifier, frozen) plus one
    :class:`FastBERTClassifier` student after each of the layers 1..N_L-1 (FastBERT Section 3.1).

    ``students[i]`` reads the output of layer ``i + 1`` (1-based). The teacher's parameters are never given to
    an optimizer and always run under ``torch.no_grad()`` in eval mode; their ``requires_grad`` flags are left
    as they are (the teacher object belongs to the caller).
    """

    def __init__(
        self,
        teacher: DHTForSequenceClassification,
        cla_hidden_size: int = 128,
        cla_heads: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        config = teacher.config
        if config.num_hidden_layers < 2:
            raise ValueError("FastBERT needs at least two layers (one student and the teacher)")
        if config.num_labels < 2:
            raise ValueError("FastBERT's uncertainty needs num_labels >= 2")
        self.teacher = teacher
        self.cla_hidden_size = cla_hidden_size
        self.cla_heads = cla_heads
        self.dropout = dropout
        self.students = nn.ModuleList(
            FastBERTClassifier(config.hidden_size, config.num_labels, cla_hidden_size, cla_heads, dropout)
            for _ in range(config.num_hidden_layers - 1)
        )

    @property
    def num_layers(self) -> int:
        return self.teacher.config.num_hidden_layers

    @property
    def num_labels(self) -> int:
        return self.teacher.config.num_labels

    def describe(self) -> dict[str, Any]:
        """The student architecture, written next to the weights by :meth:`save`."""
        config = self.teacher.config
        return {
            "format": _FORMAT,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "num_labels": config.num_labels,
            "cla_hidden_size": self.cla_hidden_size,
            "cla_heads": self.cla_heads,
            "dropout": self.dropout,
        }

    @torch.no_grad()
    def backbone_states(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """The frozen pass: (outputs of layers 1..N_L-1, teacher logits [B, C], key mask or None), eval mode."""
        teacher = self.teacher
        teacher.eval()
        states: list[Tensor] = []
        first = start(teacher, input_ids, attention_mask)
        # the students read layers 1..N_L-1 (through the normalised state, :meth:`student_input`), the teacher N_L
        last = walk(first, range(1, self.num_layers + 1),
                    lambda at: None if at.next is None else states.append(self.student_input(at)))
        return states, last.logits(), first.keep

    def student_input(self, at: At) -> Tensor:
        """What the student after layer ``at.depth`` reads: a pre-LN backbone's intermediate states are
        un-normalised, so every exit reads them through the teacher's (frozen) final LayerNorm, as its own
        classifier does (identity for post-LN BERT)."""
        return self.teacher.bert.final_norm(at.state)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(student logits [N_L - 1, B, C] with gradient, teacher logits [B, C] without): the self-distillation
        forward of FastBERT Section 3.2, the backbone run once."""
        states, teacher_logits, key_keep = self.backbone_states(input_ids, attention_mask)
        student_logits = torch.stack([s(h, key_keep) for s, h in zip(self.students, states, strict=True)])
        return student_logits, teacher_logits

    @torch.no_grad()
    def uncertainties(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Every student's normalised entropy (FastBERT eq. 7), float64 [B, N_L - 1], in eval mode.

        A sample exits at speed s at the first layer i + 1 with ``uncertainties[:, i] < s`` (:func:`predict_fastbert`
        does that without running the students after the exit); useful to calibrate speeds to FLOP targets."""
        was_training = self.students.training
        self.students.eval()
        states, _, key_keep = self.backbone_states(input_ids, attention_mask)
        out = torch.stack(
            [normalized_entropy(s(h, key_keep).float().softmax(-1)) for s, h in zip(self.students, states, strict=True)],
            dim=1,
        )
        self.students.train(was_training)
        return out

    # ---- persistence ------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write the students' weights (safetensors) and :meth:`describe` (json). The teacher is saved elsewhere
        (it is 12-VaBERT's model directory)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.students.state_dict().items()}
        save_file(state, str(directory / STUDENTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.describe(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, teacher: DHTForSequenceClassification) -> FastBERT:
        """Students written by :meth:`save`, attached to ``teacher`` (which must have the same shape)."""
        directory = Path(directory)
        info_path = directory / CONFIG_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; not a FastBERT students directory")
        info = json.loads(info_path.read_text())
        if info.get("format") != _FORMAT:
            raise ValueError(f"{info_path}: format {info.get('format')!r}, this code reads format {_FORMAT}")
        config = teacher.config
        for name in ("num_hidden_layers", "hidden_size", "num_labels"):
            if info[name] != getattr(config, name):
                raise ValueError(
                    f"{directory}: students were distilled for {name} = {info[name]}, the teacher has {getattr(config, name)}"
                )
        model = cls(teacher, info["cla_hidden_size"], info["cla_heads"], info["dropout"])
        device = next(teacher.parameters()).device
        model.students.load_state_dict(load_file(str(directory / STUDENTS_FILE)), strict=True)
        return model.to(device)


# --------------------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------------------


def exit_flops(
    exit_layer: int, seq_len: int, config_like: Any, convention: Convention = "full", cla_hidden_size: int = 128
) -> int:
    """Inference FLOPs of one sample that leaves after layer ``exit_layer`` (1..N_L).

    = ``exit_layer`` layers with all heads + the students of layers 1..exit_layer (the one that let it exit
    included; at most N_L - 1 students) + the teacher's pooler and classifier when ``exit_layer == N_L``.
    """
    shape = FlopShape.of(config_like)
    n_layers = shape.num_hidden_layers
    if not 1 <= exit_layer <= n_layers:
        raise ValueError(f"exit_layer must be in [1, {n_layers}], got {exit_layer}")
    layers = forward_flops(
        seq_len, [shape.num_attention_heads] * exit_layer, shape, convention, include_classifier=exit_layer == n_layers
    )
    students = min(exit_layer, n_layers - 1)
    return layers + students * classifier_flops(seq_len, shape.hidden_size, shape.num_labels, convention, cla_hidden_size)


def distill_flops_per_sample(seq_len: int, config_like: Any, cla_hidden_size: int = 128) -> int:
    """Self-distillation FLOPs of one sample ("full" convention): the frozen backbone + teacher forward (no
    backward) + the N_L - 1 students' forward and backward (backward = 2 x forward, as in :mod:`dht.flops`)."""
    shape = FlopShape.of(config_like)
    student = classifier_flops(seq_len, shape.hidden_size, shape.num_labels, "full", cla_hidden_size)
    return full_model_flops(seq_len, shape, "full", "inference") + 3 * (shape.num_hidden_layers - 1) * student


# --------------------------------------------------------------------------------------------------------------
# Self-distillation (FastBERT Section 3.2)
# --------------------------------------------------------------------------------------------------------------


def distill(
    fastbert: FastBERT,
    train: SplitData,
    epochs: int,
    lr: float,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
    *,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    seq_len: int | None = None,
    guard: FiniteGuard | None = None,
) -> dict[str, Any]:
    """Train the students on the teacher's distribution; backbone and teacher stay frozen (FastBERT Section 3.2).

    Per batch the frozen backbone runs once under ``no_grad`` (eval mode: deterministic teacher targets) and
    every student learns from its layer's hidden states with

        loss = sum_i KL(p_t || p_s_i)       (batch mean; FastBERT eq. 6, as its code computes it: KLDivLoss)

    AdamW (weight decay on weights, not biases, as FastBERT's code) with linear warm-up then linear decay.
    The data order and the students' dropout are seeded by ``seed`` (the global RNG is restored afterwards).

    Args:
        on_epoch: called after every epoch with (epoch number from 1, mean KL of the epoch).
        seq_len: length the training FLOPs are counted at (default: the padded width of ``train``).
        guard: stops on a non-finite loss or student weight (:mod:`dht.guard`; default: names
            ``baselines.fastbert.learning_rate``).

    Returns:
        ``epoch_kl`` (mean summed KL per epoch, sample-weighted), ``step_kl`` ((optimizer step, its KL) pairs),
        ``train_flops`` (total, "full" convention, see
        :func:`distill_flops_per_sample`), ``train_flops_per_sample``, ``steps``, ``samples``, ``seconds``.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    if len(train) == 0:
        raise ValueError("distill needs training samples")
    guard = guard or FiniteGuard("fastbert: self-distillation", f"lower baselines.fastbert.learning_rate (now {lr:g})")
    device = torch.device(device)
    fastbert.to(device)
    n = len(train)
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    warm = int(warmup_ratio * total)
    decay = [p for name, p in fastbert.students.named_parameters() if not name.endswith("bias")]
    no_decay = [p for name, p in fastbert.students.named_parameters() if name.endswith("bias")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(warm, 1), max(0.0, (total - s) / max(total - warm, 1)))
    )
    per_sample = distill_flops_per_sample(
        train.input_ids.shape[1] if seq_len is None else seq_len, fastbert.teacher.config, fastbert.cla_hidden_size
    )

    def loss_of(index: Tensor) -> Tensor:
        ids, mask, _ = train.batch(index, device)
        student_logits, teacher_logits = fastbert(ids, mask)
        log_q = F.log_softmax(student_logits.float(), dim=-1)  # [S, B, C]
        p_t = F.softmax(teacher_logits.float(), dim=-1).expand_as(log_q)
        # KLDivLoss(reduction="batchmean") per student, summed over students.
        return F.kl_div(log_q, p_t, reduction="sum") / len(index)

    report = None if on_epoch is None else lambda epoch, seen: on_epoch(epoch, seen.sample_mean())
    began = time.perf_counter()
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        history = loop.train(fastbert.students, optimizer, loss_of, n, epochs=epochs, batch_size=batch_size,
                             generator=torch.Generator().manual_seed(seed), guard=guard, scheduler=scheduler,
                             on_epoch=report, progress="fastbert self-distillation")
    fastbert.eval()
    return {
        "epoch_kl": [epoch.sample_mean() for epoch in history],
        "step_kl": loop.step_losses(history),
        "train_flops": float(per_sample) * n * epochs,
        "train_flops_per_sample": float(per_sample),
        "steps": sum(len(epoch.losses) for epoch in history),
        "samples": n * epochs,
        "seconds": time.perf_counter() - began,
    }


# --------------------------------------------------------------------------------------------------------------
# Adaptive inference (FastBERT Section 3.3)
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_fastbert(
    fastbert: FastBERT,
    data: SplitData,
    speed: float,
    device: torch.device | str,
    batch_size: int,
    seq_len: int,
) -> Predictions:
    """Adaptive inference: a sample leaves at the first layer 1..N_L-1 whose student's normalised entropy is
    below ``speed`` (FastBERT eq. 7 and Section 3.3); the others reach layer N_L and the teacher decides.

    Batches shrink as samples exit (and are re-trimmed to their longest remaining sample), so the savings are
    real with ``batch_size > 1``; results do not depend on the batch size. ``speed = 0``: nobody exits (the
    teacher, i.e. 12-VaBERT, plus the cost of 11 students); ``speed = 1``: everybody exits at layer 1 (unless a
    student is exactly uniform).

    Args:
        seq_len: the length FLOPs are counted at (the dataset's padded length, as :func:`dht.policy.predict`).

    Returns:
        :class:`Predictions`: ``layers`` = exit layer, ``heads`` = N_H for each layer run (0 after), ``flops`` /
        ``flops_linear`` from :func:`exit_flops`, ``probs`` of the classifier that decided.
    """
    if not 0.0 <= speed <= 1.0:
        raise ValueError(f"speed must be in [0, 1], got {speed}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    fastbert.to(device).eval()
    teacher = fastbert.teacher
    conf = teacher.config
    n_layers, n_heads, n_labels = conf.num_hidden_layers, conf.num_attention_heads, conf.num_labels
    n = len(data)
    labels = torch.zeros(n, dtype=torch.long)
    probs = torch.zeros(n, n_labels)
    exits = torch.zeros(n, dtype=torch.long)
    began = time.perf_counter()
    for lo in range(0, n, batch_size):
        rows = torch.arange(lo, min(lo + batch_size, n))
        ids, mask, _ = data.batch(rows, device)

        def exit_here(at: At, rows: Tensor = rows) -> Next:
            """FastBERT's exit (Section 3.3): the student of this layer, the teacher at the last, decides."""
            last = at.next is None
            logits = at.logits() if last else fastbert.students[at.depth - 1](fastbert.student_input(at), at.keep)
            p = logits.float().softmax(-1)
            done = torch.ones(len(at.rows), dtype=torch.bool, device=p.device) if last else normalized_entropy(p) < speed
            if bool(done.any()):
                out = rows[at.rows[done.cpu()]]
                probs[out] = p[done].cpu()
                labels[out] = p[done].argmax(-1).cpu()
                exits[out] = at.depth
            return Next(stop=done)

        # the exited samples leave the batch, which is cut to its longest remaining sample (dht.walk)
        walk(start(teacher, ids, mask), range(1, n_layers + 1), exit_here)
    seconds = time.perf_counter() - began
    cla = fastbert.cla_hidden_size
    per_exit = {
        conv: torch.tensor([float(exit_flops(k, seq_len, conf, conv, cla)) for k in range(1, n_layers + 1)], dtype=torch.float64)
        for conv in _CONVENTIONS
    }
    heads = (torch.arange(n_layers)[None, :] < exits[:, None]).long() * n_heads
    return Predictions(
        labels=labels,
        probs=probs,
        layers=exits,
        heads=heads,
        flops=per_exit["full"][exits - 1],
        flops_linear=per_exit["linear"][exits - 1],
        seconds=seconds,
    )


# --------------------------------------------------------------------------------------------------------------
# The baseline fastbert-<speed>
# --------------------------------------------------------------------------------------------------------------


def run(speed: float, job: BaselineJob) -> BaselineRun:
    """The ``fastbert-<speed>`` baseline (:func:`dht.baselines.run_baseline`): students on the teacher, distilled,
    written to ``job.out_model`` (the students only); it predicts with exits at ``speed``."""
    c = job.cfg.baselines.fastbert
    # FastBERT's branch classifier is 128 wide on BERT-base (768): keep that proportion on smaller models,
    # or a 128-wide classifier costs more than the layers it lets a sample skip (docs/baselines-fastbert.md).
    width = c.classifier_size or max(8, round(job.teacher.config.hidden_size * 128 / 768))
    model = FastBERT(job.teacher, cla_hidden_size=width)
    info = distill(model, job.train, c.epochs, c.learning_rate, job.cfg.train.batch_size, job.device, job.cfg.training_seed,
                   seq_len=job.seq_len)
    model.save(job.out_model)
    def predict_at(at_speed: float, data: SplitData) -> Predictions:
        return predict_fastbert(model, data, at_speed, job.device, job.cfg.train.eval_batch_size, job.seq_len)

    # the students do not depend on the speed: one distilled model gives the whole curve (dht.curves)
    dial = Dial("speed", list(c.speeds), c.chosen_within, predict_at) if c.speeds is not None else None
    return BaselineRun(lambda data: predict_at(speed, data), info["train_flops"], c.epochs, info["epoch_kl"],
                       {"train_loss": info["step_kl"]}, dial=dial)


def load(job: LoadJob) -> Loaded:
    """A ``fastbert-<speed>`` model directory read back (:func:`dht.baselines.saved.load_baseline`): its students
    on ``job.teacher``, the backbone they were distilled on; it predicts with exits at the speed."""
    fastbert = FastBERT.load(job.directory, job.teacher)
    c = job.teacher.config
    return Loaded(fastbert, lambda data, batch_size, seq_len: predict_fastbert(fastbert, data, job.value, job.device,
                                                                               batch_size, seq_len),
                  c.vocab_size, c.max_position_embeddings, c.num_labels)
