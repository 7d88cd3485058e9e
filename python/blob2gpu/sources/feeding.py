"""A started load's bytes, in one place: the protocol of a fed core session (what a feeder hands
the core, in which order), what a feeder counts, and Fetch, the core session and its feeder as
the Checkpoint pulls shards from them.

Each shard's first range starts at offset 0 and carries the header; once the core has parsed the
header, the shard's other ranges are the data this load needs (all of it, or a tensor
selection's). A header longer than the first range is finished first. sources.azure.feeder
(Blob, concurrent) and integrations.distributed (a fan-out's exchanged bytes) both follow it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from blob2gpu import _core
from blob2gpu.errors import LoadCancelled
from blob2gpu.sources.plan import ShardPlan, ShardRef

if TYPE_CHECKING:
    from blob2gpu.operations.report import LoadReport

# A published shard of a fetch, with the ShardRef it is of.
Arrived = tuple[ShardRef, _core.PublishedShard]


@dataclass
class RangeTask:
    """Bytes [start, end) of shard number `shard` to fetch and hand to the core."""

    shard: int
    start: int
    end: int
    first: bool = False  # carries (part of) the header: schedules the shard's remaining ranges


def split_range(shard: int, start: int, end: int, chunk: int) -> list[RangeTask]:
    """[start, end) of a shard as ranges of at most `chunk` bytes."""
    return [RangeTask(shard, a, min(end, a + chunk)) for a in range(start, end, chunk)]


def ranges_after(
    session: _core.LoadSession, task: RangeTask, status: _core.FeedStatus, chunk: int
) -> list[RangeTask]:
    """What to fetch once `task` landed and the core answered `status`: the rest of a header
    longer than the first range, or, after a shard's first range, the data the load needs past
    it, in ranges of at most `chunk` bytes; nothing after a data range."""
    if not status.header_ready:
        return [RangeTask(task.shard, status.header_have, status.data_offset, first=True)]
    if not task.first:
        return []
    start = max(task.end, status.data_offset)
    follow_ups: list[RangeTask] = []
    for begin, end in session.needed_ranges(task.shard):
        if max(begin, start) < end:
            follow_ups += split_range(task.shard, max(begin, start), end, chunk)
    return follow_ups


def feed_range(
    session: _core.LoadSession, task: RangeTask, fill: Callable[[memoryview], None], chunk: int
) -> list[RangeTask] | None:
    """Land `task` in the session (fill() writes its bytes into the landing), commit it, and
    return the ranges that follow it; None when the session was cancelled (nothing landed).
    Raises what fill() or the core raise (the landing is released first)."""
    landing = session.acquire(task.shard, task.start, task.end - task.start)
    if landing is None:
        return None
    try:
        fill(landing.view)
    except BaseException:
        session.release(landing)
        raise
    return ranges_after(session, task, session.commit(landing), chunk)


@dataclass(frozen=True)
class ThrottleStats:
    """How a load's requests adapted to a throttling service (sources/azure/throttle.py)."""

    throttled: int  # throttled answers (429, 503) to ranged GETs
    decreases: int  # times concurrency was lowered (and, on request-rate throttling, ranges grown)
    concurrency: int  # the concurrency limit it settled at
    range_bytes: int  # the range size it settled at
    min_concurrency: int  # the lowest concurrency limit it went down to
    node_decreases: int = 0  # of those, made because another load on the node was throttled
    pace_bytes_per_second: float | None = None  # the egress pace it settled at (None: unpaced)
    pace_requests_per_second: float | None = None  # the request-rate pace (None: unpaced)


@dataclass(frozen=True)
class FeedStats:
    """What a feeder (or a range reader) counted over a load, for its report."""

    requests: int = 0  # attempts, answered or not
    retries: int = 0  # of every request of the load, listing included
    retry_wait_seconds: float = 0.0  # backoff slept before those retries, summed over threads
    shard_retries: Mapping[str, int] = field(default_factory=dict)  # by shard name
    throttle: ThrottleStats | None = None  # None: nothing throttles this source


class Feeder(Protocol):
    """What hands a fed core session its bytes, on threads of its own."""

    # The typed error that stopped it (the core only echoes it), or None.
    error: BaseException | None

    def start(self) -> object:
        """Start feeding."""
        ...

    def stop(self) -> None:
        """Stop feeding and wait for its threads."""
        ...

    def stats(self) -> FeedStats:
        """What it counted (read once it stopped)."""
        ...


class Fetch:
    """A started load: its core session (the shards of `plan`, in order) and, when Python hands
    the core its bytes, the feeder that does (None when the core reads files itself)."""

    def __init__(
        self, session: _core.LoadSession, plan: ShardPlan, feeder: Feeder | None = None
    ) -> None:
        self.session = session
        self.plan = plan
        self.feeder = feeder

    def start(self) -> Fetch:
        """Start the feeder, if any; returns self."""
        if self.feeder is not None:
            self.feeder.start()
        return self

    def next_shard(self, keep: bool = True) -> Arrived | None:
        """The next published shard, or None once every shard was (keep: the consumer keeps its
        tensors, which then no longer count against a streamed load's device memory). Raises
        the load's error: the feeder's typed one rather than the core's echo of it."""
        try:
            item = self.session.next_shard(keep)
        except BaseException as error:
            if self.recover(error):
                return self.next_shard(keep)
            typed = self.typed(error)
            if typed is error:
                raise
            raise typed from None
        return None if item is None else (self.plan.shards[item.index], item)

    def recover(self, error: BaseException) -> bool:
        """Whether the load goes on after `error` (the core's) in a new session; never, here."""
        return False

    def typed(self, error: BaseException) -> BaseException:
        """The error a load that failed with `error` (the core's) raises: the feeder's, unless
        it was only stopped by that failure."""
        fed = self.feeder.error if self.feeder is not None else None
        if fed is None or fed is error or isinstance(fed, LoadCancelled):
            return error
        return fed

    def take_ready(self) -> list[Arrived]:
        """The shards published but not yet pulled (for an error that carries them)."""
        return [(self.plan.shards[s.index], s) for s in self.session.take_ready()]

    def progress(self) -> tuple[int, int]:
        """(bytes read, bytes this fetch reads: a shard's header and selected tensors once its
        header was parsed, else its size)."""
        stats = self.session.stats()
        shards = zip(stats.shards, self.plan.shards, strict=True)
        total = sum(
            8 + s.header_bytes + s.needed_bytes if s.header_ns >= 0 else r.size for s, r in shards
        )
        return stats.bytes_read, total

    def finish(self, report: LoadReport, order: list[str]) -> None:
        """Once every shard was pulled: wait until the last copies landed, and put what the
        session and the feeder counted in `report` (`order`: the shards as it lists them)."""
        self.session.wait_landed()
        report.loaded(self.session.stats(), order)
        if self.feeder is not None:
            report.absorb_feed(self.feeder.stats())

    def close(self) -> None:
        """Stop the feeder and close the session (an unfinished load is cancelled)."""
        if self.feeder is not None:
            self.feeder.stop()
        self.session.close()
