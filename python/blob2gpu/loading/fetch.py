"""StorageFetch: the FetchStrategy of an ordinary load. Every byte comes from storage: the core
reads local files (and NVMe cache hits) itself; a Blob checkpoint's ranges are fetched by a
BlobFeeder, written through to the node's cache as they land."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blob2gpu.errors import ConfigError
from blob2gpu.loading.memory_fit import streamed_device_cap
from blob2gpu.loading.prepare import PreparedLoad
from blob2gpu.loading.shard_sources import shard_sources
from blob2gpu.sources import ShardPlan


def start_fed_session(
    prepared: PreparedLoad, pipeline: Any, paths: list[str] | None = None, **options: Any
) -> Any:
    """Start a core session whose bytes a feeder (Python) hands in, for every shard of the
    prepared load; paths: per shard, the local file (a cache hit) the core reads instead;
    `options` are passed on (direct_io, mmap)."""
    plan = prepared.plan
    prepared.report.mark_session_start()
    return pipeline.start_fed(
        shard_sources(plan.shards, prepared.checksums, paths, prepared.content_md5),
        host_staging=prepared.request.host_staging,
        fail_on_checksum_mismatch=prepared.settings.fail_if_checksum_mismatch,
        wanted=prepared.wanted,
        device_cap=streamed_device_cap(prepared.request, pipeline),
        **options,
    )


def range_bytes(prepared: PreparedLoad, slot_bytes: int) -> int:
    """The size of one ranged GET: chunk_bytes, or a staging slot's size; never more than a slot
    when a range lands in one (a GPU load without host staging)."""
    chunk = prepared.settings.chunk_bytes or slot_bytes
    if prepared.request.device != "cpu" and not prepared.request.host_staging:
        chunk = min(chunk, slot_bytes)
    return chunk


def node_budget(prepared: PreparedLoad) -> Any:
    """The throttling budget this load shares with the other loads on its node (NodeThrottle):
    a file in the locks directory of the node's cache directory (cache_dir, or its default),
    whether or not this load uses the cache; a record asking for a longer wait than the load's
    retry_throttled_seconds is no state (it was not written by a loader). None when that
    directory cannot be made (a read-only home), there is no default (no home), or another user
    could write it (its owner or mode, as the cache checks them): the load then adapts alone."""
    from blob2gpu.cache.directory import LOCKS, CacheDirectory, default_cache_dir
    from blob2gpu.sources.azure.throttle import NodeThrottle

    cache = prepared.cache.cache
    locks = cache.locks_dir if cache is not None else None
    if locks is None:
        configured = prepared.settings.cache_dir
        try:
            directory = CacheDirectory(Path(configured) if configured else default_cache_dir())
        except (OSError, ConfigError):  # ConfigError: no home, or a directory others can write
            return None
        locks = directory.path(LOCKS)
        directory.close()
    return NodeThrottle(locks, max_wait_seconds=prepared.settings.retry_throttled_seconds)


class StorageFetch:
    """Fetch every byte of the prepared load from its storage (see the module docstring)."""

    uses_node_cache = True

    def __init__(self, slot_bytes: int) -> None:
        self._slot_bytes = slot_bytes  # the pipeline's staging slot size

    def shards_to_read(self, listed: ShardPlan, selected: ShardPlan) -> ShardPlan:
        return selected

    def start(self, prepared: PreparedLoad, pipeline: Any) -> tuple[Any, Any]:
        if not prepared.source.is_blob:
            prepared.report.mark_session_start()
            shards = prepared.plan.shards
            session = pipeline.start_local(
                shard_sources(shards, prepared.checksums, paths=[s.path for s in shards]),
                mmap=prepared.mmap,
                host_staging=prepared.request.host_staging,
                fail_on_checksum_mismatch=prepared.settings.fail_if_checksum_mismatch,
                wanted=prepared.wanted,
                device_cap=streamed_device_cap(prepared.request, pipeline),
            )
            return session, None
        return self._start_blob(prepared, pipeline)

    def _start_blob(self, prepared: PreparedLoad, pipeline: Any) -> tuple[Any, Any]:
        from blob2gpu.sources.azure.feeder import BlobFeeder

        plan, cache, container = prepared.plan, prepared.cache, prepared.source.container
        # A repaired cache entry starts the rest of the load anew: its first feeder stopped (and
        # was joined), so the container's stopping event is cleared for this one.
        container.retry.stopping.clear()
        session = start_fed_session(
            prepared,
            pipeline,
            paths=cache.paths(len(plan.shards)),
            direct_io=prepared.settings.cache_direct_io,
            # A mapping shows later writes to the file: only entries no other user can write.
            mmap=prepared.mmap and cache.mappable(),
        )
        chunk = range_bytes(prepared, self._slot_bytes)
        device, staging = prepared.request.device, prepared.request.host_staging
        # The first range carries the header; its data waits on the host (a staging slot's worth
        # per shard, every shard's header being read first) unless it can land at once: straight
        # into the cpu arena, host staging, or a streamed GPU load's memory, which its group may
        # not have yet. Keep it small there.
        streamed = streamed_device_cap(prepared.request, pipeline) > 0
        small_first = device == "cpu" or staging or streamed
        feeder = BlobFeeder(
            session,
            plan,
            container.client,
            container.retry,
            prepared.settings.prefetch_concurrency,
            chunk,
            fetch=[i for i in range(len(plan.shards)) if i not in cache.hits],
            cache_writer=cache.writer,
            first_range_bytes=min(chunk, 1 << 20) if small_first else None,
            max_range_bytes=max(chunk, self._slot_bytes),
            # The node's loads share one throttling budget, next to the cache's locks.
            node=node_budget(prepared),
        )
        return session, feeder
