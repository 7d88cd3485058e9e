"""ThrottleControl: how one load adapts to a storage account that sheds load (429, 503 ServerBusy)
without talking to the other loaders on that account.

A slow start, then additive increase and multiplicative decrease, on two knobs:
- concurrency (ranged GETs in flight): a load starts at SLOW_START_CONCURRENCY (or, when its node's
  loads were throttled lately, at one, see below) and, while no answer is throttled, adds one per
  answer: it doubles each round of answers, up to the user's prefetch_concurrency, which is a
  ceiling, never exceeded. A fleet released at once thus opens with a few requests per load, not
  with every thread of every process. Once throttled, the load goes back to one request in
  flight (the ranges the throttled requests left come back one round at a time, not all at
  once when the wait is over), slow-starts up to half the limit it had, and from there adds one
  per round of answers (as many successes as the current limit) without throttling;
- range size: multiplied by RANGE_GROWTH on throttling by request rate (429, 503 ServerBusy
  "Operations per second ..."), up to the largest a landing takes (the staging slot size), from
  the user's chunk_bytes: the same bytes in fewer requests. Throttling by bytes (503 "Egress is
  over the account limit.") does not grow ranges: larger ranges ask for the same bytes in
  larger bursts. It is not shrunk again: a larger range costs nothing when the account is not
  throttling.
One burst of throttled answers is one decrease: a throttled answer to a request sent before the
last decrease says nothing new (the epoch each request carries tells). How long to stay away
(Retry-After, backoff) is the RetryPolicy's; this only sets how much to send once back.

Processes on one node share one budget through the node's cache directory (cache_dir, or its
default, whether or not the cache is on; NodeThrottle, a small file in its locks/): a decrease is
published there with the concurrency and range size it came to, every other load on the node
makes the same decrease when it next sends a request (before it lets that request go) and stays
away as long as the server told the throttled one to (Retry-After, or its first backoff), and a
load that starts within
NODE_MEMORY_SECONDS of a published decrease starts with the published ranges and one request in
flight, and slow-starts only up to the published concurrency: the node already knows where the
account throttles. Nothing is held in that file that a crashed process could leak: it says when
the node was last throttled, until when to wait, and at what concurrency and range size.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SLOW_START_CONCURRENCY = 2  # ranged GETs in flight a load opens with (the ceiling if lower)
NODE_MEMORY_SECONDS = 30.0  # a load starting this soon after a decrease on its node starts there
RANGE_GROWTH = 4  # throttled by request rate, a load's ranges grow this many times (to the slot)


@dataclass(frozen=True)
class ThrottleStats:
    """What the control did over a load (reported in the LoadReport)."""

    throttled: int  # throttled answers (429, 503) to ranged GETs
    decreases: int  # times concurrency was lowered (and, on request-rate throttling, ranges grown)
    concurrency: int  # the concurrency limit it settled at
    range_bytes: int  # the range size it settled at
    min_concurrency: int  # the lowest concurrency limit it went down to
    node_decreases: int = 0  # of those, made because another load on the node was throttled


@dataclass(frozen=True)
class NodeState:
    """What the loads of one node published: see NodeThrottle."""

    generation: int = 0  # decreases published so far
    until: float = 0.0  # unix time until which the node's loads stay away
    stamp: float = 0.0  # unix time of the last publication (0: never)
    concurrency: int = 0  # the concurrency the last decrease came to
    range_bytes: int = 0  # and the range size


class ThrottleControl:
    """Slow start, then AIMD, of the concurrency and range size of one load's ranged GETs (see
    the module)."""

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
        self._limit = min(ceiling, SLOW_START_CONCURRENCY)
        self._threshold = ceiling  # the slow start (+1 per answer) runs up to this limit
        self._range = range_bytes
        self._epoch = 0  # bumped at each decrease
        self._successes = 0  # answers since the limit last changed
        self._throttled = 0
        self._decreases = 0
        self._in_flight = 0  # requests between acquire() and release()
        self._node = node
        state = node.state() if node is not None else NodeState()
        self._node_seen = state.generation
        self._node_decreases = 0
        if state.stamp and time.time() - state.stamp < NODE_MEMORY_SECONDS:
            # The node's loads were throttled lately: start from one request, slow-start up to
            # the concurrency they came to, with their ranges.
            self._limit = 1
            self._threshold = max(1, min(ceiling, state.concurrency or ceiling))
            self._range = max(self._range, min(self.max_range_bytes, state.range_bytes))
        self._lowest = self._limit

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
        waits its turn like a new one); False if `stopping` was set meanwhile. Makes the
        decrease another load on the node published since first: a request is not let through
        under a limit the node has already lowered."""
        self._follow_node()
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
        self._follow_node()
        with self._lock:
            return self._epoch

    def _follow_node(self) -> None:
        """Make the decrease another load on the node published since this one last looked."""
        if self._node is None:
            return
        state = self._node.state()
        with self._lock:
            if state.generation > self._node_seen:
                self._node_seen = state.generation
                self._node_decreases += 1
                self._decrease(grow_range=False)
                self._range = max(self._range, min(self.max_range_bytes, state.range_bytes))

    def node_wait(self) -> float:
        """Seconds to stay away still because a load on this node was told to (0: none)."""
        return self._node.wait_left() if self._node is not None else 0.0

    def throttled(self, epoch: int, retry_after: float = 0.0, by_rate: bool = True) -> bool:
        """A request sent at `epoch` was throttled (the server asked for `retry_after` seconds
        away; by_rate: for the account's request rate, not its egress, so ranges grow); returns
        whether this decreased the limits (the first throttled answer since the last decrease
        does), which is then published to the node."""
        with self._lock:
            self._throttled += 1
            if epoch != self._epoch:
                return False
            self._decrease(grow_range=by_rate)
            if self._node is not None:
                # Published under the lock: another thread of this load that read the new
                # generation in between would take this load's own decrease for another load's.
                published = self._node.publish(retry_after, self._threshold, self._range)
                self._node_seen = max(self._node_seen, published)
        return True

    def _decrease(self, grow_range: bool) -> None:
        """Halve the concurrency the load may grow back to quickly, go back to one request in
        flight (the requests the throttled ones left to retry then come back one round at a
        time, not all at once), and double the ranges if `grow_range` (the caller holds the
        lock)."""
        self._epoch += 1
        self._decreases += 1
        self._successes = 0
        self._threshold = max(1, self._limit // 2)
        self._limit = 1
        self._lowest = 1
        if grow_range:
            self._range = min(self.max_range_bytes, self._range * RANGE_GROWTH)

    def answered(self) -> bool:
        """A request was answered; returns whether this raised the concurrency limit (in the
        slow start each answer does; after it, a round of answers as long as the limit)."""
        with self._lock:
            if self._limit >= self.ceiling:
                return False
            self._successes += 1
            if self._limit >= self._threshold and self._successes < self._limit:
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
    """The throttling state the loads of one node share: a 40-byte file (NodeState: a
    generation, bumped at each published decrease, the unix time until which to stay away, that
    of the last publication, and the concurrency and range size that decrease came to), read
    before each request and written under an exclusive flock."""

    FILE = "throttle.state"
    _FORMAT = "<qddqq"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / self.FILE

    def state(self) -> NodeState:
        """What the node's loads published (all zero: nothing, or a state that cannot be read)."""
        try:
            data = self.path.read_bytes()
        except OSError:
            return NodeState()
        if len(data) != struct.calcsize(self._FORMAT):
            return NodeState()  # not written yet, or by something else: no state
        generation, until, stamp, concurrency, range_bytes = struct.unpack(self._FORMAT, data)
        return NodeState(int(generation), float(until), float(stamp), concurrency, range_bytes)

    def wait_left(self) -> float:
        """Seconds until the node's loads may send again."""
        return max(0.0, self.state().until - time.time())

    def publish(self, retry_after: float, concurrency: int = 0, range_bytes: int = 0) -> int:
        """Publish one decrease (to `concurrency` and `range_bytes`), and that the node stays
        away `retry_after` seconds from now; returns the new generation. A node state that
        cannot be written is no shared state: the load adapts alone (returns 0)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            old = self.state()
            now = time.time()
            data = struct.pack(
                self._FORMAT,
                old.generation + 1,
                max(old.until, now + retry_after),
                now,
                concurrency,
                range_bytes,
            )
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            return old.generation + 1
        except OSError:
            return 0
        finally:
            os.close(fd)  # closing releases the flock
