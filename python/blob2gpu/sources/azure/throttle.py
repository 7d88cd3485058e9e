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

Processes on one node share one budget through the node's cache directory (NodeThrottle, a small
file next to the cache's locks): a decrease is published there, and every other load on the node
makes the same decrease when it next sends a request, and stays away as long as the server told
the throttled one to (Retry-After); a load that starts within NODE_RECENT_SECONDS of a published
decrease starts halved. Nothing is held in that file that a crashed process could
leak: it says when the node was last throttled and until when to wait.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

NODE_RECENT_SECONDS = 10.0  # a load starting this soon after a decrease on its node starts halved


@dataclass(frozen=True)
class ThrottleStats:
    """What the control did over a load (reported in the LoadReport)."""

    throttled: int  # throttled answers (429, 503) to ranged GETs
    decreases: int  # times concurrency was halved and ranges grown
    concurrency: int  # the concurrency limit it settled at
    range_bytes: int  # the range size it settled at
    min_concurrency: int  # the lowest concurrency limit it went down to
    node_decreases: int = 0  # of those, made because another load on the node was throttled


class ThrottleControl:
    """AIMD concurrency and range size for the ranged GETs of one load (see the module)."""

    def __init__(
        self,
        ceiling: int,
        range_bytes: int,
        max_range_bytes: int,
        node: NodeThrottle | None = None,
    ) -> None:
        """node: the budget shared with the other loads on this node, or None."""
        if ceiling < 1:
            raise ValueError(f"concurrency ceiling must be at least 1, not {ceiling}")
        if range_bytes < 1:
            raise ValueError(f"range size must be at least 1 byte, not {range_bytes}")
        self._lock = threading.Condition()
        self.ceiling = ceiling
        self.max_range_bytes = max(range_bytes, max_range_bytes)
        self._limit = ceiling
        self._range = range_bytes
        self._epoch = 0  # bumped at each decrease
        self._successes = 0  # answers since the limit last changed
        self._throttled = 0
        self._decreases = 0
        self._lowest = ceiling
        self._in_flight = 0  # requests between acquire() and release()
        self._node = node
        self._node_seen = node.generation() if node is not None else 0
        self._node_decreases = 0
        if node is not None and node.since_publish() < NODE_RECENT_SECONDS:
            self._node_decreases += 1  # the node is being throttled: start halved
            self._decrease()

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

    def acquire(self, stopping: threading.Event) -> bool:
        """Wait until one more request may be in flight (retries included: a range throttled
        waits its turn like a new one); False if `stopping` was set meanwhile."""
        with self._lock:
            while self._in_flight >= self._limit:
                if stopping.is_set():
                    return False
                self._lock.wait(0.05)
            self._in_flight += 1
            return True

    def release(self) -> None:
        """A request acquire() let through has its answer."""
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()

    def epoch(self) -> int:
        """Take before sending a request; hand it back with its answer. Makes the decrease
        another load on the node published since."""
        node = self._node.generation() if self._node is not None else 0
        with self._lock:
            if node > self._node_seen:
                self._node_seen = node
                self._node_decreases += 1
                self._decrease()
            return self._epoch

    def node_wait(self) -> float:
        """Seconds to stay away still because a load on this node was told to (0: none)."""
        return self._node.wait_left() if self._node is not None else 0.0

    def throttled(self, epoch: int, retry_after: float = 0.0) -> bool:
        """A request sent at `epoch` was throttled (the server asked for `retry_after` seconds
        away); returns whether this decreased the limits (the first throttled answer since the
        last decrease does), which is then published to the node."""
        with self._lock:
            self._throttled += 1
            if epoch != self._epoch:
                return False
            self._decrease()
        if self._node is not None:
            published = self._node.publish(retry_after)
            with self._lock:
                self._node_seen = max(self._node_seen, published)
        return True

    def _decrease(self) -> None:
        """Halve the concurrency, double the ranges (the caller holds the lock)."""
        self._epoch += 1
        self._decreases += 1
        self._successes = 0
        self._limit = max(1, self._limit // 2)
        self._lowest = min(self._lowest, self._limit)
        self._range = min(self.max_range_bytes, self._range * 2)

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
            self._lock.notify_all()
            return True

    def stats(self) -> ThrottleStats:
        with self._lock:
            return ThrottleStats(
                self._throttled,
                self._decreases,
                self._limit,
                self._range,
                self._lowest,
                self._node_decreases,
            )


class NodeThrottle:
    """The throttling state the loads of one node share: a 24-byte file (a generation, bumped
    at each published decrease, the unix time until which to stay away, and that of the last
    publication), read before each request and written under an exclusive flock."""

    FILE = "throttle.state"
    _FORMAT = "<qdd"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / self.FILE

    def _read(self) -> tuple[int, float, float]:
        try:
            data = self.path.read_bytes()
        except OSError:
            return 0, 0.0, 0.0
        if len(data) != struct.calcsize(self._FORMAT):
            return 0, 0.0, 0.0  # not written yet, or by something else: no state
        generation, until, stamp = struct.unpack(self._FORMAT, data)
        return int(generation), float(until), float(stamp)

    def since_publish(self) -> float:
        """Seconds since a load on this node last published a decrease (inf: never)."""
        stamp = self._read()[2]
        return time.time() - stamp if stamp else float("inf")

    def generation(self) -> int:
        """Decreases published on this node so far."""
        return self._read()[0]

    def wait_left(self) -> float:
        """Seconds until the node's loads may send again."""
        return max(0.0, self._read()[1] - time.time())

    def publish(self, retry_after: float) -> int:
        """Publish one decrease, and that the node stays away `retry_after` seconds from now;
        returns the new generation. A node state that cannot be written is no shared state:
        the load adapts alone (returns 0)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            generation, until, _ = self._read()
            generation += 1
            now = time.time()
            until = max(until, now + retry_after)
            data = struct.pack(self._FORMAT, generation, until, now)
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            return generation
        except OSError:
            return 0
        finally:
            os.close(fd)  # closing releases the flock
