"""BlobFeeder: concurrent ranged GETs from Azure Blob Storage, written straight into the
pipeline's landings (a pinned staging slot, or the cpu arena itself): by the core's range reader
without the GIL (native_http, the default), or by the socket through azure-storage-blob.

Each shard's first range starts at offset 0 and carries the header and the first data, so there is
no separate header round trip; the shard's other ranges are scheduled once the core has parsed that
header. First ranges go ahead of data ranges: every shard's header is read (and its arena made) at
the start, so the load does not end with one late shard's header round trip while the other
connections sit idle. Each range is read by a BlobRangeReader: pinned to the etag seen at listing,
retried from the missing bytes on a transient failure (range_reader.py, retry.py).

Shards checked whole against their Content-MD5 (one sequential hash each, in the core, on the
thread that commits the range) are fed side by side when `side_by_side` > 1: data ranges are
taken from that many shards in turn, the one with the fewest ranges in flight first, so as many
hashes run at once instead of every thread waiting on one shard's.

When the account throttles, a ThrottleControl (throttle.py) lowers how many ranges are in flight
(the threads are the ceiling, prefetch_concurrency) and, on request-rate throttling only (not on
egress), grows the ranges: queued data ranges of a shard that follow one another are taken
together, up to the control's range size.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import TYPE_CHECKING

from blob2gpu import _core
from blob2gpu.errors import HeaderTruncated, LoadCancelled
from blob2gpu.redaction import redact
from blob2gpu.sources.azure.range_reader import BlobRangeReader
from blob2gpu.sources.azure.retry import RetryPolicy
from blob2gpu.sources.azure.throttle import ThrottleControl
from blob2gpu.sources.feeding import FeedStats, RangeTask, feed_range
from blob2gpu.sources.plan import ShardPlan

if TYPE_CHECKING:
    from blob2gpu.sources.azure.container import BlobContainer
    from blob2gpu.sources.source import Tee


def next_side_by_side(
    queued: Iterable[int], in_flight: Mapping[int, int], width: int
) -> int | None:
    """The shard whose next data range to fetch: of the first `width` shards with ranges queued
    (`queued`, in order), the one with the fewest ranges in flight (`in_flight`, by shard), the
    earliest of those tied; None when none is queued."""
    best, best_count = None, -1
    for shard in islice(queued, max(1, width)):
        count = in_flight.get(shard, 0)
        if best is None or count < best_count:
            best, best_count = shard, count
        if count == 0:
            break
    return best


class BlobFeeder:
    """Feeds one fed LoadSession from Blob Storage with `concurrency` threads."""

    def __init__(
        self,
        session: _core.LoadSession,
        plan: ShardPlan,
        container: BlobContainer,
        throttle: ThrottleControl,
        fetch: list[int],
        first_range_bytes: int,
        cache_writer: Tee | None = None,
        side_by_side: int = 1,
    ) -> None:
        """container: the load's (its retry policy retries the GETs); throttle: the load's
        pacing, whose ceiling is the number of threads; fetch: the shards to fetch (not cache
        hits); first_range_bytes: the size of each shard's first range (it carries the header);
        side_by_side: shards whose data ranges are fetched in turn (1: shard after shard, in
        order)."""
        self._session = session
        self._fetch = fetch
        self._cache_writer = cache_writer  # write-through to the NVMe cache, or None
        self._first = first_range_bytes
        self._plan = plan
        self._retry = retry = container.retry
        self._throttle = throttle
        self._reader = BlobRangeReader(container, retry.stopping, throttle)
        self._headers: deque[RangeTask] = deque()  # first ranges (and rests of long headers)
        # Data ranges by shard, each in order; shards in the order their headers were read.
        self._queue: dict[int, deque[RangeTask]] = {}
        self._cv = threading.Condition()
        self._active = 0
        self._side_by_side = max(1, side_by_side)
        self._in_flight: dict[int, int] = {}  # data ranges being fetched, by shard
        self._stopping = retry.stopping
        self._threads = [
            threading.Thread(target=self._worker, name=f"blob2gpu-feeder-{i}", daemon=True)
            for i in range(throttle.ceiling)
        ]
        self.error: BaseException | None = None

    # -- scheduling -------------------------------------------------------------------------------
    def start(self) -> BlobFeeder:
        for i in self._fetch:
            ref = self._plan.shards[i]
            if ref.size < 8:
                self._fail(
                    HeaderTruncated(
                        f"shard '{ref.name}': blob is {ref.size} bytes, shorter "
                        "than the 8-byte safetensors header length"
                    )
                )
                return self
            self._headers.append(RangeTask(i, 0, min(self._first, ref.size), first=True))
        if not self._fetch:  # every shard a cache hit: no thread started only to be ended
            self._threads = []
        for t in self._threads:
            t.start()
        return self

    def _next(self) -> RangeTask | None:
        with self._cv:
            while True:
                if self._stopping.is_set():
                    return None
                if (self._headers or self._queue) and self._active < self._throttle.concurrency:
                    self._active += 1
                    if self._headers:
                        return self._headers.popleft()
                    return self._take_data()
                if self._active == 0:
                    return None  # every range fetched
                self._cv.wait()

    def _take_data(self) -> RangeTask:
        """The next data range, joined with the queued ranges that continue it, up to the
        control's range size (the caller holds the lock)."""
        shard = next_side_by_side(self._queue, self._in_flight, self._side_by_side)
        assert shard is not None  # the caller saw a range queued
        ranges = self._queue[shard]
        task = ranges.popleft()
        limit = self._throttle.range_bytes
        while ranges:
            after = ranges[0]
            if after.start != task.end or after.end - task.start > limit:
                break
            ranges.popleft()
            task = RangeTask(task.shard, task.start, after.end)
        if not ranges:
            del self._queue[shard]
        self._in_flight[shard] = self._in_flight.get(shard, 0) + 1
        return task

    def _done(self, task: RangeTask, follow_ups: list[RangeTask]) -> None:
        with self._cv:
            if not task.first:
                self._in_flight[task.shard] -= 1
            # The rest of a long header goes first; data ranges queue behind the shards whose
            # headers were read before, so shards complete one after another, in order.
            self._headers.extendleft(reversed([t for t in follow_ups if t.first]))
            for t in follow_ups:
                if not t.first:
                    self._queue.setdefault(t.shard, deque()).append(t)
            self._active -= 1
            self._cv.notify_all()

    def _worker(self) -> None:
        while (task := self._next()) is not None:
            follow_ups: list[RangeTask] = []
            try:
                follow_ups = self._run(task)
            except BaseException as e:
                self._fail(e)
            finally:
                self._done(task, follow_ups)

    def _run(self, task: RangeTask) -> list[RangeTask]:
        ref = self._plan.shards[task.shard]

        def fill(view: memoryview) -> None:
            self._reader.read_into(ref, task.start, view)
            if self._cache_writer is not None:
                self._cache_writer.offer(task.shard, task.start, view)

        chunk = self._throttle.range_bytes
        return feed_range(self._session, task, fill, chunk) or []  # None: cancelled

    # -- ending -----------------------------------------------------------------------------------
    def _fail(self, error: BaseException) -> None:
        with self._cv:
            first = self.error is None
            # A thread stopped because another failed must not hide the failure that stopped it.
            if first or (
                isinstance(self.error, LoadCancelled) and not isinstance(error, LoadCancelled)
            ):
                self.error = error
            self._cv.notify_all()
        if first:
            self._stopping.set()
            message = redact(error)
            kind = "LoadCancelled" if isinstance(error, LoadCancelled) else "SourceReadError"
            try:
                self._session.abort(kind, message)
            except Exception:
                pass

    def stop(self) -> None:
        """Stop fetching: cancel waits, break open responses, and join the threads; the reader's
        connections kept alive go back for the next load."""
        if any(t.is_alive() for t in self._threads):
            self._session.cancel()  # wakes threads waiting for a staging slot
        self._stopping.set()
        with self._cv:
            self._cv.notify_all()
        self._reader.interrupt()
        for t in self._threads:
            if t.is_alive():
                t.join()
        self._reader.close()

    def stats(self) -> FeedStats:
        """GET attempts (answered or not), retries of the load's every request (listing
        included) and each shard's, the seconds slept backing off, and how it adapted to
        throttling."""
        return read_stats(self._reader, self._retry, self._throttle, self._plan)


def read_stats(
    reader: BlobRangeReader, retry: RetryPolicy, throttle: ThrottleControl | None, plan: ShardPlan
) -> FeedStats:
    """What `reader` did for `plan`'s shards, as FeedStats (see BlobFeeder.stats)."""
    return FeedStats(
        requests=reader.requests,
        retries=retry.retries,
        retry_wait_seconds=retry.waited_seconds,
        shard_retries={ref.name: reader.retries_of(ref.path) for ref in plan.shards},
        throttle=throttle.stats() if throttle is not None else None,
    )
