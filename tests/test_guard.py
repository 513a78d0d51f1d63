"""The one guard of every training loop (dht.guard): a non-finite loss or weight stops the run with the stage,
the step and the fix, in the DHT trainer and in each baseline. An infinite learning rate makes every updated
weight non-finite at the first step (inf x a non-zero step, or inf x 0 = NaN), on any CPU."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from dht.evaluation import SplitData
from dht.guard import FiniteGuard, NonFiniteError, TrainingError
from dht.model import DHTConfig, DHTForSequenceClassification

SEQ = 12
INF = math.inf
CPU = torch.device("cpu")


def data(n: int = 48, seed: int = 1) -> SplitData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (n, SEQ), generator=g)
    return SplitData(ids, torch.ones_like(ids), (ids[:, 1] % 3).long())


@pytest.fixture(scope="module")
def teacher() -> DHTForSequenceClassification:
    torch.manual_seed(0)
    return DHTForSequenceClassification(DHTConfig(
        vocab_size=40, hidden_size=48, num_hidden_layers=12, num_attention_heads=12, intermediate_size=64,
        max_position_embeddings=SEQ, num_labels=3, attn_implementation="eager")).eval()


def test_the_guard_names_the_stage_the_step_and_the_fix():
    guard = FiniteGuard("distil: distillation", "lower baselines.distil.learning_rate (now 1e+06)")
    guard.loss(torch.tensor(0.5), 1)
    with pytest.raises(NonFiniteError, match=r"^distil: distillation: non-finite loss \(nan\) at epoch 2, step 7; "
                                             r"the run diverged: lower baselines.distil.learning_rate \(now 1e\+06\)$"):
        guard.loss(torch.tensor(float("nan")), 7, 2)
    ok, bad = torch.ones(3), torch.tensor([1.0, INF])
    guard.parameters([("a", ok), ("b", ok)], 3)
    with pytest.raises(NonFiniteError, match=r"1 of 2 parameter tensors non-finite after the update \(b\) at step 3"):
        guard.parameters([("a", ok), ("b", bad)], 3)
    assert issubclass(NonFiniteError, TrainingError)


def test_distil_stops_on_a_non_finite_weight_and_loss(teacher):
    from dht.baselines.distil import distill, student_from_teacher

    kwargs = dict(epochs=1, temperature=2.0, alpha_kd=0.5, alpha_ce=0.5, alpha_cos=0.0, batch_size=16, device=CPU,
                  seed=0, seq_len=SEQ)
    with pytest.raises(NonFiniteError, match=r"^distil: distillation: \d+ of \d+ parameter tensors non-finite after "
                                             r"the update .* at epoch 1, step 1; .*lower baselines.distil.learning_rate"):
        distill(student_from_teacher(teacher, 3), teacher, data(), lr=INF, **kwargs)
    student = student_from_teacher(teacher, 3)
    with torch.no_grad():
        student.classifier.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at epoch 1, step 1;"):
        distill(student, teacher, data(), lr=1e-3, **kwargs)


def test_fastbert_stops_on_a_non_finite_weight(teacher):
    from dht.baselines.fastbert import FastBERT, distill

    with pytest.raises(NonFiniteError, match=r"^fastbert: self-distillation: .* non-finite after the update .* at "
                                             r"epoch 1, step 1; .*lower baselines.fastbert.learning_rate \(now inf\)"):
        distill(FastBERT(copy.deepcopy(teacher)), data(), epochs=1, lr=INF, batch_size=16, device=CPU, seed=0)


def test_nas_prune_search_and_finetuning_stop_on_a_non_finite_weight(teacher):
    from dht.baselines import nas_prune as nas

    train = data()
    with pytest.raises(NonFiniteError, match=r"^nas-prune: architecture search: .* non-finite after the update .* "
                                             r"at epoch 1, step 1; .*lower baselines.nas_prune.lr_weights \(now inf\)"):
        nas.search(teacher, train, 0.5, 1.0, 0.05, 1, INF, 5e-2, 16, CPU, 0, SEQ)
    pruned = nas.extract(teacher, nas.PrunedArch.full(teacher))
    with pytest.raises(NonFiniteError, match=r"^nas-prune: fine-tuning: .* at epoch 1, step 1; "
                                             r".*lower baselines.nas_prune.lr_weights \(now inf\)"):
        nas.finetune(pruned, teacher, train, 1, INF, 2.0, 0.5, 16, CPU, 0, seq_len=SEQ)


def test_flexibert_training_stops_on_a_non_finite_weight():
    from dht.baselines.flexibert import Architecture, train_and_evaluate

    rng = np.random.default_rng(0)
    split = {"input_ids": rng.integers(5, 30, size=(32, SEQ)), "attention_mask": np.ones((32, SEQ), dtype=np.int64),
             "label": rng.integers(0, 2, size=32)}
    arch = Architecture.homogeneous(1, "sdp", 2, 16, (32,))
    with pytest.raises(NonFiniteError, match=rf"^flexibert: training {arch.id}: .* non-finite after the update .* "
                                             r"at step 1; .*lower baselines.flexibert.learning_rate \(now inf\)"):
        train_and_evaluate(arch, split, split, epochs=1, lr=INF, vocab_size=30, num_labels=2, batch_size=16)


def test_the_dht_trainer_stops_on_a_weight_made_non_finite():
    """The DHT trainer's loss check was there before; a weight off the batch's path (its loss stays finite) is
    caught by the guard after the update."""
    from test_trainer import make_cfg, make_split

    from dht.arm_features import arm_space, compute_arm_features
    from dht.trainer import Trainer

    torch.manual_seed(0)
    conf = DHTConfig(vocab_size=60, hidden_size=48, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=64, max_position_embeddings=12, num_labels=3)
    model = DHTForSequenceClassification(conf)
    cfg = make_cfg()
    train = make_split(32, 1)
    feats, _ = compute_arm_features(model, [(train.input_ids, train.attention_mask)], arm_space(cfg),
                                    cfg.dht.features, seed=0)
    trainer = Trainer(cfg, "t-dht", model, feats, train, CPU, 12)

    def poisoning(optimizer, args, kwargs):  # the update leaves one weight non-finite
        with torch.no_grad():
            trainer.model.bert.encoder.layer[11].output.dense.weight[0, 0] = float("nan")

    trainer.optimizer.register_step_post_hook(poisoning)
    with pytest.raises(NonFiniteError, match=r"^train t-dht: 1 of \d+ parameter tensors non-finite after the update "
                                             r"\(bert.encoder.layer.11.output.dense.weight\) at epoch 1, step 1; "
                                             r"the run diverged: lower train.learning_rate"):
        trainer.fit(progress_bar=False)


# ---- the stage: one line, exit 1, nothing written, the MLflow run FAILED ------------------------------------------

DIVERGING = {"distil": {"learning_rate": 1.0e30}, "fastbert": {"learning_rate": 1.0e30},
             "nas_prune": {"lr_weights": 1.0e30}, "flexibert": {"learning_rate": 1.0e30}}


@pytest.fixture(scope="module")
def baseline_project(tmp_path_factory):
    """A copy of the project on the tiny profile with learning rates that diverge at the first steps (1e30:
    the weights overflow float32 within two updates on any CPU), the tokenized embedded-news data and a
    reference model (untrained: the baselines only need one), as the earlier stages would have left them."""
    import yaml
    from conftest import copy_project

    from dht.config_loading import load_config
    from dht.data import load_text_dataset
    from dht.integrity import write_manifest
    from dht.model import model_from_params
    from dht.policy import Policy
    from dht.tokenization import prepare
    from dht.trainer import save_trained

    project = copy_project(tmp_path_factory.mktemp("guard") / "project")
    params = project / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    for section, values in DIVERGING.items():
        raw["profiles"]["tiny"].setdefault("baselines", {}).setdefault(section, {}).update(values)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(params, profile="tiny")
    processed = project / "data/processed/embedded-news"
    meta = prepare(load_text_dataset(cfg.dataset("embedded-news"), cfg.data_seed, cfg.data.val_fraction), cfg.tokenizer,
                   cfg.dataset("embedded-news").max_length, processed, "embedded-news")
    torch.manual_seed(0)
    model = model_from_params(cfg, num_labels=meta["num_labels"], vocab_size=meta["vocab_size"])
    reference = cfg.run.reference
    policy = Policy(cfg, cfg.dht.modes[reference], {}, model.config)
    save_trained(project / "models/embedded-news" / reference, model, policy, reference, cfg,
                 {"dataset": "embedded-news", "classes": meta["classes"], "max_length": meta["max_length"]})
    write_manifest(project / "models/embedded-news" / reference)  # as the train stage does, last
    # what training it cost (dht.results.training_budget): the baselines built from it are charged that too
    (project / "results/embedded-news" / reference).mkdir(parents=True)
    (project / "results/embedded-news" / reference / "metrics.json").write_text(json.dumps(
        {"train_flop_ratio": 1.0, "start_flop_ratio": 0.0, "train_flop_ratio_total": 1.0, "epochs_own": 1,
         "epochs_total": 1}))
    from dht.baselines.flexibert import Architecture

    arch = Architecture.homogeneous(1, "sdp", 2, 24, (48,))
    search = project / "results/embedded-news/flexibert-search"
    search.mkdir(parents=True)
    (search / "trace.json").write_text(json.dumps({"queries": [
        {"arch_id": arch.id, "arch": arch.to_dict(), "accuracy": 0.5, "flop_ratio": 0.1, "flops": 1,
         "train_samples": 16}]}))
    return project


@pytest.mark.parametrize("name", [
    "nas-prune-0.5", "flexibert-0.5",  # the two that wrote NaN models and exited 0
    pytest.param("distil-3", marks=pytest.mark.slow), pytest.param("fastbert-0.5", marks=pytest.mark.slow),
])
def test_a_diverging_baseline_stops_in_one_line_and_writes_nothing(baseline_project, name):
    import os
    import sqlite3
    import subprocess
    import sys

    project = baseline_project
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    search = ["--search", "results/embedded-news/flexibert-search"] if name.startswith("flexibert") else []
    proc = subprocess.run(
        [sys.executable, "workflow/scripts/baseline.py", "--profile", "tiny", "--dataset", "embedded-news",
         "--model", name, "--processed", "data/processed/embedded-news", "--results", f"results/embedded-news/{name}",
         "--out-model", f"models/embedded-news/{name}", "--threads", "1", *search],
        cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "mlflow.store.db.utils" not in line]  # store creation
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    section = {"nas": "nas_prune.lr_weights", "fle": "flexibert.learning_rate", "dis": "distil.learning_rate",
               "fas": "fastbert.learning_rate"}[name[:3]]
    assert lines[0].startswith(f"error: baseline embedded-news/{name}: ") and "non-finite" in lines[0]
    assert f"lower baselines.{section} (now 1e+30)" in lines[0] and "step " in lines[0]
    assert lines[0].endswith("no model or metrics were written")
    assert not (project / "results/embedded-news" / name).exists()
    assert not (project / "models/embedded-news" / name).exists()
    with sqlite3.connect(project / "mlflow.db") as db:
        status = db.execute("SELECT status FROM runs WHERE name = ?", (name,)).fetchall()
    assert status == [("FAILED",)]


def test_a_baseline_stops_before_training_when_its_reference_predates_budgets(baseline_project, tmp_path):
    """A reference's metrics.json written before training budgets were totals cannot say what the baseline
    starts from: one line naming the file and the command, before any training, and nothing written."""
    import os
    import subprocess
    import sys

    old = tmp_path / "metrics.json"
    old.write_text(json.dumps({"accuracy": 0.5, "train_flop_ratio": 1.0}))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "workflow/scripts/baseline.py", "--profile", "tiny", "--dataset", "embedded-news",
         "--model", "distil-3", "--processed", "data/processed/embedded-news", "--teacher-metrics", str(old),
         "--results", "results/embedded-news/distil-3", "--out-model", "models/embedded-news/distil-3"],
        cwd=baseline_project, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        f"error: --teacher-metrics {old}: no train_flop_ratio_total, epochs_total (written before training budgets "
        f"were totals); rerun its stage (snakemake --cores 4 --force {old})")
    assert not (baseline_project / "results/embedded-news/distil-3").exists()
