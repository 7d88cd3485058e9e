"""Hands a shard held whole in memory to a fed load session, as a source's feeder would: tests
of the feed protocol use it where no storage is involved."""

from __future__ import annotations

from collections import deque

from blob2gpu import _core
from blob2gpu.errors import LoadCancelled
from blob2gpu.sources.feeding import RangeTask, feed_range


def feed_from_memory(session: _core.LoadSession, shard: int, data: memoryview, chunk: int) -> None:
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
