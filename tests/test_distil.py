"""DistilBERT students of 12-VaBERT (BL2): initialisation from the teacher, distillation, inference cost."""

from __future__ import annotations

import pytest
import torch

from dht.baselines.distil import distill, predict_student, student_from_teacher, student_layers
from dht.evaluation import SplitData, evaluate
from dht.model import DHTConfig, DHTForSequenceClassification

SEQ = 12


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return DHTForSequenceClassification(DHTConfig(vocab_size=60, hidden_size=48, num_hidden_layers=12,
                                                  num_attention_heads=12, intermediate_size=64,
                                                  max_position_embeddings=SEQ, num_labels=3)).eval()


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, SEQ), generator=g)
    return SplitData(ids, torch.ones_like(ids), (ids[:, 1] % 3).long(), torch.arange(n) % 3)


def test_students_take_evenly_spaced_teacher_layers():
    assert student_layers(12, 6) == [0, 2, 4, 6, 8, 10]  # DistilBERT: one layer out of two
    assert student_layers(12, 3) == [0, 4, 8] and student_layers(12, 1) == [0]
    with pytest.raises(ValueError, match="1..12 layers"):
        student_layers(12, 13)


def test_student_copies_the_teacher_layers(teacher):
    student = student_from_teacher(teacher, 3)
    assert student.config.num_hidden_layers == 3
    torch.testing.assert_close(student.bert.encoder.layer[1].attention.self.query.weight,
                               teacher.bert.encoder.layer[4].attention.self.query.weight)
    torch.testing.assert_close(student.classifier.weight, teacher.classifier.weight)
    full = student_from_teacher(teacher, 12).eval()  # every layer: the teacher itself
    ids = torch.randint(5, 60, (4, SEQ))
    torch.testing.assert_close(full(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_distillation_loss_decreases_and_counts_flops(teacher):
    student = student_from_teacher(teacher, 3)
    info = distill(student, teacher, data(96, 1), epochs=3, lr=1e-3, temperature=2.0, alpha_kd=0.5, alpha_ce=0.5,
                   alpha_cos=0.1, batch_size=16, device=torch.device("cpu"), seed=0, seq_len=SEQ)
    losses = info["loss_per_epoch"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert info["train_flops"] > 0
    before = teacher.bert.encoder.layer[0].attention.self.query.weight.clone()
    assert torch.equal(before, teacher.bert.encoder.layer[0].attention.self.query.weight)  # teacher untouched


def test_student_inference_costs_its_share_of_the_teacher(teacher):
    student = student_from_teacher(teacher, 3)
    test = data(20, 2)
    pred = predict_student(student, test, torch.device("cpu"), 8, SEQ)
    metrics = evaluate(pred, test, teacher.config, SEQ, ["easy", "medium", "hard"])
    assert metrics["mean_layers"] == 3 and metrics["mean_heads"] == 12
    assert 0.24 < metrics["infer_flop_ratio"] < 0.27  # 3 of 12 layers plus the shared classifier
    assert metrics["infer_flop_ratio"] == pytest.approx(metrics["infer_flop_ratio_linear"], abs=0.01)
    assert torch.equal(pred.labels, student(input_ids=test.input_ids).logits.argmax(-1))
