"""One model trained by two processes: the train stage under `torchrun` with DDP and the gloo backend (CPU).

The stage script runs as the Snakemake rule runs it (workflow/scripts/train.py under torch.distributed.run) on a
small synthetic project written the way the pipeline writes one (processed splits, the initial model, the arm
features), with the tiny profile's model and `train.distributed: {nproc_per_node: 2, backend: gloo}`. Each rank
leaves a trace (dht.distributed.TRACE_ENV): the samples it trained per epoch and the digests of its weights and
bandits. These stage runs are marked slow (three launches, ~65 s on a loaded 2-core machine); the in-library runs
at the end (one torchrun launch of tests/distributed_worker.py, ~20 s) stay in the quick set.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import ROOT, write_processed_split

from dht.arm_features import arm_space, compute_arm_features, save_arm_features
from dht.config_loading import load_config, read_params
from dht.distributed import TRACE_ENV
from dht.model import model_from_params

DATASET, MODE = "embedded-news", "t-dht"
SEQ, VOCAB, LABELS = 16, 50, 4
N_TRAIN, N_TEST, EPOCHS = 61, 24, 3  # 61: the two ranks' shares differ by one sample


def write_split(path: Path, n: int, gen: torch.Generator) -> None:
    """A processed split as the tokenize stage writes it; the label is learnable from the first token."""
    lengths = torch.randint(6, SEQ + 1, (n,), generator=gen)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).to(torch.int8)
    ids = (torch.randint(5, VOCAB, (n, SEQ), generator=gen) * mask).to(torch.int32)
    write_processed_split(path, ids, mask, ids[:, 0] % LABELS, lengths)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    raw = copy.deepcopy(read_params(ROOT / "params.yaml"))
    tiny = raw["profiles"]["tiny"]
    tiny["device"] = "cpu"
    tiny["model"] = {**tiny["model"], "max_position_embeddings": SEQ}
    tiny["train"] = {**tiny["train"], "epochs": EPOCHS, "batch_size": 8, "eval_batch_size": 32, "checkpoint_every": 1,
                     "log_model": False, "distributed": {"nproc_per_node": 2, "backend": "gloo"}}
    for name in tiny["datasets"]:
        tiny["datasets"][name]["max_length"] = SEQ
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(root / "params.yaml", profile="tiny")

    gen = torch.Generator().manual_seed(0)
    processed = root / "data" / "processed" / DATASET
    (processed / "tokenizer").mkdir(parents=True)
    write_split(processed / "train.parquet", N_TRAIN, gen)
    write_split(processed / "test.parquet", N_TEST, gen)
    (processed / "meta.json").write_text(json.dumps({
        "name": DATASET, "classes": [f"c{i}" for i in range(LABELS)], "num_labels": LABELS, "max_length": SEQ,
        "vocab_size": VOCAB, "splits": {"train": {"n": N_TRAIN}, "test": {"n": N_TEST}}}))
    torch.manual_seed(0)
    model = model_from_params(cfg, LABELS, VOCAB)
    features = root / "data" / "features" / DATASET
    model.save_pretrained(features / "init_model")
    batches = [(torch.randint(5, VOCAB, (32, SEQ), generator=gen), torch.ones(32, SEQ, dtype=torch.long))]
    feats, counts = compute_arm_features(model, batches, arm_space(cfg), cfg.dht.features, seed=0)
    save_arm_features(features, feats, counts, {"dataset": DATASET, "profile": "tiny"})
    return root


def torchrun(project: Path, out: str, trace: Path | None = None) -> subprocess.Popen:
    """The train stage as the Snakemake rule starts it with nproc_per_node = 2."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               DHT_NO_PROGRESS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop(TRACE_ENV, None)
    if trace is not None:
        env[TRACE_ENV] = str(trace)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "workflow" / "scripts" / "train.py"), "--params", "params.yaml", "--profile", "tiny",
           "--dataset", DATASET, "--model", MODE, "--processed", f"data/processed/{DATASET}",
           "--features", f"data/features/{DATASET}", "--results", f"results/{out}", "--out-model", f"models/{out}",
           "--checkpoints", f"checkpoints/{out}", "--threads", "1"]
    return subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-6000:]
    return output


def outputs(project: Path, out: str) -> tuple[dict, str, str]:
    results = project / "results" / out
    metrics = json.loads((results / "metrics.json").read_text())
    for timing in ("train_seconds", "infer_seconds"):
        metrics.pop(timing)
    return metrics, (results / "loss.csv").read_text(), (results / "selections.json").read_text()


@pytest.fixture(scope="module")
def uninterrupted(project) -> Path:
    trace = project / "trace"
    finish(torchrun(project, "full", trace))
    return trace


@pytest.mark.slow
def test_two_ranks_share_every_epoch_and_end_in_step(project, uninterrupted):
    ranks = [json.loads((uninterrupted / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["size"] for r in ranks] == [2, 2]
    for epoch in range(EPOCHS):
        shares = [r["samples"][str(epoch)] for r in ranks]
        assert Counter(shares[0] + shares[1]) == Counter(range(N_TRAIN))  # every sample once, on one rank
        assert sorted(map(len, shares)) == [N_TRAIN // 2, N_TRAIN - N_TRAIN // 2]
    # bit-identical weights and bandits (LinUCB's A, b, A^-1 and generator, the TSB posterior, the normalisers,
    # the reward baselines) on both ranks
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["weights"] is not None
    assert ranks[0]["bandits"] == ranks[1]["bandits"] and ranks[0]["bandits"] is not None
    metrics, loss, selections = outputs(project, "full")
    assert metrics["train_samples"] == EPOCHS * N_TRAIN  # the accounting sums both ranks
    assert sum(json.loads(selections)["0"][f"layers/{L}"] for L in (3, 6, 9, 12)
               if f"layers/{L}" in json.loads(selections)["0"]) == N_TRAIN
    assert not (project / "checkpoints" / "full" / DATASET / MODE / "checkpoint.pt").exists()


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_metrics(project, uninterrupted):
    proc = torchrun(project, "killed")
    checkpoint = project / "checkpoints" / "killed" / DATASET / MODE / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # torchrun and both ranks (torchrun starts each rank in a session of its own), as a scheduler's time limit would
    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=60)
    assert checkpoint.exists(), f"the run ended before its first checkpoint could be killed:\n{output[-6000:]}"
    assert not (project / "results" / "killed" / "metrics.json").exists()
    resumed = finish(torchrun(project, "killed"))
    assert "resuming at epoch" in resumed
    assert outputs(project, "killed") == outputs(project, "full")


# In-library runs (tests/distributed_worker.py under torchrun): the branches the stage run above does not take.
CASES = [
    # integrated search (F-DHT's arms, UCB_cp) in the warm-up epoch, then P-DHT's own arms with every layer but
    # the last two of each sample's path frozen: ranks at different depths freeze and train different layers
    {"name": "p-dht", "mode": "p-dht", "params": {}},
    # decisions inside the DDP forward (the dropout-noised states), and the arm features recomputed on rank 0
    # and sent to every rank at the start of the second epoch
    {"name": "t-dht-train-states", "mode": "t-dht",
     "params": {"dht.decision_states": "train", "dht.features.refresh": "epoch"}},
    # one set of queues shared by the ranks, each released batch split over them
    {"name": "t-dht-global-queues", "mode": "t-dht", "params": {"train.distributed.queues": "global"}},
    # one fixed arm without dropout, per-rank and global queues: compared with one process below
    {"name": "vanilla-no-dropout", "mode": "vanilla-12", "params": {}, "dropout": 0.0},
    {"name": "vanilla-global-no-dropout", "mode": "vanilla-12", "params": {"train.distributed.queues": "global"},
     "dropout": 0.0},
]


@pytest.fixture(scope="module")
def library_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp-lib")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "distributed_worker.py"), str(out), *map(json.dumps, CASES)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return out


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_every_branch_keeps_the_ranks_in_step(library_runs, case):
    ranks = [json.loads((library_runs / f"{case}.rank{r}.json").read_text()) for r in range(2)]
    n = sum(len(s) for s in ranks[0]["samples"].values()) + sum(len(s) for s in ranks[1]["samples"].values())
    assert n == 2 * 45
    for epoch in ("0", "1"):
        assert Counter(ranks[0]["samples"][epoch] + ranks[1]["samples"][epoch]) == Counter(range(45))
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["bandits"] == ranks[1]["bandits"]
    for key in ("samples_seen", "steps", "train_flops", "selections"):  # the accounting: one, over both ranks
        assert ranks[0][key] == ranks[1][key]
    assert ranks[0]["samples_seen"] == 2 * 45


@pytest.mark.parametrize("case", ["vanilla-no-dropout", "vanilla-global-no-dropout"])
def test_two_ranks_of_half_batches_step_as_one_process(library_runs, case):
    """Without dropout and with one fixed arm (one queue), two ranks of 8 samples a step train the samples one process
    trains 16 at a time (the shares interleave the order), so the loss of every step matches one process's, to
    rounding: the split and DDP's averaged gradient (each rank's sum x ranks / all samples) are right, also for the
    last, partial step of each epoch (45 = 16 + 16 + 13: 7 + 6 samples on the two ranks)."""
    import distributed_worker

    spec = next(c for c in CASES if c["name"] == case)
    alone = distributed_worker.train_once({**spec, "params": {"train.batch_size": 16}}, world=None).progress.history
    ranks = json.loads((library_runs / f"{case}.rank0.json").read_text())["history"]
    assert [(s, e) for s, e, _, _ in ranks] == [(s, e) for s, e, _, _ in alone] and len(alone) == 6
    assert [loss for _, _, loss, _ in ranks] == pytest.approx([loss for _, _, loss, _ in alone], rel=1e-4)
    assert len({round(loss, 3) for _, _, loss, _ in alone}) > 3  # the loss moves: steps after the first compare too
