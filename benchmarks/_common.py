"""Helpers shared by the benchmark scripts: interleaved timing, runtime method timers, machine description,
a throw-away project copy and markdown tables. Benchmarks measure; nothing here asserts a timing."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------
# Interleaved timing
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds per runner and round, and each round's ratio to the reference run of the same round."""

    reference: str
    seconds: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, name: str) -> float:
        return statistics.median(self.ratios[name])

    def spread(self, name: str) -> tuple[float, float]:
        return min(self.ratios[name]), max(self.ratios[name])


def interleaved(runners: dict[str, Callable[[], float]], reference: str, repeats: int, warmup: int = 1) -> Timing:
    """Run every runner once per round, rounds repeated; ratios are paired within a round, then the median.

    Each runner returns the seconds it measured itself (so it can leave set-up and post-processing out). The
    order is rotated by one position per round (A B C, B C A, C A B, ...): a load burst on a shared machine or a
    cache left warm by the previous runner hits every runner alike, and pairing each run with the reference run
    of the same round cancels slow drift. The first `warmup` rounds are discarded (lazy initialisation,
    allocator growth).
    """
    if reference not in runners:
        raise ValueError(f"reference {reference!r} is not one of the runners")
    names = list(runners)
    timing = Timing(reference, {n: [] for n in names}, {n: [] for n in names})
    for r in range(warmup + repeats):
        shift = r % len(names)
        this_round: dict[str, float] = {}
        for name in names[shift:] + names[:shift]:
            gc.collect()  # outside the measured region: a collection inside one runner would bias it alone
            this_round[name] = runners[name]()
        if r < warmup:
            continue
        for name, seconds in this_round.items():
            timing.seconds[name].append(seconds)
            timing.ratios[name].append(seconds / this_round[reference])
    return timing


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer reads the work's end and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------------
# Timers wrapped around methods at runtime (the library is not edited for the benchmark)
# --------------------------------------------------------------------------------------------------------------


class Timers:
    """Exclusive time per label: a wrapped call's time minus the time of wrapped calls nested inside it, so
    labels add up without double counting (Policy.choose_arms minus the pooling and LinUCB.select it calls)."""

    def __init__(self) -> None:
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []  # [label, start, time of nested wrapped calls]

    def reset(self) -> None:
        self.exclusive = defaultdict(float)
        self.calls = defaultdict(int)

    def snapshot(self) -> dict[str, float]:
        return dict(self.exclusive)

    def wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [label, time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - frame[1]
                self._stack.pop()
                self.exclusive[label] += elapsed - frame[2]
                self.calls[label] += 1
                if self._stack:
                    self._stack[-1][2] += elapsed

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed


@contextmanager
def instrumented(timers: Timers, targets: Sequence[tuple[Any, str, str]]) -> Iterator[Timers]:
    """Replace `owner.attr` by a timed wrapper for each (owner, attr, label), restore on exit.

    Owners are classes (every instance is timed; special methods such as __call__ are looked up on the class)
    or single instances, a module among them (its function, as the module's own code looks it up).
    """
    saved: list[tuple[Any, str, Any, bool]] = []
    try:
        for owner, attr, label in targets:
            own = attr in vars(owner)  # an instance attribute or the class's own method, not an inherited one
            original = vars(owner)[attr] if own else getattr(owner, attr)
            fn = getattr(owner, attr)
            if isinstance(owner, type):
                fn = original  # the plain function: the wrapper receives self like the original
            saved.append((owner, attr, original, own))
            setattr(owner, attr, timers.wrap(fn, label))
        yield timers
    finally:
        for owner, attr, original, own in reversed(saved):
            if own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)


# --------------------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_description(device: torch.device, commit: str) -> list[tuple[str, str]]:
    """(what, value) rows: enough to tell whether two reports' numbers can be compared."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    cuda = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU run)"
    if device.type != "cuda" and torch.cuda.is_available():
        cuda = f"{torch.cuda.get_device_name(0)} (present, not used)"
    return [
        ("date (UTC)", datetime.now(UTC).strftime("%Y-%m-%d %H:%M")),
        ("git commit", commit),
        ("CPU", f"{cpu_model()} ({platform.machine()})"),
        ("cores", f"{os.cpu_count()} logical, {usable} usable by this process"),
        ("load average (1/5/15 min) at start", load),
        ("OS / Python", f"{platform.system()} {platform.release()} / Python {platform.python_version()}"),
        ("torch", f"{torch.__version__}, {torch.get_num_threads()} intra-op thread(s)"),
        ("device / CUDA device", f"{device} / {cuda}"),
    ]


# --------------------------------------------------------------------------------------------------------------
# A throw-away project
# --------------------------------------------------------------------------------------------------------------


def copy_project(dest: Path, root: Path = REPO) -> Path:
    """The workflow, library and config of `root`, without outputs or stores: what a fresh clone has."""
    from dht_workflow.project import copy_project as copy

    return copy(dest, root)


# --------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; numbers must be formatted by the caller (the precision is part of the message)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}x"


def fmt_pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min"
