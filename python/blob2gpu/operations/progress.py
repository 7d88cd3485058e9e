"""Progress of a load for people (``blob2gpu load``): a bar with bytes, GB/s and ETA on a
terminal, a plain line every few seconds otherwise (logs of a pod), nothing with --quiet.

A thread polls ``checkpoint.progress()`` while the main thread waits for the load; the poll is a
read of the core's counters, so it costs the load nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

BAR, LINES, NONE = "bar", "lines", "none"
BAR_INTERVAL = 0.1  # seconds between redraws of the bar
LINES_INTERVAL = 2.0  # seconds between plain lines


def choose_mode(stream: TextIO, quiet: bool = False) -> str:
    """'none' when quiet, 'bar' when `stream` is a terminal (and TERM is not dumb), else 'lines'."""
    if quiet:
        return NONE
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return BAR if tty and os.environ.get("TERM") != "dumb" else LINES


def _size(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f} s"


class LoadProgress:
    """Shows a load's progress on `stream` until stopped; use as a context manager around the
    wait for the load. `poll` returns (bytes read, total bytes) and may be called from a thread.

    mode: 'bar', 'lines' or 'none' (see choose_mode). interval: seconds between updates (default
    0.1 for the bar, 2 for lines). elapsed: seconds since the load started (a LoadReport's
    elapsed, so the rate counts the whole load as its report does; default: since start()).
    finish() gives the figures the last line shows, so it says what the report says.
    """

    def __init__(
        self,
        poll: Callable[[], tuple[int, int]],
        stream: TextIO | None = None,
        mode: str | None = None,
        interval: float | None = None,
        label: str = "blob2gpu",
        elapsed: Callable[[], float] | None = None,
    ) -> None:
        self._poll = poll
        self._elapsed = elapsed or self._since_start
        self._result: tuple[int, float] | None = None  # (bytes, seconds) given by finish()
        self._stream = stream if stream is not None else sys.stderr
        self.mode = mode or choose_mode(self._stream)
        if self.mode not in (BAR, LINES, NONE):
            raise ValueError(f"progress mode must be 'bar', 'lines' or 'none', not {self.mode!r}")
        self.interval = (
            interval
            if interval is not None
            else (BAR_INTERVAL if self.mode == BAR else LINES_INTERVAL)
        )
        self._label = label
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._last: tuple[int, int] = (0, 0)
        self._bar_width = 0  # characters of the last bar drawn (to clear it)

    # -- what is shown --------------------------------------------------------------------------
    def _sample(self) -> tuple[int, int]:
        try:
            self._last = self._poll()
        except Exception:  # the load may be closing under us: keep the last reading
            pass
        return self._last

    def _since_start(self) -> float:
        return time.perf_counter() - self._started

    def _seconds(self) -> float:
        """Seconds of the load so far, or all of them once finish() said."""
        seconds = self._result[1] if self._result is not None else self._elapsed()
        return max(seconds, 1e-9)

    def _numbers(self, done: int, total: int) -> tuple[float, float, float | None]:
        """(fraction done, GB/s so far, seconds left or None)."""
        rate = done / self._seconds()
        fraction = min(done / total, 1.0) if total > 0 else 0.0
        eta = (total - done) / rate if rate > 0 and total >= done else None
        return fraction, rate / 1e9, eta

    def line(self, done: int, total: int) -> str:
        """The plain progress line for `done` of `total` bytes."""
        fraction, gbps, eta = self._numbers(done, total)
        return (
            f"{self._label}: {_size(done)} of {_size(total)} ({fraction:.0%}), "
            f"{gbps:.2f} GB/s, ETA {_eta(eta)}"
        )

    def final_line(self, done: int) -> str:
        """The plain line that ends a completed load (seconds and GB/s as LoadReport.summary
        writes them)."""
        seconds = self._seconds()
        return (
            f"{self._label}: {_size(done)} read in {seconds:.3f} s, {done / seconds / 1e9:.2f} GB/s"
        )

    def bar(self, done: int, total: int, width: int | None = None) -> str:
        """The one-line bar for `done` of `total` bytes, fitted to `width` columns."""
        fraction, gbps, eta = self._numbers(done, total)
        columns = width or shutil.get_terminal_size((80, 24)).columns
        tail = f" {fraction:4.0%} {_size(done)}/{_size(total)} {gbps:5.2f} GB/s ETA {_eta(eta)}"
        cells = max(10, min(40, columns - len(tail) - 3))
        filled = int(cells * fraction)
        return f"[{'#' * filled}{'.' * (cells - filled)}]{tail}"[: max(columns - 1, 20)]

    def _draw(self, final: bool = False) -> None:
        done, total = self._sample()
        if final and self._result is not None:
            done = self._result[0]
        if self.mode == BAR:
            text = self.bar(done, total)
            pad = " " * max(self._bar_width - len(text), 0)
            self._bar_width = len(text)
            self._stream.write("\r" + text + pad + ("\n" if final else ""))
        elif final:
            self._stream.write(self.final_line(done) + "\n")
        else:
            self._stream.write(self.line(done, total) + "\n")
        self._stream.flush()

    # -- the polling thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def finish(self, bytes_read: int, seconds: float) -> None:
        """The completed load read `bytes_read` in `seconds` (its report's figures): the last
        line or bar shows these, not the progress thread's own reading."""
        self._result = (bytes_read, seconds)

    def start(self) -> LoadProgress:
        """Start showing progress (returns self)."""
        self._started = time.perf_counter()
        if self.mode != NONE:
            self._thread = threading.Thread(target=self._run, name="blob2gpu-progress", daemon=True)
            self._thread.start()
        return self

    def stop(self, completed: bool = True) -> None:
        """Stop the thread; when the load `completed`, draw the last state (100%) once more,
        else end the bar's line so an error message starts on its own line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if completed:
                self._draw(final=True)
            elif self.mode == BAR and self._bar_width:
                self._stream.write("\n")
                self._stream.flush()

    def __enter__(self) -> LoadProgress:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop(completed=exc_type is None)
