"""The train stage's launch on several processes: torchrun (``torch.distributed.run``), with the stage's arguments
kept the stage's and a failed rank named in the stage's log (docs/distributed.md).

    python -m dht.launch --standalone --nproc-per-node N -- workflow/scripts/train.py ... --log logs/train/x.log

Everything before ``--`` is torchrun's own options, passed as they are; everything after it is the stage's command.
torchrun alone (``python -m torch.distributed.run ... workflow/scripts/train.py ... --log x``) cannot take the
stage's ``--log``: its parser reads options anywhere before the script's remainder and accepts abbreviations, so
``--log`` is taken for an ambiguous abbreviation of its ``--log-dir`` / ``--logs-specs`` and the launch stops. The
``--`` ends torchrun's options (the launch here always passes it).

When a rank fails (a traceback, a non-finite loss, or a signal such as a SIGKILL by the kernel's OOM killer or a
scheduler), torchrun's agent notices within its monitor interval (``--monitor-interval``, 0.1 s by default),
sends SIGTERM to the other ranks (a rank waiting in a gloo or NCCL collective for the dead one ends then, not at
the process group's timeout) and raises. torchrun prints that failure to its own stderr only, which the rule does
not send to the job's log; this launch writes one line naming each failed rank and how it ended to stderr and
appends it to the stage's log (its ``--log``), and exits 1. Rerunning the job resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, the stage's command) of this launcher's arguments, split at the first ``--``."""
    argv = list(argv)
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        raise SystemExit("usage: python -m dht.launch [torchrun options] -- SCRIPT [script arguments]")
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def torchrun_args(argv: Sequence[str]) -> argparse.Namespace:
    """torchrun's own reading (``torch.distributed.run.get_args_parser``) of this launcher's arguments: its
    options, then the stage's command after ``--`` (``training_script``, ``training_script_args``)."""
    from torch.distributed.run import get_args_parser

    options, command = split_command(argv)
    return get_args_parser().parse_args([*options, "--", *command])


def stage_log(command: Sequence[str]) -> str | None:
    """The stage's ``--log`` file (workflow/scripts/_stage.py) in its command, or None."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--log", default=None)
    return p.parse_known_args(list(command[1:]))[0].log


def describe_failures(failures: dict, size: int | str) -> str:
    """The failed ranks (torchrun's ``ChildFailedError.failures``: global rank -> ProcessFailure) in words: first
    the ranks that failed of themselves or were killed from outside, signals first (a rank killed from outside is
    the cause, and another rank may fail in the same moment on its closed connection; their failure times, in whole
    seconds, do not tell the two apart), then the ranks torchrun's agent stopped with SIGTERM after that."""

    def ended(failure) -> str:
        if failure.exitcode >= 0:
            return f"exited with status {failure.exitcode}"
        try:
            return f"was killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            return f"was killed by signal {-failure.exitcode}"

    stopped = sorted(r for r, f in failures.items() if f.exitcode == -signal.SIGTERM)
    causes = [r for r in failures if r not in stopped]
    if not causes:  # every rank ended by SIGTERM: it came from outside (a scheduler), not from the agent
        causes, stopped = stopped, []
    causes = sorted(causes, key=lambda r: (failures[r].exitcode >= 0, failures[r].timestamp, r))
    text = "; ".join(f"rank {r} of {size} (pid {failures[r].pid}) {ended(failures[r])}" for r in causes)
    if stopped:
        text += f"; torchrun then stopped rank {', '.join(map(str, stopped))} (SIGTERM)"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    args = torchrun_args(sys.argv[1:] if argv is None else argv)
    command = [args.training_script, *args.training_script_args]
    try:
        run(args)
    except ChildFailedError as err:
        message = (f"error: {command[0]}: {describe_failures(err.failures, args.nproc_per_node)} (a rank's own "
                   "error, if any, is above); a rerun resumes from the last checkpoint (train.checkpoint_every)")
        print(message, file=sys.stderr, flush=True)
        log = stage_log(command)
        if log:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(message + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
