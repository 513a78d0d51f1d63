"""MLflow tracking: one store per project, one experiment per dataset, one run per stage and model.

The store is ``sqlite:///<project root>/mlflow.db`` (``MLFLOW_TRACKING_URI`` overrides it), with artifacts in
``<project root>/mlartifacts``. A new sqlite store is created by its first client, and parallel first writes
race on the schema migration, so :func:`init_store` creates it once under a file lock; Snakemake calls it in
``onstart`` and every stage calls it again (a no-op once the store exists), which keeps ``dvc repro`` and
single stages safe as well. Experiments are created under the same lock for the same reason.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
_LOCK_FILE = ".mlflow.lock"


def tracking_uri(root: str | Path = ".") -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(root).resolve() / STORE_FILE).as_posix()}"


def _lock(root: str | Path) -> FileLock:
    return FileLock(str(Path(root).resolve() / _LOCK_FILE), timeout=600)


def init_store(root: str | Path = ".") -> str:
    """Create the tracking store (schema migrations) once; safe to call from parallel processes."""
    import mlflow

    uri = tracking_uri(root)
    with _lock(root):
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return uri


def experiment_name(dataset: str, prefix: str = "") -> str:
    return f"{prefix}{dataset}"


def get_or_create_experiment(name: str, root: str | Path = ".") -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root))
    with _lock(root):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = (Path(root).resolve() / ARTIFACT_DIR / name).as_uri()
        return client.create_experiment(name, artifact_location=location)


def git_commit(root: str | Path = ".") -> str:
    """The checkout's commit (with a -dirty suffix when files differ), or 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"model.hidden_size": 96, ...} (MLflow params are flat strings)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@contextmanager
def stage_run(
    dataset: str,
    run_name: str,
    *,
    stage: str,
    profile: str,
    params: Mapping[str, Any] | None = None,
    prefix: str = "",
    root: str | Path = ".",
    run_id: str | None = None,
) -> Iterator[Any]:
    """An MLflow run in the dataset's experiment, tagged with stage, profile and commit.

    Params use the same flat names across models (``model.hidden_size``, ``train.learning_rate``, ...) so the
    MLflow UI's compare view lines runs up. `run_id` continues an earlier run (a resumed training).
    """
    import mlflow

    init_store(root)
    mlflow.set_tracking_uri(tracking_uri(root))
    exp_id = get_or_create_experiment(experiment_name(dataset, prefix), root)
    tags = {"stage": stage, "profile": profile, "dataset": dataset, "git_commit": git_commit(root)}
    if run_id is not None:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
        return
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags) as run:
        if params:
            flat = {k: (str(v) if v is not None else "null") for k, v in flatten(params).items()}
            for start in range(0, len(flat), 100):  # MLflow caps one log_params call at 100
                mlflow.log_params(dict(list(flat.items())[start : start + 100]))
        yield run


def log_run_metrics(metrics: Mapping[str, Any]) -> None:
    """A finished run's metrics.json in the active MLflow run: every number, and the 95% interval as two
    scalars (MLflow metrics are scalars)."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
    lo, hi = metrics["accuracy_ci95"]
    mlflow.log_metrics({"accuracy_ci95_lo": lo, "accuracy_ci95_hi": hi})


class TrainingLogger:
    """The DHT trainer's ``log`` callback: the loss and depth per step (Figure 3) and, for every finished epoch,
    the arms' selection frequencies (Figure 2). The trainer calls it only at checkpoints, with the steps since
    the last one, so a resumed run logs every step exactly once; `progress` tells which epochs are finished."""

    def __init__(self, run_id: str, progress: Any) -> None:
        import mlflow

        self.run_id = run_id
        self.client = mlflow.MlflowClient()
        # epochs finished before a resume were logged by the killed run
        self.logged_epochs = {int(e) for e in progress.selections if int(e) < progress.epoch}

    def __call__(self, pending: list[tuple[int, float, float]], progress: Any) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric("train_loss", loss, now, step) for step, loss, _ in pending]
        metrics += [Metric("train_layers", layers, now, step) for step, _, layers in pending]
        for epoch, counts in progress.selections.items():
            e = int(epoch)
            if e < progress.epoch and e not in self.logged_epochs:
                for family in {k.split("/")[0] for k in counts}:
                    total = sum(v for k, v in counts.items() if k.startswith(family + "/"))
                    metrics += [Metric(f"freq.{k.replace('/', '.').replace('+', '-')}", v / total, now, e + 1)
                                for k, v in counts.items() if k.startswith(family + "/")]
                self.logged_epochs.add(e)
        for start in range(0, len(metrics), 900):  # MLflow caps one log_batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 900])
