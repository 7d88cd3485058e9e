"""BusyThread: one Python thread doing arithmetic until stopped, as any busy interpreter does (the
neighbour that the busy-process and native-range benches load beside), counting its own CPU so a
bench can take it out of the load's."""

from __future__ import annotations

import threading
import time


class BusyThread:
    """Spins while entered; cpu_s() is its CPU seconds so far (or in all, once stopped) and
    loops its iterations once stopped."""

    def __init__(self) -> None:
        self.stopping = False
        self.loops = 0
        self._spent: float | None = None  # its CPU seconds in all, once it ended
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        x = 0
        while not self.stopping:
            x += 1
        self.loops = x
        self._spent = time.thread_time()

    def cpu_s(self) -> float:
        if self._spent is not None:
            return self._spent
        assert self._thread.ident is not None
        return time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident))

    def __enter__(self) -> BusyThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping = True
        self._thread.join()
