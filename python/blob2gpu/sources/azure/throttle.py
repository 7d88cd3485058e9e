"""ThrottleControl: how one load adapts to a storage account that sheds load (429, 503 ServerBusy)
without talking to the other loaders on that account.

Additive increase, multiplicative decrease, on two knobs:
- concurrency (ranged GETs in flight): halved on throttling, down to 1; raised by one after a
  round of answers (as many successes as the current limit) without throttling, up to the
  user's prefetch_concurrency, which is a ceiling, never exceeded;
- range size: doubled on throttling, up to the largest a landing takes (the staging slot size),
  from the user's chunk_bytes: the same bytes in fewer requests. It is not shrunk again: a
  larger range costs nothing when the account is not throttling.
One burst of throttled answers is one decrease: a throttled answer to a request sent before the
last decrease says nothing new (the epoch each request carries tells). How long to stay away
(Retry-After, backoff) is the RetryPolicy's; this only sets how much to send once back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class ThrottleStats:
    """What the control did over a load (reported in the LoadReport)."""

    throttled: int  # throttled answers (429, 503) to ranged GETs
    decreases: int  # times concurrency was halved and ranges grown
    concurrency: int  # the concurrency limit it settled at
    range_bytes: int  # the range size it settled at
    min_concurrency: int  # the lowest concurrency limit it went down to


class ThrottleControl:
    """AIMD concurrency and range size for the ranged GETs of one load (see the module)."""

    def __init__(self, ceiling: int, range_bytes: int, max_range_bytes: int) -> None:
        if ceiling < 1:
            raise ValueError(f"concurrency ceiling must be at least 1, not {ceiling}")
        if range_bytes < 1:
            raise ValueError(f"range size must be at least 1 byte, not {range_bytes}")
        self._lock = threading.Lock()
        self.ceiling = ceiling
        self.max_range_bytes = max(range_bytes, max_range_bytes)
        self._limit = ceiling
        self._range = range_bytes
        self._epoch = 0  # bumped at each decrease
        self._successes = 0  # answers since the limit last changed
        self._throttled = 0
        self._decreases = 0
        self._lowest = ceiling

    @property
    def concurrency(self) -> int:
        """Ranged GETs the load may have in flight now."""
        with self._lock:
            return self._limit

    @property
    def range_bytes(self) -> int:
        """Bytes a ranged GET should ask for now."""
        with self._lock:
            return self._range

    def epoch(self) -> int:
        """Take before sending a request; hand it back with its answer."""
        with self._lock:
            return self._epoch

    def throttled(self, epoch: int) -> bool:
        """A request sent at `epoch` was throttled; returns whether this decreased the limits
        (the first throttled answer since the last decrease does)."""
        with self._lock:
            self._throttled += 1
            if epoch != self._epoch:
                return False
            self._epoch += 1
            self._decreases += 1
            self._successes = 0
            self._limit = max(1, self._limit // 2)
            self._lowest = min(self._lowest, self._limit)
            self._range = min(self.max_range_bytes, self._range * 2)
            return True

    def answered(self) -> bool:
        """A request was answered; returns whether this raised the concurrency limit (after a
        round of answers as long as the limit)."""
        with self._lock:
            if self._limit >= self.ceiling:
                return False
            self._successes += 1
            if self._successes < self._limit:
                return False
            self._successes = 0
            self._limit += 1
            return True

    def stats(self) -> ThrottleStats:
        with self._lock:
            return ThrottleStats(
                self._throttled, self._decreases, self._limit, self._range, self._lowest
            )
