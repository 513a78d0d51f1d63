"""One model trained by two processes: the train stage under `torchrun` with DDP and the gloo backend (CPU).

The stage script runs as the Snakemake rule runs it (workflow/scripts/train.py under torch.distributed.run) on a
small synthetic project written the way the pipeline writes one (processed splits, the initial model, the arm
features), with the tiny profile's model and `train.distributed: {nproc_per_node: 2, backend: gloo}`. Each rank
leaves a trace (dht.distributed.TRACE_ENV): the samples it trained per epoch and the digests of its weights and
bandits. These stage runs are marked slow (three launches, ~65 s on a loaded 2-core machine, and three more with the
levers the one loop brought to several processes); the in-library runs at the end (one torchrun launch of
tests/distributed_worker.py, ~20 s) stay in the quick set.

Then the train rule as a user runs it, with `train.distributed: {nproc_per_node: 2, backend: gloo}` in params.yaml
on the tiny profile: its command (Snakemake's and dvc.yaml's) read by torchrun's own parser (quick), and, slow,
Snakemake and `dvc repro` training with two processes from the built tiny upstream, and a SIGKILL of one rank:
the job fails, its log names the rank, and the rerun resumes to the uninterrupted run's results.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shlex
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
from conftest import BIN, ROOT, copy_project, copy_tiny_upstream, run_cli, write_processed_split

from dht import launch
from dht.arm_features import arm_space, compute_arm_features, save_arm_features
from dht.config import ConfigError
from dht.config_loading import load_config, read_params
from dht.distributed import TRACE_ENV
from dht.model import model_from_params

DATASET, MODE = "embedded-news", "t-dht"
SEQ, VOCAB, LABELS = 16, 50, 4
N_TRAIN, N_VAL, N_TEST, EPOCHS = 61, 8, 24, 3  # 61: the two ranks' shares differ by one sample


def write_split(path: Path, n: int, gen: torch.Generator) -> None:
    """A processed split as the tokenize stage writes it; the label is learnable from the first token."""
    lengths = torch.randint(6, SEQ + 1, (n,), generator=gen)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).to(torch.int8)
    ids = (torch.randint(5, VOCAB, (n, SEQ), generator=gen) * mask).to(torch.int32)
    write_processed_split(path, ids, mask, ids[:, 0] % LABELS, lengths)


def write_project(root: Path, mode: dict | None = None) -> Path:
    """The synthetic project in `root`, with `mode`'s entries set on dht.modes.<MODE> (the tiny profile's)."""
    raw = copy.deepcopy(read_params(ROOT / "params.yaml"))
    tiny = raw["profiles"]["tiny"]
    if mode:
        tiny.setdefault("dht", {}).setdefault("modes", {}).setdefault(MODE, {}).update(mode)
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
    write_split(processed / "val.parquet", N_VAL, gen)  # the stage evaluates it beside test (data.val_fraction)
    (processed / "meta.json").write_text(json.dumps({
        "name": DATASET, "classes": [f"c{i}" for i in range(LABELS)], "num_labels": LABELS, "max_length": SEQ,
        "vocab_size": VOCAB, "splits": {"train": {"n": N_TRAIN}, "val": {"n": N_VAL}, "test": {"n": N_TEST}}}))
    torch.manual_seed(0)
    model = model_from_params(cfg, LABELS, VOCAB)
    features = root / "data" / "features" / DATASET
    model.save_pretrained(features / "init_model")
    batches = [(torch.randint(5, VOCAB, (32, SEQ), generator=gen), torch.ones(32, SEQ, dtype=torch.long))]
    feats, counts = compute_arm_features(model, batches, arm_space(cfg), cfg.dht.features, seed=0)
    save_arm_features(features, feats, counts, {"dataset": DATASET, "profile": "tiny"})
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return write_project(tmp_path_factory.mktemp("ddp"))


def torchrun(project: Path, out: str, trace: Path | None = None) -> subprocess.Popen:
    """The train stage as the Snakemake rule starts it with nproc_per_node = 2 (dht.launch, its `--log` included)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               DHT_NO_PROGRESS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop(TRACE_ENV, None)
    if trace is not None:
        env[TRACE_ENV] = str(trace)
    cmd = [sys.executable, "-m", "dht.launch", "--standalone", "--nproc-per-node", "2", "--",
           str(ROOT / "workflow" / "scripts" / "train.py"), "--log", f"logs/{out}.log", "--params", "params.yaml", "--profile", "tiny",
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


def kill_at_checkpoint(proc: subprocess.Popen, checkpoint: Path) -> None:
    """SIGKILL to torchrun and both ranks (torchrun starts each rank in a session of its own), as a scheduler's time
    limit would, once `checkpoint` is written."""
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=60)
    assert checkpoint.exists(), f"the run ended before its first checkpoint could be killed:\n{output[-6000:]}"


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
    kill_at_checkpoint(proc, project / "checkpoints" / "killed" / DATASET / MODE / "checkpoint.pt")
    assert not (project / "results" / "killed" / "metrics.json").exists()
    resumed = finish(torchrun(project, "killed"))
    assert "resuming at epoch" in resumed
    assert outputs(project, "killed") == outputs(project, "full")


# Levers that were refused with several processes while the distributed loop was a second copy of the trainer's
# (docs/training.md T24, T26, T28): UCB_L fed every depth option, every exit of the path trained, UCB_L restarted at
# every epoch.
STAGE_LEVERS = {"depth_feedback": "all_depths", "exit_loss": "path", "depth_memory": "epoch"}


@pytest.mark.slow
def test_two_ranks_train_the_formerly_one_process_levers_in_step_and_resume(tmp_path_factory):
    """T-DHT with the three levers on, trained by the stage under torchrun as the rule starts it: each sample once per
    epoch on one rank, both ranks end with the same weights and bandits, and UCB_L (bandits.pt, as written) holds
    one update per depth option of every sample of the last epoch alone, of both ranks. Then the same run killed at
    its first checkpoint and rerun ends with the uninterrupted run's metrics, loss curve and selections."""
    from dht.integrity import load_tensors

    lever_project = write_project(tmp_path_factory.mktemp("ddp-levers"), STAGE_LEVERS)
    trace = lever_project / "trace"
    finish(torchrun(lever_project, "full", trace))
    ranks = [json.loads((trace / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(EPOCHS):
        assert Counter(ranks[0]["samples"][str(epoch)] + ranks[1]["samples"][str(epoch)]) == Counter(range(N_TRAIN))
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["bandits"] == ranks[1]["bandits"]
    metrics, _, selections = outputs(lever_project, "full")
    assert metrics["train_samples"] == EPOCHS * N_TRAIN
    bandits = load_tensors(lever_project / "models" / "full" / "bandits.pt", "retrain")
    options = load_config(lever_project / "params.yaml", profile="tiny").dht.modes[MODE].layers
    assert bandits["ucb"]["counts"].tolist() == [N_TRAIN] * len(options)
    assert sum(v for k, v in json.loads(selections)[str(EPOCHS - 1)].items() if k.startswith("layers/")) == N_TRAIN

    proc = torchrun(lever_project, "killed")
    checkpoint = lever_project / "checkpoints" / "killed" / DATASET / MODE / "checkpoint.pt"
    kill_at_checkpoint(proc, checkpoint)
    resumed = finish(torchrun(lever_project, "killed"))
    assert "resuming at epoch" in resumed
    assert outputs(lever_project, "killed") == outputs(lever_project, "full")


# The train rule as a user runs it: Snakemake and `dvc repro`, on the tiny profile's data (the `tiny_upstream`
# build), with two gloo processes set in params.yaml.
TINY_RUN = f"{DATASET}/{MODE}"
TINY_TARGET = f"results/{TINY_RUN}/metrics.json"
TINY_LOG = f"logs/train/{TINY_RUN}.log"
TINY_CHECKPOINT = f"checkpoints/{TINY_RUN}/checkpoint.pt"
TRAIN_SCRIPT = "workflow/scripts/train.py"


def two_rank_tiny(project: Path) -> None:
    """Edit `project`'s params.yaml as a user would to train the tiny profile's models with 2 CPU processes
    (`profile: tiny`, so that DVC's ${profile} is tiny too; a checkpoint every 2 steps, so that a kill finds one).
    The device stays tiny's `auto`, the CPU on the machines the tests run on (skipped where CUDA is there): `device:
    cpu` would change the arm_features stage's tracked params, and Snakemake would rebuild the upstream."""
    if torch.cuda.is_available():
        pytest.skip("two CPU processes: tiny's device auto would take the GPU here")
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["profile"] = "tiny"
    tiny = raw["profiles"]["tiny"]
    tiny["train"] = {**tiny["train"], "checkpoint_every": 2, "distributed": {"nproc_per_node": 2, "backend": "gloo"}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def launched(cmd: str) -> list[str]:
    """A train command with 2 processes as torchrun reads it (its own parser: torchrun's command line, or dht.launch's,
    which passes everything to it): it must start the stage script with every argument of the stage's own; returns
    them."""
    from torch.distributed.run import get_args_parser

    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "-m"] and argv[2] in ("torch.distributed.run", "dht.launch"), cmd
    args = (get_args_parser().parse_args if argv[2] == "torch.distributed.run" else launch.torchrun_args)(argv[3:])
    assert args.standalone and args.nproc_per_node == "2", cmd
    assert args.training_script == TRAIN_SCRIPT, cmd
    assert args.training_script_args == argv[argv.index(TRAIN_SCRIPT) + 1 :], cmd
    return args.training_script_args


def test_train_rule_hands_the_stage_its_own_arguments_under_torchrun(tmp_path):
    """The train rule's real command with nproc_per_node 2, as Snakemake runs it and as the generated dvc.yaml
    runs it, read by torchrun's own parser: the stage script gets all of its arguments, `--log` included (torchrun
    took the stage's `--log` for an ambiguous abbreviation of its own --log-dir / --logs-specs, and every
    multi-process train job exited at once)."""
    from dht_workflow.dvc_params import expand_dvc_stages
    from dht_workflow.snakemake_dag import snakemake_jobs

    project = copy_project(tmp_path / "project")
    two_rank_tiny(project)
    job = next(j for j in snakemake_jobs(project, "tiny", [TINY_TARGET]) if j.rule == "train")
    stage_args = launched(job.cmd)
    assert stage_args[stage_args.index("--log") + 1] == TINY_LOG
    assert stage_args[stage_args.index("--profile") + 1] == "tiny"
    run_cli(["dht", "dvc-yaml", "--profile", "tiny"], cwd=project)
    stages = expand_dvc_stages(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    # DVC's command leaves --profile out (the stage reads params.yaml's profile:, which DVC cannot paste unquoted)
    dvc_cmd = stages[f"train@{DATASET}-{MODE}"]["cmd"]
    assert dvc_cmd == job.cmd.replace(" --profile tiny ", " ")
    launched(dvc_cmd)


def test_a_failed_rank_is_named_before_the_ranks_torchrun_stopped():
    """dht.launch's line for torchrun's failures: the rank that was killed or failed first, then the ranks the
    agent stopped (SIGTERM), whatever order and times torchrun recorded them in."""
    from types import SimpleNamespace as Failure

    killed = {0: Failure(exitcode=-signal.SIGTERM, pid=10, timestamp=7), 1: Failure(exitcode=-signal.SIGKILL, pid=11,
                                                                                   timestamp=7)}
    assert launch.describe_failures(killed, 2) == ("rank 1 of 2 (pid 11) was killed by SIGKILL; torchrun then "
                                                   "stopped rank 0 (SIGTERM)")
    # the other rank failed on the dead rank's closed connection before torchrun stopped it
    crashed = {0: Failure(exitcode=1, pid=10, timestamp=7), 1: Failure(exitcode=-signal.SIGKILL, pid=11, timestamp=7)}
    assert launch.describe_failures(crashed, 2) == ("rank 1 of 2 (pid 11) was killed by SIGKILL; rank 0 of 2 "
                                                    "(pid 10) exited with status 1")
    # a SIGTERM from outside (a scheduler's) to every rank: all of them are named
    stopped = {1: Failure(exitcode=-signal.SIGTERM, pid=11, timestamp=7), 0: Failure(exitcode=-signal.SIGTERM,
                                                                                      pid=10, timestamp=7)}
    assert launch.describe_failures(stopped, 2) == ("rank 0 of 2 (pid 10) was killed by SIGTERM; rank 1 of 2 (pid 11) "
                                                    "was killed by SIGTERM")


def test_a_split_batch_needs_a_batch_size_the_ranks_divide():
    """`batch: split` gives each rank batch_size / N (its queue size q): a batch_size N does not divide is refused
    with the key, the values and a fix, when the configuration is loaded (before any job runs)."""
    raw = copy.deepcopy(read_params(ROOT / "params.yaml"))
    tiny = raw["profiles"]["tiny"]
    tiny["device"] = "cpu"
    tiny["train"] = {**tiny["train"], "batch_size": 16,
                     "distributed": {"nproc_per_node": 3, "backend": "gloo", "batch": "split"}}
    with pytest.raises(ConfigError, match=r"train.distributed.batch = 'split' .* train.batch_size = 16 is not "
                                          r"divisible by nproc_per_node = 3; use a multiple of 3 \(e.g. 15\)"):
        load_config(ROOT / "params.yaml", profile="tiny", raw=raw)
    tiny["train"]["batch_size"] = 15
    assert load_config(ROOT / "params.yaml", profile="tiny", raw=raw).train.queue_size == 15 // 3
    tiny["train"]["distributed"]["batch"] = "per_rank"
    assert load_config(ROOT / "params.yaml", profile="tiny", raw=raw).train.queue_size == 15


def train_samples(project: Path) -> tuple[int, int]:
    """(training samples of the tiny dataset, the profile's epochs)."""
    n = json.loads((project / "data" / "processed" / DATASET / "meta.json").read_text())["splits"]["train"]["n"]
    return n, load_config(project / "params.yaml", profile="tiny").train.epochs


def check_two_ranks(project: Path, trace: Path, run: str) -> None:
    """Both ranks trained (each rank's trace), each sample once per epoch on one of them, and ended in step;
    metrics.json counts both."""
    n, epochs = train_samples(project)
    ranks = [json.loads((trace / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["size"] for r in ranks] == [2, 2]
    for epoch in range(epochs):
        assert Counter(ranks[0]["samples"][str(epoch)] + ranks[1]["samples"][str(epoch)]) == Counter(range(n))
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["bandits"] == ranks[1]["bandits"]
    assert json.loads((project / "results" / run / "metrics.json").read_text())["train_samples"] == epochs * n


@pytest.fixture(scope="module")
def snakemake_two_ranks(tiny_upstream, tmp_path_factory) -> tuple[Path, str]:
    """The tiny profile's T-DHT trained by Snakemake with 2 processes, from a copy of the built upstream:
    (the project, Snakemake's output)."""
    project = copy_tiny_upstream(tiny_upstream, tmp_path_factory.mktemp("snakemake-ddp") / "project")
    two_rank_tiny(project)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TRACE_ENV, str(project / "trace"))
        proc = run_cli(["snakemake", "--cores", "2", TINY_TARGET, "--config", "profile=tiny"], cwd=project)
    return project, proc.stdout + proc.stderr


@pytest.mark.slow
def test_snakemake_trains_a_dht_mode_with_two_processes(snakemake_two_ranks):
    project, output = snakemake_two_ranks
    assert re.search(r"^train\s+1$", output, re.M) and re.search(r"^total\s+1$", output, re.M), output[-3000:]
    check_two_ranks(project, project / "trace", TINY_RUN)
    assert f"train {TINY_RUN}: accuracy" in (project / TINY_LOG).read_text()
    assert not (project / TINY_CHECKPOINT).exists()  # removed once the run is done


@pytest.mark.slow
def test_dvc_repro_runs_a_train_stage_with_two_processes(tiny_project, monkeypatch):
    """The generated dvc.yaml of the profile, run by `dvc repro` for one train stage (its upstream is there)."""
    two_rank_tiny(tiny_project)
    run_cli(["dht", "dvc-yaml", "--profile", "tiny"], cwd=tiny_project)
    subprocess.run(["git", "init", "-q"], cwd=tiny_project, check=True)
    monkeypatch.setenv(TRACE_ENV, str(tiny_project / "trace"))
    stage = f"train-vanilla@{DATASET}-vanilla-3"  # the fixed modes' own stage: they read no bandit key
    run_cli(["dvc", "repro", "resolve_params"], cwd=tiny_project)  # the resolved params every stage reads
    proc = run_cli(["dvc", "repro", "--single-item", stage], cwd=tiny_project, timeout=900)
    cmd = yaml.safe_load((tiny_project / "dvc.lock").read_text())["stages"][stage]["cmd"]
    assert launched(cmd) and cmd in proc.stdout
    check_two_ranks(tiny_project, tiny_project / "trace", f"{DATASET}/vanilla-3")


def rank_process(parent: psutil.Process, rank: int) -> psutil.Process | None:
    """The process of a rank among `parent`'s descendants (torchrun gives each its RANK)."""
    for process in parent.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.environ().get("RANK") == str(rank):
                return process
    return None


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_naming_it_and_the_rerun_resumes(tiny_project, snakemake_two_ranks):
    """SIGKILL to rank 1 once a checkpoint is written (the OOM killer's way): torchrun's agent stops rank 0, which
    would otherwise wait in its next collective for the dead rank (gloo's timeout is 30 minutes), the job fails and
    its log names the rank; a plain rerun resumes from the checkpoint and ends as the uninterrupted run did."""
    two_rank_tiny(tiny_project)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([str(BIN / "snakemake"), "--cores", "2", TINY_TARGET, "--config", "profile=tiny"],
                            cwd=tiny_project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = tiny_project / TINY_CHECKPOINT
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    rank1 = rank_process(psutil.Process(proc.pid), 1)
    if rank1 is None or not checkpoint.exists():
        proc.kill()
        pytest.fail(f"no checkpoint and rank 1 to kill:\n{proc.communicate()[0][-4000:]}")
    rank1.send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=180)  # liveness: nothing may wait for the dead rank
    assert proc.returncode != 0 and "Error in rule train" in output, output[-4000:]
    log = (tiny_project / TINY_LOG).read_text()
    assert re.search(rf"rank 1 of 2 \(pid {rank1.pid}\) was killed by SIGKILL", log), log[-3000:]
    assert checkpoint.exists() and not (tiny_project / TINY_TARGET).exists()

    run_cli(["snakemake", "--cores", "2", "--rerun-incomplete", TINY_TARGET, "--config", "profile=tiny"],
            cwd=tiny_project)
    assert re.search(rf"train {TINY_RUN}: resuming at epoch \d+, step [1-9]", (tiny_project / TINY_LOG).read_text())
    assert outputs(tiny_project, TINY_RUN) == outputs(snakemake_two_ranks[0], TINY_RUN)


SEQUENTIAL = {"search": "sequential", "layers": [3, 6, 9, 12], "heads": [8, 10, 12], "depth_feedback": "all_depths",
              "exit_loss": "path", "all_depths_reward": "difference", "depth_loss": "error_probability",
              "depth_price": 0.01, "exit_weights": "depth", "distil_weight": 0.5}
# In-library runs (tests/distributed_worker.py under torchrun): the branches the stage run above does not take.
LEVERS = {"dht.modes.t-dht.depth_feedback": "all_depths", "dht.modes.t-dht.exit_loss": "path",
          "dht.modes.t-dht.depth_memory": "epoch"}
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
    # the levers the one loop brought to several processes (docs/training.md T24, T26, T28): UCB_L fed every depth
    # from a counterfactual pass, every exit of the path trained, UCB_L restarted each epoch
    {"name": "t-dht-levers", "mode": "t-dht", "params": LEVERS},
    # search: sequential (docs/training.md T31): every boundary's stop decision and every group's heads taken
    # jointly on both ranks' rows, each rank's samples leaving its batch where they stop, the full-information
    # updates replayed on every rank
    {"name": "q-dht", "mode": "q-dht", "params": {"dht.modes.q-dht": SEQUENTIAL}},
    # ... and with batches of 11, so that at the end of each epoch one rank (23 samples) has a third batch (of 1)
    # and the other (22) takes part in its decisions and its step without one
    {"name": "q-dht-empty-rank", "mode": "q-dht", "params": {"dht.modes.q-dht": SEQUENTIAL, "train.batch_size": 11}},
    # one fixed arm without dropout, per-rank and global queues: compared with one process below
    {"name": "vanilla-no-dropout", "mode": "vanilla-12", "params": {}, "dropout": 0.0},
    {"name": "vanilla-global-no-dropout", "mode": "vanilla-12", "params": {"train.distributed.queues": "global"},
     "dropout": 0.0},
    # batch: split: a batch_size of 16 split into 8 a rank, i.e. one process's steps of 16
    {"name": "vanilla-split-no-dropout", "mode": "vanilla-12",
     "params": {"train.batch_size": 16, "train.distributed.batch": "split"}, "dropout": 0.0},
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


def test_two_ranks_feed_ucb_l_every_depth_of_every_rank_and_restart_it_each_epoch(library_runs):
    """depth_feedback: all_depths with depth_memory: epoch on two ranks: at the end UCB_L holds, on both ranks, one
    update per depth option for every sample of the last epoch, both ranks' samples (each rank replays the other's
    updates), and none of the first epoch's."""
    ranks = [json.loads((library_runs / f"t-dht-levers.rank{r}.json").read_text()) for r in range(2)]
    options = len(distributed_worker_config(LEVERS).dht.modes["t-dht"].layers)
    assert ranks[0]["ucb_counts"] == ranks[1]["ucb_counts"]
    assert sum(ranks[0]["ucb_counts"]) == 45 * options
    assert all(count == 45 for count in ranks[0]["ucb_counts"])  # every sample fed every option


def distributed_worker_config(params: dict):
    import distributed_worker

    return distributed_worker.config({"params": params})


@pytest.mark.parametrize("case", ["vanilla-no-dropout", "vanilla-global-no-dropout", "vanilla-split-no-dropout"])
def test_two_ranks_of_half_batches_step_as_one_process(library_runs, case):
    """Without dropout and with one fixed arm (one queue), two ranks of 8 samples a step train the samples one process
    trains 16 at a time (the shares interleave the order), so the loss of every step matches one process's, to
    rounding: the split and DDP's averaged gradient (each rank's sum x ranks / all samples) are right, also for the
    last, partial step of each epoch (45 = 16 + 16 + 13: 7 + 6 samples on the two ranks). With `batch: split` and
    batch_size 16 the ranks take 8 each: the same optimizer steps as one process with batch_size 16."""
    import distributed_worker

    spec = next(c for c in CASES if c["name"] == case)
    trained = distributed_worker.train_once({**spec, "params": {"train.batch_size": 16}}, world=None)
    alone = trained.progress.history
    rank0 = json.loads((library_runs / f"{case}.rank0.json").read_text())
    ranks = rank0["history"]
    # the optimizer steps: ceil(45 / 16) = 3 an epoch of the 2, as one process's
    assert rank0["steps"] == trained.progress.step == 2 * math.ceil(distributed_worker.N_TRAIN / 16)
    assert [(s, e) for s, e, _, _ in ranks] == [(s, e) for s, e, _, _ in alone] and len(alone) == 6
    assert [loss for _, _, loss, _ in ranks] == pytest.approx([loss for _, _, loss, _ in alone], rel=1e-4)
    assert len({round(loss, 3) for _, _, loss, _ in alone}) > 3  # the loss moves: steps after the first compare too
