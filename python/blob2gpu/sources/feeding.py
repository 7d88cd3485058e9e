"""The protocol of a fed core session, in one place: what a feeder (Python) hands the core, in
which order. Each shard's first range starts at offset 0 and carries the header; once the core has
parsed the header, the shard's other ranges are the data this load needs (all of it, or a tensor
selection's). A header longer than the first range is finished first. sources.azure.feeder (Blob,
concurrent) and integrations.distributed (a fan-out's exchanged bytes) both follow it."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blob2gpu.errors import LoadCancelled


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


def ranges_after(session: Any, task: RangeTask, status: Any, chunk: int) -> list[RangeTask]:
    """What to fetch once `task` landed and the core answered `status` (a FeedStatus): the rest of
    a header longer than the first range, or, after a shard's first range, the data the load
    needs past it, in ranges of at most `chunk` bytes; nothing after a data range."""
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
    session: Any, task: RangeTask, fill: Callable[[memoryview], None], chunk: int
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


def feed_from_memory(session: Any, shard: int, data: memoryview, chunk: int) -> None:
    """Hand one shard held whole in host memory to the session, range by range in the protocol's
    order. Raises LoadCancelled when the session was cancelled, and what feed_range raises."""
    tasks = deque([RangeTask(shard, 0, min(chunk, len(data)), first=True)])
    while tasks:
        task = tasks.popleft()
        source = data[task.start : task.end]

        def fill(view: memoryview, source: memoryview = source) -> None:
            view[:] = source

        follow_ups = feed_range(session, task, fill, chunk)
        if follow_ups is None:
            raise LoadCancelled("the load was cancelled")
        tasks.extend(follow_ups)
