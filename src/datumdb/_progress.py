"""Progress of long operations: a tqdm bar on a terminal, dated lines in a log.

A bar is for someone watching a terminal (``--progress`` / ``--no-progress`` force it on or off).
Where there is no bar (stderr is a log file, as in every Snakemake rule, or ``--no-progress``, as
the rules and DVC stages pass) there is one plain line every :data:`LOG_INTERVAL` seconds with
the count, the rate and the time left, so a job that runs for hours says how far it is::

    verify: 120000/1281167 rec (9.4%), 2410 rec/s, elapsed 0:00:50, left 0:08:02

A job shorter than the interval writes no line at all. ``DATUMDB_PROGRESS_INTERVAL`` sets the
interval in seconds (``0`` or ``off``: no lines); it is read here, only here.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

if TYPE_CHECKING:
    from tqdm import tqdm

T = TypeVar("T")

LOG_INTERVAL = 10.0
"""Seconds between two progress lines in a log (not on a terminal)."""
LOG_INTERVAL_ENV = "DATUMDB_PROGRESS_INTERVAL"
_bars: bool | None = None  # what enabled=None means: the command line's --progress / --no-progress


@contextlib.contextmanager
def bars(enabled: bool | None) -> Iterator[None]:
    """Within the block, ``enabled=None`` means ``enabled``: the CLI's ``--progress`` /
    ``--no-progress`` reach every step, also those that do not pass a flag down."""
    global _bars
    previous, _bars = _bars, enabled
    try:
        yield
    finally:
        _bars = previous


def progress(iterable: Iterable[T], *, enabled: bool | None, **kwargs: Any) -> Iterator[T]:
    """``iterable``, reporting its progress: a tqdm bar on a terminal (``enabled=None``: only
    there; True / False force it), else lines in the log every :func:`log_interval` seconds."""
    if _bar_shown(enabled):
        from tqdm import tqdm  # here: importing it costs 25 ms, and most runs show no bar

        return iter(tqdm(iterable, disable=False, dynamic_ncols=True, **kwargs))
    interval = log_interval()
    if interval is None:
        return iter(iterable)
    return _logged(iterable, LogProgress(interval=interval, **kwargs))


def counter(*, enabled: bool | None, **kwargs: Any) -> tqdm | LogProgress:
    """A progress advanced by hand (``bar.update(n)``), for work done a chunk at a time; a
    context manager. A bar where :func:`progress` shows one, else log lines (or nothing)."""
    if _bar_shown(enabled):
        from tqdm import tqdm

        return tqdm(disable=False, dynamic_ncols=True, **kwargs)
    return LogProgress(interval=log_interval(), **kwargs)


def log_interval() -> float | None:
    """Seconds between log lines: :data:`LOG_INTERVAL`, or ``$DATUMDB_PROGRESS_INTERVAL``
    (a positive number of seconds; 0 or ``off``: None, no lines). A bad value keeps the default."""
    value = os.environ.get(LOG_INTERVAL_ENV, "").strip().lower()
    if not value:
        return LOG_INTERVAL
    if value in ("0", "off", "no", "false"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return LOG_INTERVAL
    return seconds if math.isfinite(seconds) and seconds > 0 else LOG_INTERVAL


class LogProgress:
    """Progress as plain lines on a stream (stderr), at most one every ``interval`` seconds
    (``interval=None``: silent). Takes tqdm's ``total``, ``desc`` and ``unit``; ignores the rest."""

    def __init__(
        self,
        *,
        interval: float | None,
        total: int | None = None,
        desc: str | None = None,
        unit: str = "it",
        file: TextIO | None = None,
        **_: Any,
    ) -> None:
        self.interval = interval
        self.total = total
        self.desc = desc or "progress"
        self.unit = unit
        self.file = file
        self.count = 0
        self.started = time.monotonic()
        self._next = self.started + interval if interval is not None else math.inf

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now >= self._next:
            self._next = now + (self.interval or math.inf)
            self._write(now)

    def _write(self, now: float) -> None:
        elapsed = now - self.started
        rate = self.count / elapsed if elapsed > 0 else 0.0
        done = f"{self.count}/{self.total} {self.unit}" if self.total else f"{self.count} {self.unit}"
        parts = [f"{self.desc}: {done}"]
        if self.total:
            parts[0] += f" ({100 * self.count / self.total:.1f}%)"
        parts.append(f"{rate:.0f} {self.unit}/s" if rate >= 10 else f"{rate:.2f} {self.unit}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and rate > 0:
            parts.append(f"left {_clock(max(0, self.total - self.count) / rate)}")
        stream = self.file if self.file is not None else sys.stderr
        try:
            print(", ".join(parts), file=stream, flush=True)
        except (OSError, ValueError):  # a closed or broken log is no reason to fail the work
            self._next = math.inf

    def close(self) -> None:
        self._next = math.inf

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _logged(iterable: Iterable[T], bar: LogProgress) -> Iterator[T]:
    try:
        for item in iterable:
            yield item
            bar.update()
    finally:
        bar.close()


def _bar_shown(enabled: bool | None) -> bool:
    if enabled is None:
        enabled = _bars
    return _on_terminal() if enabled is None else enabled


def _on_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
