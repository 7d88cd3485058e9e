"""ThrottleControl: how one load adapts to a storage account that sheds load (429, 503 ServerBusy)
without talking to the other loaders on that account.

Additive increase and multiplicative decrease on two knobs, with a slow start only where the
node has reason for one:
- concurrency (ranged GETs in flight): a load starts at the user's prefetch_concurrency, a
  ceiling never exceeded, unless its node's loads were throttled within NODE_MEMORY_SECONDS (the
  node's memory window, see below): the account was near its limit moments ago, so the load
  starts from one request in flight and slow-starts (one more per answer: it doubles each round
  of answers) up to the concurrency the node's last decrease came to, then adds one per round
  of answers. A node that has seen no throttling has no reason to start slowly (a slow start
  cost an unthrottled load 10-20% of its throughput); a fleet released at once meets an
  account's limit with every load at its ceiling, and the first burst of 503s sets each one
  back to one request in flight and tells its node. Once throttled, the load goes back to one
  request in flight (the ranges the throttled requests left come back one round at a time, not
  all at once when the wait is over), slow-starts up to half the limit it had, and from there
  adds one per round of answers (as many successes as the current limit) without throttling;
- range size: multiplied by RANGE_GROWTH on throttling by request rate (429, 503 ServerBusy
  "Operations per second ..."), up to the largest a landing takes (the staging slot size), from
  the user's chunk_bytes: the same bytes in fewer requests. Throttling by bytes (503 "Egress is
  over the account limit.") does not grow ranges: larger ranges ask for the same bytes in
  larger bursts. It is not shrunk again: a larger range costs nothing when the account is not
  throttling.
One burst of throttled answers is one decrease: a throttled answer to a request sent before the
last decrease says nothing new (the epoch each request carries tells), nor does a node partner's
decrease published within ACCOUNT_WINDOW_SECONDS of this load's last one (the same burst: every
load that was refused publishes it). How long to stay away
(Retry-After, backoff) is the RetryPolicy's; this only sets how much to send once back.

Once throttled, a load is also paced by rate (Pacer), not only by concurrency: even one request
in flight per load can offer an account several times its egress, and a load with many in flight
has them all refused when the account turns it away. Throttled by egress, a load's requests wait
for bytes-per-second tokens (a request costs the bytes it asks for); by request rate, for
requests-per-second tokens (one each). Additive increase and multiplicative decrease on that rate:
- the first throttle of a kind starts its pacer at PACE_DECREASE of what the account actually
  served the load over the ACCOUNT_WINDOW_SECONDS before the 503: a measured rate, not a
  setting. For egress, a load younger than that counts the time since its first request; for
  request rate, the whole window all the same. An account serves its burst allowance (a
  window's worth) at once to whoever asks first: counted over a young load's fraction of a
  second, it made a fleet's first request paces add up to several times the account's rate, and
  its next second's requests were refused again. A request pace set low costs a load little
  (held requests grow the ranges, and the same bytes come in fewer requests); a bytes pace set
  low costs it bytes, and a fan-out's ranks, idle while they broadcast, measured little;
- each later throttle of that kind cuts it by PACE_DECREASE again, once per burst (throttled
  answers within ACCOUNT_WINDOW_SECONDS of a cut are that burst's, as a node's are);
- each ACCOUNT_WINDOW_SECONDS without a cut raises it by PACE_STEP_REQUESTS requests' worth (the
  load's range's bytes, or requests), which is also the least pace: the same step for every load
  of a fleet, so loads cut at different rates converge on equal shares.
A request waits for its pace before it is sent (a stopped load stops waiting). While requests
wait for their pace, the concurrency is not raised (the pace holds the load back, and more in
flight would be more refused at the next throttle), and waiting for request-rate tokens grows
the ranges by RANGE_GROWTH (requests are what the account is short of). A load never throttled
is not paced, nor one throttled before anything was answered (it measured nothing: concurrency
alone then); a load whose node partner was throttled cuts the pace it has, but starts none from
that (it may have just started, or been waiting).

Processes on one node share one budget through the node's cache directory (cache_dir, or its
default, whether or not the cache is on; NodeThrottle, a small file in its locks/ named with the
format's version, so that two versions of blob2gpu on one node during a rolling upgrade keep apart
rather than misread each other's): a decrease is published there with the concurrency and range
size it came to, every other load on the node makes the same decrease when it next sends a request
(before it lets that request go; the file is read once per request, again only after a wait) and
stays away as long as the throttled one does (RetryPolicy.stay_away: Retry-After, or 0.5-1 s
without one), and a load that starts within NODE_MEMORY_SECONDS of a published decrease starts with
the published ranges and one request in flight, and slow-starts only up to the published
concurrency: the node already knows where the account throttles. Nothing is held in that file that
a crashed process could leak: it says when the node was last throttled, until when to wait, at what
concurrency and range size, and whether for egress or request rate (which pace the others cut).

Whoever can write that directory can write the file, so it is input, not state: read as one
bounded record of a regular file (never through a symlink, never more than a record's bytes, a
FIFO or device never waited on), and a record no loader could have written (a wait further ahead
than retry_throttled_seconds, a stamp in the future, a concurrency or range size outside the
settings' limits, a generation out of range, a NaN) is no state: ignored, and overwritten whole
by the next decrease. A forged wait thus holds a node's loads no longer than a real one could.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blob2gpu import _core
from blob2gpu.settings import BY_NAME
from blob2gpu.sources.feeding import ThrottleStats

# The node's memory window: a load starting this soon after a decrease published on its node
# starts where the node came to (one request, slow-starting); later, or never throttled, at its
# ceiling.
NODE_MEMORY_SECONDS = 30.0
# What a record of the node's state may hold (NodeThrottle): the settings' limits on
# prefetch_concurrency and the range size (chunk_bytes, staging_slot_bytes), and a wait of
# retry_throttled_seconds (its default; a load passes its own).
DEFAULT_MAX_WAIT_SECONDS = float(BY_NAME["retry_throttled_seconds"].default)
MAX_CONCURRENCY = int(BY_NAME["prefetch_concurrency"].maximum or 0)
MAX_RANGE_BYTES = int(
    max(BY_NAME["chunk_bytes"].maximum or 0, BY_NAME["staging_slot_bytes"].maximum or 0)
)
RANGE_GROWTH = 4  # throttled by request rate, a load's ranges grow this many times (to the slot)
# Pacing (see the module); constants, not settings: a user has nothing to know to set them.
# Accounts state and enforce their limits per second (Azure's scalability targets; the fault
# proxy's buckets hold a second's worth), so a second is the window a served rate is measured
# over, a burst of throttling lasts, an increase waits for, and a throttled request the server
# named no Retry-After for stays away (most of it: retry.py).
ACCOUNT_WINDOW_SECONDS = 1.0
# The cut per throttle. Not a half: a burst of throttling hits most loads of a fleet at once (the
# account refuses whoever asks while it is over), so the fleet's cuts add up; 0.7 left the
# benchmark's fleet near the cap (egress p95 at the bound), 0.5 under it (bench/README.md).
PACE_DECREASE = 0.7
# The additive increase per interval, in requests' worth (a load's range, or one request): one
# made the benchmark's fleet take ~10 s to grow back to the cap after the first cut.
PACE_STEP_REQUESTS = 2

EGRESS, REQUEST_RATE = 1, 2  # the kinds of throttling (NodeState.kind)


@dataclass(frozen=True)
class NodeState:
    """What the loads of one node published: see NodeThrottle."""

    generation: int = 0  # decreases published so far
    until: float = 0.0  # unix time until which the node's loads stay away
    stamp: float = 0.0  # unix time of the last publication (0: never)
    concurrency: int = 0  # the concurrency the last decrease came to
    range_bytes: int = 0  # and the range size
    kind: int = 0  # what the last decrease was for: EGRESS, REQUEST_RATE (0: not said)


class Pacer:
    """A rate in units (bytes, or requests) per second that a throttled load's requests keep to:
    a virtual clock, each request sent at the earliest when the ones before it have had their
    units' time (a bucket of one request: what a load did not use is not saved up for a burst).
    Cut multiplicatively, raised additively per interval without a cut (see the module). Not
    thread-safe: ThrottleControl holds its lock around every call."""

    def __init__(self, served: float, unit: float, now: float) -> None:
        """served: units per second the account served the load before its first throttle;
        unit: the units of one request (its range's bytes, or one request)."""
        # The raise per interval, and the least rate: PACE_STEP_REQUESTS requests' units. The
        # same for every load of a fleet (they share their settings), whatever each measured,
        # so loads cut at different rates converge on equal shares (as TCP's one segment per
        # round trip does) rather than keep their differences.
        self.step = PACE_STEP_REQUESTS * unit / ACCOUNT_WINDOW_SECONDS
        self.rate = served
        self._next = now  # when the next request may go
        self._raised = now  # the start of the interval being counted towards a raise
        self._cut = -math.inf  # when it was last cut
        self.cut(now)

    def cut(self, now: float) -> bool:
        """A throttle: PACE_DECREASE of the rate (never under one step); the next raise is an
        interval away. Within an interval of the last cut it is the same burst of throttling
        (this load's and its node's loads' 503s, the answers to what was sent before the cut
        took effect): no second cut (returns False)."""
        if now - self._cut < ACCOUNT_WINDOW_SECONDS:
            return False
        self.rate = max(self.step, self.rate * PACE_DECREASE)
        self._raised = self._cut = now
        return True

    def raise_for(self, now: float) -> None:
        """Add one step per whole interval since the last cut or raise."""
        intervals = int((now - self._raised) // ACCOUNT_WINDOW_SECONDS)
        if intervals > 0:
            self.rate += intervals * self.step
            self._raised += intervals * ACCOUNT_WINDOW_SECONDS

    def reserve(self, cost: float, now: float) -> float:
        """Book a request costing `cost` units; returns the seconds it waits before it is sent."""
        self.raise_for(now)
        start = max(now, self._next)
        self._next = start + cost / self.rate
        return start - now


class ThrottleControl:
    """AIMD (after a slow start only on a node throttled lately) of the concurrency and range
    size of one load's ranged GETs (see the module)."""

    def __init__(
        self,
        ceiling: int,
        range_bytes: int,
        max_range_bytes: int,
        node: NodeThrottle | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """node: the budget shared with the other loads on this node, or None; clock: seconds,
        for the pacing (tests script it)."""
        if ceiling < 1:
            raise ValueError(f"concurrency ceiling must be at least 1, not {ceiling}")
        if range_bytes < 1:
            raise ValueError(f"range size must be at least 1 byte, not {range_bytes}")
        self._lock = threading.Condition()
        self.ceiling = ceiling
        self.max_range_bytes = max(range_bytes, max_range_bytes)
        self._limit = ceiling  # no slow start unless the node says (below)
        self._threshold = ceiling  # the slow start (+1 per answer) runs up to this limit
        self._range = range_bytes
        self._epoch = 0  # bumped at each decrease
        self._successes = 0  # answers since the limit last changed
        self._throttled = 0
        self._decreases = 0
        self._in_flight = 0  # requests between acquire() and release()
        self._node = node
        self._clock = clock
        self._pacers: dict[int, Pacer] = {}  # by kind (EGRESS, REQUEST_RATE), once throttled
        self._served: deque[tuple[float, int]] = deque()  # (when, bytes) of recent answers
        self._first_sent: float | None = None
        self._pace_bound = False  # whether the last request waited for its pace
        state = node.state() if node is not None else NodeState()
        self._node_seen = state.generation
        self._node_stamp = state.stamp  # of the last publication this load knows of
        self._node_decreases = 0
        self._decreased_at = -math.inf  # unix time of this load's last decrease
        if state.stamp and time.time() - state.stamp < NODE_MEMORY_SECONDS:
            # The node's loads were throttled lately: start from one request, slow-start up to
            # the concurrency they came to, with their ranges.
            self._limit = 1
            self._threshold = max(1, min(ceiling, state.concurrency or ceiling // 2))
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

    def acquire(self, stopping: threading.Event, size: int = 0, follow: bool = True) -> bool:
        """Wait until one more request, for `size` bytes, may be in flight (retries included: a
        range throttled waits its turn like a new one) and, once the load is paced, until its
        pace lets it go; False if `stopping` was set meanwhile (then nothing is held). Makes the
        decrease another load on the node published since first (follow=False: the caller just
        did, with node_wait) and again after waiting: a request is not let through under a limit
        the node has already lowered."""
        if follow:
            self._follow_node()
        waited = False
        with self._lock:
            while self._in_flight >= self._limit:
                if stopping.is_set():
                    return False
                waited = True
                self._lock.wait(0.05)
            self._in_flight += 1
            wait = self._reserve(size)
        if wait > 0:
            if stopping.wait(wait):
                self.release()
                return False
            waited = True
        if waited:
            self._follow_node()
        return True

    def _reserve(self, size: int) -> float:
        """Book a request of `size` bytes with the load's pacers; the seconds it waits (the
        caller holds the lock)."""
        now = self._clock()
        if self._first_sent is None:
            self._first_sent = now
        wait = 0.0
        if (pacer := self._pacers.get(EGRESS)) is not None:
            wait = max(wait, pacer.reserve(max(1, size), now))
        if (pacer := self._pacers.get(REQUEST_RATE)) is not None:
            held = pacer.reserve(1, now)
            if held > 0:
                # Requests are what the account is short of: the next ones carry more bytes.
                self._range = min(self.max_range_bytes, self._range * RANGE_GROWTH)
            wait = max(wait, held)
        self._pace_bound = wait > 0
        return wait

    def _pace(self, kind: int) -> None:
        """A decrease for throttling of `kind`: cut its pacer, or start one from what the account
        served this load over the last ACCOUNT_WINDOW_SECONDS (nothing served: no pacer yet; the
        caller holds the lock)."""
        now = self._clock()
        if (pacer := self._pacers.get(kind)) is not None:
            pacer.cut(now)
            return
        self._forget_served(now)
        if not self._served or self._first_sent is None:
            return
        if kind == EGRESS:
            # Over the interval, or the time since the load's first request if it is younger.
            window = max(min(ACCOUNT_WINDOW_SECONDS, now - self._first_sent), 1e-3)
            served, unit = sum(n for _, n in self._served) / window, self._range
        else:
            # Over the whole interval, even for a younger load: see the module.
            served, unit = len(self._served) / ACCOUNT_WINDOW_SECONDS, 1
        self._pacers[kind] = Pacer(served, unit, now)

    def _forget_served(self, now: float) -> None:
        while self._served and self._served[0][0] <= now - ACCOUNT_WINDOW_SECONDS:
            self._served.popleft()

    def release(self) -> None:
        """A request acquire() let through has its answer."""
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()

    def epoch(self, follow: bool = True) -> int:
        """Take before sending a request; hand it back with its answer. Makes the decrease
        another load on the node published since (follow=False: acquire() just did)."""
        if follow:
            self._follow_node()
        with self._lock:
            return self._epoch

    def _follow_node(self) -> NodeState:
        """Make the decrease another load on the node published since this one last looked;
        returns the node's state (read once)."""
        if self._node is None:
            return NodeState()
        state = self._node.state()
        with self._lock:
            # Any other generation published later than what this load knows is news: a lower one
            # means the file was reset (it could not be read) and written again since. One not
            # later is a read that raced this load's own publication (another thread's), or no
            # state (0): nothing new.
            if state.generation != self._node_seen and state.stamp > self._node_stamp:
                self._node_seen, self._node_stamp = state.generation, state.stamp
                self._range = max(self._range, min(self.max_range_bytes, state.range_bytes))
                if abs(state.stamp - self._decreased_at) < ACCOUNT_WINDOW_SECONDS:
                    # Published in the burst this load has already decreased for (by a load that
                    # was refused with it, before it looked): the same burst, one decrease.
                    return state
                self._node_decreases += 1
                self._decrease(grow_range=False)
                if state.kind and (pacer := self._pacers.get(state.kind)) is not None:
                    # A pace this load has is cut with its node's; one it has not is not started
                    # from what it measured (it may just have started, or been waiting).
                    pacer.cut(self._clock())
        return state

    def node_wait(self) -> float:
        """Seconds to stay away still because a load on this node was told to (0: none); makes
        the decrease another load on the node published since (one read of its state)."""
        return max(0.0, self._follow_node().until - time.time())

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
            kind = REQUEST_RATE if by_rate else EGRESS
            self._pace(kind)
            if self._node is not None:
                # Published under the lock: another thread of this load that reads the node's
                # state meanwhile must not take this load's own decrease for a node partner's.
                published = self._node.publish(retry_after, self._threshold, self._range, kind)
                if published:
                    self._node_seen, self._node_stamp = published, time.time()
        return True

    def _decrease(self, grow_range: bool) -> None:
        """Halve the concurrency the load may grow back to quickly, go back to one request in
        flight (the requests the throttled ones left to retry then come back one round at a
        time, not all at once), and multiply the ranges by RANGE_GROWTH if `grow_range` (the
        caller holds the lock)."""
        self._epoch += 1
        self._decreased_at = time.time()
        self._decreases += 1
        self._successes = 0
        self._threshold = max(1, self._limit // 2)
        self._limit = 1
        self._lowest = 1
        if grow_range:
            self._range = min(self.max_range_bytes, self._range * RANGE_GROWTH)

    def answered(self, size: int = 0) -> bool:
        """A request was answered with `size` bytes; returns whether this raised the concurrency
        limit (in the slow start each answer does; after it, a round of answers as long as the
        limit)."""
        with self._lock:
            now = self._clock()
            self._served.append((now, size))
            self._forget_served(now)
            if self._limit >= self.ceiling or self._pace_bound:
                # The pace, not the concurrency, holds the requests back: more in flight would
                # only be more requests out (and refused) when the account next throttles.
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
                self._pace_rate(EGRESS),
                self._pace_rate(REQUEST_RATE),
            )

    def _pace_rate(self, kind: int) -> float | None:
        if (pacer := self._pacers.get(kind)) is None:
            return None
        pacer.raise_for(self._clock())
        return pacer.rate


class NodeThrottle:
    """The throttling state the loads of one node share: a 48-byte file (NodeState: a
    generation, bumped at each published decrease, the unix time until which to stay away, that
    of the last publication, the concurrency and range size that decrease came to, and what it
    was for), read before each request and written under an exclusive flock. What it reads is
    checked (see the module): a record that fails is no state."""

    # The format's version is in the name: a version of blob2gpu that writes another format (a
    # rolling upgrade sharing a hostPath cache_dir) uses another file rather than reset this one.
    FILE = "throttle.v2.state"
    _FORMAT = "<qddqqq"
    _SIZE = struct.calcsize(_FORMAT)
    # Generations are counted from 1, one per published decrease: a few per second at most, so
    # 2**48 is never reached, and one past it still packs.
    MAX_GENERATION = 1 << 48
    # Clocks of one node's processes are one clock; a publication stamped later than this ahead
    # of a reader's now was not written by a loader.
    CLOCK_SLACK_SECONDS = 5.0

    def __init__(
        self, directory: str | os.PathLike[str], max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS
    ) -> None:
        """max_wait_seconds: the longest a loader asks its node to stay away
        (retry_throttled_seconds). A record beyond it, or beyond the settings' limits on what a
        decrease can come to (MAX_CONCURRENCY, MAX_RANGE_BYTES), is no state."""
        self.path = Path(directory) / self.FILE
        self.max_wait_seconds = max_wait_seconds

    def state(self) -> NodeState:
        """What the node's loads published (all zero: nothing, or a record that cannot be read
        or that no loader could have written)."""
        return self._checked(self._read(self.path)) or NodeState()

    @classmethod
    def _read(cls, path: Path) -> bytes | None:
        """At most one record and a byte of the regular file at `path` (None: no such file, a
        symlink, a FIFO, a device, unreadable); never blocks on what it opens. Each request of a
        load reads it: the core does, in one call (one return of the GIL, not one per call)."""
        (read,) = _core.read_small_files([os.fsencode(path)], cls._SIZE, follow_symlinks=False)
        if read.error or not read.regular or read.over_limit:
            return None
        return read.data

    def _checked(self, data: bytes | None) -> NodeState | None:
        """The record `data` holds, or None when it is not one a loader could have written."""
        if data is None or len(data) != self._SIZE:
            return None  # not written yet, or by something else
        generation, until, stamp, concurrency, range_bytes, kind = struct.unpack(self._FORMAT, data)
        now = time.time()
        if not (
            0 < generation <= self.MAX_GENERATION
            and math.isfinite(until)
            and math.isfinite(stamp)
            and 0 < stamp <= now + self.CLOCK_SLACK_SECONDS
            and 0 <= until <= stamp + self.max_wait_seconds
            and 0 <= concurrency <= MAX_CONCURRENCY
            and 0 <= range_bytes <= MAX_RANGE_BYTES
            and kind in (0, EGRESS, REQUEST_RATE)
        ):
            return None
        return NodeState(generation, until, stamp, concurrency, range_bytes, kind)

    def publish(
        self, retry_after: float, concurrency: int = 0, range_bytes: int = 0, kind: int = 0
    ) -> int:
        """Publish one decrease (to `concurrency` and `range_bytes`, for throttling of `kind`:
        the node's other loads pace themselves for it too), and that the node stays away
        `retry_after` seconds from now (up to max_wait_seconds); returns the new generation. A
        record that is no state (see state()) is overwritten whole; a path that is no regular
        file of one link (a symlink, a FIFO, a hard link to another file) is replaced, never
        written through. A node state that cannot be written is no shared state: the load adapts
        alone (returns 0)."""
        fd = self._open_for_update()
        if fd is None:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            old = self._checked(os.pread(fd, self._SIZE + 1, 0)) or NodeState()
            now = time.time()
            wait = min(max(0.0, retry_after), self.max_wait_seconds)
            generation = old.generation + 1
            data = struct.pack(
                self._FORMAT,
                generation,
                min(max(old.until, now + wait), now + self.max_wait_seconds),
                now,
                max(0, min(concurrency, MAX_CONCURRENCY)),
                max(0, min(range_bytes, MAX_RANGE_BYTES)),
                kind,
            )
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            return generation
        except OSError:
            return 0
        finally:
            os.close(fd)  # closing releases the flock

    def _open_for_update(self) -> int | None:
        """A descriptor of the state file, a regular file with one link, opened for reading and
        writing without following a symlink or blocking; what else stands at its path is
        removed (a symlink itself, not what it points to) and a new file made in its place.
        None when that cannot be done."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd: int | None
        for _ in range(3):  # another load may replace the same path meanwhile
            try:
                fd = os.open(self.path, flags | os.O_CREAT, 0o644)
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno != errno.ELOOP:  # ELOOP: a symlink there; anything else: give up
                    return None
                fd = None
            if fd is not None:
                try:
                    info = os.fstat(fd)
                except OSError:
                    os.close(fd)
                    return None
                if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                    return fd
                os.close(fd)
            try:
                os.unlink(self.path)  # the link or special file itself, never its target
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue  # another load made it first: open that one
            except OSError:
                return None
            return fd
        return None
