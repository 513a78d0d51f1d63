"""Progress of long jobs: a live bar on the terminal, plain lines in a stage's log file.

Every training loop (the DHT trainer, the baselines' :func:`dht.baselines.loop.train`, NAS pruning's search,
FlexiBERT's trainings) draws its progress with :func:`bar`: a tqdm bar with the steps done and to do, the rate, the
time spent and the time left (ETA), and the epoch and the recent loss in its postfix. On a terminal tqdm redraws one
line with carriage returns; a log file would keep every redraw, hours of them on one line. A stage's log
(``--log``, ``workflow/scripts/_stage.py``) is therefore written through :class:`LogLines`, which writes lines as
they are and turns a redrawn line into one plain line when the bar starts, at most one every
:data:`LOG_EVERY_SECONDS` while it runs, and its last state when it is cleared or ends.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any

# How often a running bar's state is written to a log file (seconds): often enough that a job of hours shows it
# is alive, seldom enough that the log stays readable (120 lines an hour).
LOG_EVERY_SECONDS = 30.0

# DHT_NO_PROGRESS=1 turns every bar off (benchmarks and tests that time or compare output).
NO_PROGRESS_ENV = "DHT_NO_PROGRESS"


def bar(total: int, desc: str, *, initial: int = 0, unit: str = "step", enabled: bool = True) -> Any:
    """A progress bar with the project's settings: redrawn at most once a second (``mininterval``), cleared when
    closed (``leave=False``; the stage prints its own summary line), off with ``enabled=False`` or
    ``DHT_NO_PROGRESS=1``. Update it with ``update(n)`` and ``set_postfix(..., refresh=False)``, so that a fast
    loop does not redraw on every step."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, mininterval=1.0, leave=False,
                disable=not enabled or os.environ.get(NO_PROGRESS_ENV) == "1" or not _read_live())


def _read_live() -> bool:
    """Whether a bar on stderr reaches a reader: a terminal, or a stage's log (``_stage.start_log`` marks its
    stream ``progress_lines``, LogLines turns the redraws into lines). Into a pipe or a captured stream a bar would
    be carriage-return runs in front of the stage's own messages (its one-line error among them), so none is drawn."""
    import sys

    stream = sys.stderr
    if getattr(stream, "progress_lines", False):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def finish(shown: Any) -> None:
    """Close a bar from :func:`bar` after drawing its final state (100%): a bar redrawn at most once a second
    would otherwise be cleared showing an earlier step, and that earlier step would be its last line in the log."""
    shown.refresh()
    shown.close()


def recent_mean(values: list[float], last: int = 10) -> float:
    """The mean of the last `last` values: the loss a bar shows (one batch's loss is noise)."""
    tail = values[-last:]
    return sum(tail) / max(len(tail), 1)


_BREAKS = re.compile(r"(\r|\n)")


class LogLines:
    """A filter in front of a log file (``write`` is the file's write): text is passed on line by line, and a line
    redrawn with carriage returns (a progress bar) becomes plain lines: its first state, then at most one every
    ``every`` seconds, and its last state when it is cleared (blanked, as tqdm clears with ``leave=False``), ended
    by a newline, or when :meth:`close` is called. So a log file holds no carriage return and shows a long job's
    progress as it goes."""

    def __init__(self, write: Callable[[str], Any], every: float = LOG_EVERY_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._write, self._every, self._clock = write, every, clock
        self._line = ""  # what the terminal's current line holds since its last \r or \n
        self._pending: str | None = None  # the redrawn line's latest state, not written yet
        self._last_progress = -float("inf")  # when a redrawn state was last written

    def write(self, text: str) -> None:
        for part in _BREAKS.split(text):
            if part == "\r":
                if self._line.strip():  # a state the next redraw replaces
                    self._pending = self._line
                    if self._clock() - self._last_progress >= self._every:
                        self._emit_pending()
                elif self._pending is not None:  # the bar was blanked: its last state
                    self._emit_pending()
                    self._last_progress = -float("inf")  # the next redrawn line is another bar: its first state
                self._line = ""
            elif part == "\n":
                if self._line.strip():
                    self._pending = None  # the line ends here: it is the last state of whatever was redrawn
                    self._write(self._line.rstrip() + "\n")
                elif self._pending is not None:
                    self._emit_pending()
                else:
                    self._write("\n")
                self._line = ""
                self._last_progress = -float("inf")
            else:
                self._line += part

    def close(self) -> None:
        """Write what is held back: a bar's last state, or text not ended by a newline (a job that stops)."""
        if self._line.strip():
            self._pending = self._line
        self._line = ""
        if self._pending is not None:
            self._emit_pending()

    def _emit_pending(self) -> None:
        assert self._pending is not None
        self._write(self._pending.rstrip() + "\n")
        self._pending = None
        self._last_progress = self._clock()
