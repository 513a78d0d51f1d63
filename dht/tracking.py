"""MLflow tracking: one store per project; per dataset one experiment of models and one of the pipeline's stages.

The store is ``sqlite:///<project root>/mlflow.db`` (``MLFLOW_TRACKING_URI`` overrides it), with artifacts in
``<project root>/mlartifacts``. A new sqlite store is created by its first client, and parallel first writes
race on the schema migration, so :func:`init_store` creates it once under a file lock; Snakemake calls it in
``onstart`` and every stage calls it again (a no-op once the store exists), which keeps ``dvc repro`` and
single stages safe as well. Experiments are created under the same lock for the same reason.

What a researcher reads (docs/training.md, "MLflow"):

- The experiment ``<dataset>`` (:func:`experiment_name`) holds one run per model (the train and baseline stages,
  :data:`MODEL_STAGES`), so its table and charts compare models only. The stages that make their inputs
  (tokenize, arm_features, flexibert-search with a nested run per query) are in ``<dataset>.stages``
  (:func:`stages_experiment_name`): MLflow's experiments group the runs that are compared with each other, and a
  search's trials are nested runs under the search (MLflow's parent and child runs). '.' is in no dataset name
  (:data:`dht.config.NAME_PATTERN`), so the two names never meet.
- Each experiment's description (the ``mlflow.note.content`` tag) names the dataset, the profiles that ran in
  it and where the other experiment is.
- A model run's headline numbers come first: logged before anything else (the run page lists metrics in the
  order they were first logged) under names that sort before every other metric (the runs table sorts its
  metric columns by name), :data:`SUMMARY`: accuracy, its 95% interval, the inference FLOP ratio, the mean
  layers and the total training FLOP ratio. The run's description says them in words. Then the rest of
  metrics.json, then the training curves (``train_loss`` per optimizer step for every model).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Mapping
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


# The stages whose runs are models, compared in the dataset's experiment; every other stage's run goes to the
# dataset's stages experiment.
MODEL_STAGES = ("train", "baseline")
STAGES_SUFFIX = ".stages"
STUDY_INFIX = ".study."  # <dataset>.study.<study>: a study's runs (dht.studies)
NOTE_TAG = "mlflow.note.content"  # the description MLflow's UI shows on an experiment's or a run's page
PROFILES_TAG = "profiles"  # the profiles whose runs an experiment holds, comma-separated

# A model run's headline metrics: MLflow name <- metrics.json key, in the order the UI shows them (the names
# sort before every other metric: 'S' before the lower-case letters that start the others).
SUMMARY = {
    "Summary/accuracy": "accuracy",
    "Summary/accuracy_ci95_lower": "accuracy_ci95",
    "Summary/accuracy_ci95_upper": "accuracy_ci95",
    "Summary/infer_flop_ratio": "infer_flop_ratio",
    "Summary/mean_layers": "mean_layers",
    "Summary/train_flop_ratio_total": "train_flop_ratio_total",
}


def experiment_name(dataset: str, prefix: str = "") -> str:
    """The dataset's experiment of models (one run per trained model and baseline)."""
    return f"{prefix}{dataset}"


def stages_experiment_name(dataset: str, prefix: str = "") -> str:
    """The dataset's experiment of pipeline stages (tokenize, arm_features, flexibert-search and its queries)."""
    return f"{prefix}{dataset}{STAGES_SUFFIX}"


def study_experiment_name(dataset: str, study: str, prefix: str = "") -> str:
    """The experiment of a study's runs on the dataset (dht.studies; '.' is in no dataset name, so it never meets
    the dataset's own experiments)."""
    return f"{prefix}{dataset}{STUDY_INFIX}{study}"


def describe_study_experiment(dataset: str, study: str, prefix: str, profiles: list[str]) -> str:
    """A study experiment's description (Markdown)."""
    ran = ", ".join(f"`{p}`" for p in profiles)
    return (f"The study **{study}** (workflow/studies.yaml) on the dataset **{dataset}** (profile {ran}): one run per "
            "setting and model, each the profile with the setting's overlays (params `overlay.*`; tags `study`, "
            "`setting`). Every metric is of the **validation split**: a study chooses settings, the test split is "
            f"for the tables. The pipeline's models are in the experiment `{experiment_name(dataset, prefix)}`.")


def describe_experiment(dataset: str, prefix: str, profiles: list[str], models: bool) -> str:
    """The experiment's description (Markdown, MLflow's ``mlflow.note.content``): the dataset, the profiles whose
    runs it holds, what its runs are, how to read them, and where the other experiment of the dataset is."""
    ran = ", ".join(f"`{p}`" for p in profiles)
    if models:
        return (f"Models trained on the dataset **{dataset}** by the DHT pipeline (profile {ran}; each run's tag "
                "`profile` says which). One run per model: the DHT modes and fixed models (tag `stage` = train) "
                "and the baselines (`stage` = baseline). The `Summary/` metrics come first: test accuracy, its 95% "
                "interval, inference FLOPs and total training FLOPs relative to the reference, mean layers. "
                "`train_loss` is per optimizer step. Each run's `model` is an MLflow model: "
                "`mlflow.pyfunc.load_model(\"runs:/<run id>/model\").predict([\"a text\"])`. The pipeline's "
                f"stage runs are in the experiment `{stages_experiment_name(dataset, prefix)}`.")
    return (f"The DHT pipeline's stages on the dataset **{dataset}** (profile {ran}): tokenize, arm_features, and "
            "flexibert-search with a nested run per architecture it trained. The models are compared in the "
            f"experiment `{experiment_name(dataset, prefix)}`.")


def get_or_create_experiment(name: str, root: str | Path = ".", describe: Callable[[list[str]], str] | None = None,
                             profile: str | None = None) -> str:
    """The experiment `name`'s id, created when missing. With `describe` (the profiles -> its description) and
    `profile`, its description and its profiles tag name `profile` as well (a store several profiles ran in
    lists them all)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root))
    with _lock(root):
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = (Path(root).resolve() / ARTIFACT_DIR / name).as_uri()
            exp_id, tags = client.create_experiment(name, artifact_location=location), {}
        else:
            exp_id, tags = exp.experiment_id, exp.tags
        if describe is not None and profile is not None:
            profiles = sorted({*(p for p in tags.get(PROFILES_TAG, "").split(",") if p), profile})
            if tags.get(PROFILES_TAG) != ",".join(profiles) or NOTE_TAG not in tags:
                client.set_experiment_tag(exp_id, PROFILES_TAG, ",".join(profiles))
                client.set_experiment_tag(exp_id, NOTE_TAG, describe(profiles))
        return exp_id


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
    study: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """An MLflow run, tagged with stage, profile and commit: in the dataset's experiment of models for a model's
    stage (:data:`MODEL_STAGES`), in its stages experiment otherwise (the module's docstring says why).

    Params use the same flat names across models (``model.hidden_size``, ``train.learning_rate``, ...) so the
    MLflow UI's compare view lines runs up. `run_id` continues an earlier run (a resumed training).
    A `study`'s runs (dht.studies) go to the experiment ``<dataset>.study.<study>`` (:func:`study_experiment_name`);
    `tags` are added to the run's.
    """
    import mlflow

    init_store(root)
    mlflow.set_tracking_uri(tracking_uri(root))
    models = stage in MODEL_STAGES
    if study:
        name = study_experiment_name(dataset, study, prefix)
        exp_id = get_or_create_experiment(
            name, root, lambda profiles: describe_study_experiment(dataset, study, prefix, profiles), profile)
    else:
        name = experiment_name(dataset, prefix) if models else stages_experiment_name(dataset, prefix)
        exp_id = get_or_create_experiment(
            name, root, lambda profiles: describe_experiment(dataset, prefix, profiles, models), profile)
    tags = {"stage": stage, "profile": profile, "dataset": dataset, "git_commit": git_commit(root), **(tags or {})}
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


def summary_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.json's headline numbers under their MLflow names (:data:`SUMMARY`), in order."""
    lo, hi = metrics["accuracy_ci95"]
    return {name: float(lo if name.endswith("_lower") else hi if name.endswith("_upper") else metrics[key])
            for name, key in SUMMARY.items()}


def summary_text(metrics: Mapping[str, Any]) -> str:
    """The headline numbers in words: a model run's description (its page shows it above everything else)."""
    lo, hi = metrics["accuracy_ci95"]
    split = "validation " if metrics.get("split") == "val" else ""  # a study's run (dht.studies)
    return (f"{split}accuracy {metrics['accuracy']:.3f} (95% interval [{lo:.3f}, {hi:.3f}]), inference FLOPs "
            f"{metrics['infer_flop_ratio']:.2f}x, training FLOPs {metrics['train_flop_ratio_total']:.2f}x in total, "
            f"mean layers {metrics['mean_layers']:.1f} (FLOPs relative to the reference)")


def log_run_metrics(metrics: Mapping[str, Any]) -> None:
    """A finished run's metrics.json in the active MLflow run, before its curves: the headline first
    (:func:`summary_metrics`, and :func:`summary_text` as the run's description), then every other number (MLflow
    metrics are scalars: the interval is two of the headline's)."""
    import mlflow

    summary = summary_metrics(metrics)
    mlflow.log_metrics(summary)
    shown = set(SUMMARY.values())
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and k not in shown})
    mlflow.set_tag(NOTE_TAG, summary_text(metrics))


def log_curves(run_id: str, curves: Mapping[str, list[tuple[int, float]]]) -> None:
    """Training curves, metric name -> (step, value) pairs, in batches (MLflow caps one log_batch at 1000)."""
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(name, float(value), now, int(step)) for name, points in curves.items() for step, value in points]
    client = mlflow.MlflowClient()
    for start in range(0, len(metrics), 900):
        client.log_batch(run_id, metrics=metrics[start : start + 900])


def training_curves(progress: Any) -> dict[str, list[tuple[int, float]]]:
    """A finished DHT training's curves (the trainer's :class:`~dht.trainer.Progress`): ``train_loss`` and
    ``train_layers`` per optimizer step (Figure 3) and ``freq.<family>.<option>``, each arm family's selection
    frequencies, per epoch (Figure 2, step = the epoch from 1). Logged once, when the run is done (after its
    headline, :func:`log_run_metrics`), from the history the checkpoints keep: a resumed run logs every step once."""
    curves: dict[str, list[tuple[int, float]]] = {"train_loss": [], "train_layers": []}
    for step, _epoch, loss, layers in progress.history:
        curves["train_loss"].append((step, loss))
        curves["train_layers"].append((step, layers))
    for epoch, counts in sorted(progress.selections.items(), key=lambda item: int(item[0])):
        for family in sorted({k.split("/")[0] for k in counts}):
            total = sum(v for k, v in counts.items() if k.startswith(family + "/"))
            for k, v in counts.items():
                if k.startswith(family + "/"):
                    curves.setdefault(f"freq.{k.replace('/', '.').replace('+', '-')}", []).append((int(epoch) + 1, v / total))
    return curves


# The code of every pipeline model logged to MLflow (dht/mlflow_model.py says how it loads); a path, not an
# import: loading models is not the code of the stages that log them.
MODEL_CODE = Path(__file__).with_name("mlflow_model_code.py")
MODEL_ARTIFACT = "model"  # the name a run's model is logged under: runs:/<run id>/model
MODEL_INPUT_EXAMPLE = ["a text to classify", "another one"]  # shown with the model, and run through it as logged


def model_requirements() -> list[str]:
    """What loading a logged model needs beside the project itself: the installed versions of its libraries."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "torch", "transformers", "safetensors", "pandas")]


def log_model(model_dir: str | Path, teacher_dir: str | Path | None = None) -> Any:
    """Log a trained model directory (a DHT model's or a baseline's, as its stage wrote it) to the active run as
    the pyfunc model ``model`` (:mod:`dht.mlflow_model`), with the teacher it runs on (`teacher_dir`: a FastBERT
    baseline's students run on the reference's backbone). MLflow runs the input example through the logged copy,
    so a model that does not load fails here. Returns MLflow's model info (its ``model_uri`` loads it)."""
    import logging

    import mlflow

    logging.getLogger("mlflow.models.signature").setLevel(logging.WARNING)  # "Running the predict function ...": noise
    artifacts = {"model": str(model_dir)}
    if teacher_dir is not None:
        artifacts["teacher"] = str(teacher_dir)
    return mlflow.pyfunc.log_model(name=MODEL_ARTIFACT, python_model=str(MODEL_CODE), artifacts=artifacts,
                                   input_example=MODEL_INPUT_EXAMPLE, pip_requirements=model_requirements())
