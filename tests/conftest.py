"""Shared fixtures: a throw-away copy of the project for pipeline tests, and small datasets on disk."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter

from dht.config import CsvDatasetSpec, DatasetSpec, EmbeddedDatasetSpec, HubDatasetSpec, ModeSpec
from dht.config_loading import read_params, resolve_params
from dht_workflow import project as workflow_project

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def write_processed_split(path: Path, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                          lengths: torch.Tensor) -> None:
    """A processed split in the tokenize stage's parquet layout (dht.tokenization.encode_frame: fixed-size lists
    of int32 ids and int8 mask, int64 labels, int32 lengths)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seq = ids.shape[1]
    pq.write_table(pa.table({
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.to(torch.int32).reshape(-1).numpy()), seq),
        "attention_mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.to(torch.int8).reshape(-1).numpy()), seq),
        "label": pa.array(labels.numpy().astype("int64")),
        "n_tokens": pa.array(lengths.numpy().astype("int32")),
    }), path)


def copy_project(dest: Path) -> Path:
    """The workflow, library and config, without outputs or stores: what a fresh clone has."""
    return workflow_project.copy_project(dest, ROOT)


def embedded_raw() -> dict:
    """params.yaml with the `embedded` profile (the embedded data, the 12-layer BERT from scratch, b = c = 3)
    resolved into its top level, for tests about that structure that edit the top-level sections and load the
    "default" profile. The `embedded` overlay is emptied, since it is already applied: `tiny` and `paper`, which
    extend it, then start from the edited top level, as they start from `embedded` in params.yaml."""
    raw = copy.deepcopy(read_params(ROOT / "params.yaml"))
    resolved = resolve_params(raw, "embedded")
    resolved["profile"] = "default"
    resolved["profiles"] = {**raw["profiles"], "embedded": {}}
    return resolved


def dataset_spec(**keys: object) -> EmbeddedDatasetSpec | HubDatasetSpec | CsvDatasetSpec:
    """A dataset entry completed as params.yaml completes one (dht.config has no defaults): its source's
    `dataset_defaults` in params.yaml, then `keys` (which name the source and every key without a default there)."""
    defaults = read_params(ROOT / "params.yaml")["dataset_defaults"][keys["source"]]
    return TypeAdapter(DatasetSpec).validate_python({**defaults, **keys})


def mode_spec(**keys: object) -> ModeSpec:
    """A mode completed as params.yaml completes one: its `dht.mode_defaults`, then `keys` (its search and arms)."""
    return ModeSpec(**{**read_params(ROOT / "params.yaml")["dht"]["mode_defaults"], **keys})


def two_epoch_tiny(raw: dict) -> dict:
    """`raw` with the tiny overlay trained for 2 epochs and P-DHT warming up for 1 of them: the schedule the
    trainer tests count on (one epoch before and one after a refresh or the end of P-DHT's warm-up), whatever
    tiny's own training budget is. Edits and returns `raw`."""
    tiny = raw["profiles"]["tiny"]
    tiny.setdefault("train", {})["epochs"] = 2
    modes = tiny.setdefault("dht", {}).setdefault("modes", {})
    modes.setdefault("p-dht", {})["warmup_epochs"] = 1
    return raw


# The longest test (the whole tiny DAG, ~2.5 min) starts first: under `make test`'s two pytest-xdist workers,
# started where it is collected it ran on alone at the end of the run while the other worker idled.
STARTED_FIRST = ("test_end_to_end_tiny_then_noop",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: getattr(item, "originalname", item.name) not in STARTED_FIRST)  # stable


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests run tiny models: one intra-op thread. On a shared 2-core machine OpenMP threads stall at
    barriers under load (a model test file took 90 s with 2 threads, 6 s with 1). Pipeline tests start
    subprocesses, which set their own threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


TINY_DATASET = "embedded-news"
# What the tiny profile's data stages (download, tokenize) and arm_features leave for one dataset, with
# Snakemake's records of those jobs (params, code, inputs: without them it would rerun the jobs).
# Not mlflow.db: each MLflow experiment stores its artifact folder as an absolute path into the project that
# created it, and a copy would then write its runs' artifacts there.
TINY_UPSTREAM = (f"data/raw/{TINY_DATASET}", f"data/processed/{TINY_DATASET}", f"data/features/{TINY_DATASET}",
                 "logs", ".snakemake/metadata")


def copy_tiny_upstream(built: Path, dest: Path) -> Path:
    """A fresh copy of the project (copy_project) holding the upstream outputs of `built`, with their times
    (copy2), so that they stay newer than the code they were made from, as Snakemake's mtime check wants."""
    project = copy_project(dest)
    for name in TINY_UPSTREAM:
        shutil.copytree(built / name, project / name)
    return project


@pytest.fixture(scope="session")
def tiny_upstream(tmp_path_factory) -> Path:
    """The tiny profile's embedded-news data and arm features, built once per run by Snakemake as the pipeline
    builds them (the arm_features stage's own test reads them). Tests that only need them as input start from
    a copy (`tiny_project`) instead of rebuilding them: ~30 s each. The end-to-end test still runs the whole DAG
    from nothing in its own `project`. Under pytest-xdist (`make test`) the workers' base folders share a parent
    folder of the run: the first worker to get here builds there, under a lock, and the others wait and reuse it."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root = shared / "tiny-upstream"
    project, done = root / "project", root / "built"
    target = f"data/features/{TINY_DATASET}/meta.json"
    with FileLock(f"{root}.lock"):
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed half-way
            copy_project(project)
            run_cli(["snakemake", "--cores", "2", target, "--config", "profile=tiny"], cwd=project)
            # A copy must be up to date for Snakemake (else the tests using it would rebuild it: right, but slow)
            probe = copy_tiny_upstream(project, root / "probe")
            dry = run_cli(["snakemake", "-n", "--cores", "1", target, "--config", "profile=tiny"], cwd=probe)
            assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
            shutil.rmtree(probe)
            done.touch()
    return project


@pytest.fixture
def tiny_project(tmp_path: Path, tiny_upstream: Path) -> Path:
    """A copy of the project whose tiny embedded-news upstream (data and arm features) is already built."""
    return copy_tiny_upstream(tiny_upstream, tmp_path / "project")


BASELINE_SEQ = 12  # the padded length of baseline_job's splits


@pytest.fixture
def baseline_job(tmp_path: Path):
    """What a baseline kind's ``run(value, job)`` gets (dht.baselines.BaselineJob), small and on the CPU: the tiny
    profile's configuration, its reference model untrained (a kind only needs one to start from), 48 training and
    24 validation samples of a 3-class task whose label is in the second token, and a model directory to write
    (``job.out_model``, absent). A kind's test runs it and loads the result back (docs/baselines.md, "Adding a
    baseline")."""
    from dht.baselines import BaselineJob
    from dht.config_loading import load_config
    from dht.evaluation import SplitData
    from dht.model import model_from_params

    cfg = load_config(ROOT / "params.yaml", profile="tiny")

    def split(n: int, seed: int) -> SplitData:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, 60, (n, BASELINE_SEQ), generator=g)
        return SplitData(ids, torch.ones_like(ids), (ids[:, 1] % 3).long(), torch.arange(n) % 3)

    torch.manual_seed(0)
    teacher = model_from_params(cfg, num_labels=3, vocab_size=60).eval()
    meta = {"max_length": BASELINE_SEQ, "num_labels": 3, "vocab_size": 60, "classes": ["a", "b", "c"]}
    return BaselineJob(cfg, teacher, split(48, 1), split(24, 2), meta, torch.device("cpu"), tmp_path / "model")


def run_cli(args: list[str], cwd: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a console script of this environment (snakemake, dvc, dht) with the venv first on PATH."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc
