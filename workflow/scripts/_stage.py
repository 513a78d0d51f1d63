"""Argument parsing shared by the stage scripts (each script stays a few lines over the dht library)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# transformers draws a progress bar for every save/load of a small model, MLflow one for every model it logs:
# noise in a pipeline log.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from dht.config import Config, ConfigError
from dht.config_loading import apply_overlay, load_config


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    p.add_argument("--profile", default=None, help="profile to resolve (default: params.yaml's `profile:`)")
    p.add_argument("--log", default=None,
                   help="also write everything the stage prints to this file (the rule's log:; its folder is made)")
    return p


class _Tee:
    """A text stream that writes to the stage's own stream and to its log file; to the log through
    :class:`dht.progress.LogLines`, so a progress bar's redraws become plain lines there, one every
    :data:`dht.progress.LOG_EVERY_SECONDS`, instead of carriage-return runs. The stage's own stream gets the live
    bar only when it is a terminal; into Snakemake's or DVC's captured output (a file, a pipe) it gets the same
    plain lines as the log."""

    progress_lines = True  # dht.progress draws its bars here: LogLines writes them to the log as lines

    def __init__(self, stream: object, log: object) -> None:
        from dht.progress import LogLines

        self._stream, self._log = stream, log
        self._lines = LogLines(log.write)
        isatty = getattr(stream, "isatty", None)
        self._stream_lines = None if isatty and isatty() else LogLines(stream.write)

    def write(self, text: str) -> int:
        if self._stream_lines is None:
            self._stream.write(text)
        else:
            self._stream_lines.write(text)
        self._lines.write(text)
        self._log.flush()  # a killed job keeps what it printed
        return len(text)

    def close_log(self) -> None:
        """At exit: what the log side still holds back (a bar's last state, a line without its newline)."""
        self._lines.close()
        self._log.flush()
        if self._stream_lines is not None:
            self._stream_lines.close()
            self._stream.flush()

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def __getattr__(self, name: str) -> object:  # isatty, encoding, fileno...: the terminal's
        return getattr(self._stream, name)


def start_log(path: str | Path) -> None:
    """Copy stdout and stderr (messages, progress, an error's traceback) into `path`, appended after a header
    line, so a resumed job's log keeps the attempt before it. Snakemake makes the folder; DVC does not, so it is
    made here."""
    import atexit
    import datetime
    import shlex

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.open("a", encoding="utf-8")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    log.write(f"=== {stamp}: {shlex.join(sys.argv)}\n")
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    for tee in (sys.stdout, sys.stderr):
        atexit.register(tee.close_log)


def config(args: argparse.Namespace) -> Config:
    """The resolved profile (after starting the ``--log`` copy); with ``--training-seed`` (:func:`add_seed`), as
    that training run sees it (:meth:`dht.config.Config.for_training_seed`)."""
    if getattr(args, "log", None):
        start_log(args.log)
    try:
        cfg = load_config(args.params, profile=args.profile)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    if getattr(args, "overlay", None):
        try:
            cfg = apply_overlay(cfg, json.loads(args.overlay), "--overlay")
        except (ValueError, ConfigError) as err:  # json's errors are ValueErrors
            sys.exit(f"error: {err}")
    seed = getattr(args, "training_seed", None)
    if seed is not None:
        if seed not in cfg.training_seeds:
            sys.exit(f"error: --training-seed {seed} is not a training seed of profile '{cfg.profile}' "
                     f"(run.training_seeds: {cfg.training_seeds}); add it to run.training_seeds in params.yaml")
        cfg = cfg.for_training_seed(seed)
    return cfg


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--training-seed", type=int, default=None,
                   help="the training seed of this run, one of run.training_seeds (default: the only one); the data "
                        "and arm features were drawn with data_seed before")


def add_overlay(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overlay", default=None, metavar="JSON",
                   help="a partial params.yaml (a JSON mapping) merged into the profile and validated again: a study's "
                        "setting, as workflow/rules/studies.smk resolves it (docs/pipeline.md, \"Studies\")")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch threads (Snakemake passes the rule's threads)")


def runtime(args: argparse.Namespace, cfg: Config) -> tuple[object, int]:
    """Threads, seeds and device of a model stage: (torch device, threads in use). The seed: a training's (a stage
    with ``--training-seed``, :func:`add_seed`), else the data seed (the arm features, the FlexiBERT search). A
    device that is not there (device: cuda on a CPU machine) stops with the message, not a traceback."""
    from dht.runtime import configure_threads, resolve_device, seed_everything

    threads = configure_threads(args.threads)
    try:
        seed_everything(cfg.training_seed if hasattr(args, "training_seed") else cfg.data_seed)
    except ValueError as err:  # several training seeds and no --training-seed
        sys.exit(f"error: {err}")
    try:
        return resolve_device(cfg.device), threads
    except RuntimeError as err:
        sys.exit(f"error: {err}")


def stop_cleanly(what: str) -> None:
    """A training that diverges (:class:`dht.guard.TrainingError`, raised by every training loop's guard) ends
    the stage with one line naming ``what`` (the stage, dataset and model), the step and the fix, and exit status
    1, instead of a traceback. The exception still unwinds through the MLflow run (marked FAILED) and past
    everything that writes a model or metrics, so nothing is written."""
    from dht.guard import TrainingError

    def hook(kind, value, tb):
        if issubclass(kind, TrainingError):
            print(f"error: {what}: {value}; no model or metrics were written", file=sys.stderr)
        else:
            sys.__excepthook__(kind, value, tb)

    sys.excepthook = hook


def params_dir(args: argparse.Namespace) -> Path:
    """The folder of the params file (``--params``): where a `csv` dataset's relative `path` starts, as in
    validation (:meth:`dht.config.CsvDatasetSpec.folder`), wherever the stage is started from."""
    return Path(args.params).parent


def root() -> Path:
    """Stages run from the project root (Snakemake and DVC both start them there); paths stay relative so
    messages show them as params.yaml writes them."""
    return Path(".")
