"""How one Blob load uses the node's NVMe cache: which shards it reads from the cache (hits), which
it writes through as they stream from Blob, which it refuses because their blob is archived, and
what the fill after it fetches (the shards the write-through writer could not keep)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blob2gpu.cache.fill import CacheFill, FillShard, submit_fill
from blob2gpu.cache.nvme import CacheEntry, CacheWriter, NvmeCache
from blob2gpu.settings import ResolvedSettings
from blob2gpu.sources import ShardPlan, ShardRef


def cache_identity(location: Any, ref: ShardRef) -> tuple[str, dict[str, Any]]:
    """The cache key of a listed shard, and what its entry must say it holds."""
    identity = {
        "account": location.account,
        "container": location.container,
        "blob": ref.path,
        "etag": ref.etag,
        "size": ref.size,
    }
    return NvmeCache.key(location.account, location.container, ref.path, ref.etag), identity


def manifest_checks(manifest: Any, ref: ShardRef) -> tuple[Any, Any]:
    """What a cache entry of shard `ref` is checked against before it is published: the
    manifest's SHA-256 of the file and its (chunk_bytes, CRC32C list); (None, None) when the
    manifest does not list the shard or there is none."""
    listed = manifest.files.get(ref.name) if manifest is not None else None
    if listed is None:
        return None, None
    return listed.sha256, (manifest.chunk_bytes, listed.crc32c)


def cache_hits(cache: NvmeCache, location: Any, plan: ShardPlan) -> dict[int, CacheEntry]:
    """The shards of a Blob checkpoint already in the cache, complete and of the listed version
    (read locally instead of fetched). Takes no lock and writes nothing."""
    hits = {}
    for i, ref in enumerate(plan.shards):
        entry = cache.lookup(*cache_identity(location, ref))
        if entry is not None:
            hits[i] = entry
    return hits


def start_cache_writes(
    cache: NvmeCache,
    location: Any,
    plan: ShardPlan,
    manifest: Any,
    hits: dict[int, CacheEntry],
    write: bool = True,
    queue_bytes: int = 256 << 20,
) -> CacheWriter:
    """The writer that puts every shard not in `hits` into the cache as it streams from Blob.

    A shard another process on this node is writing (or wrote since `hits` was looked up) is
    waited for, then read from the cache (added to `hits`): the node downloads it once.
    write=False (a load that reads only some tensors, so never a whole shard) writes nothing.
    queue_bytes: the writer's queue (cache_write_queue_bytes).
    """
    writer = CacheWriter(cache, queue_bytes)
    if not write:
        return writer
    for i, ref in enumerate(plan.shards):
        if i in hits:
            continue
        key, identity = cache_identity(location, ref)
        try:
            lock = cache.lock(key)
        except OSError as e:  # out of inodes, read-only: this shard is just not cached
            writer.stats.skipped[ref.name] = f"cannot write to the cache: {e.strerror}"
            continue
        if not lock.try_acquire():
            lock.acquire()  # another process is writing this shard: wait, then read it
        entry = cache.lookup(key, identity)  # looked up again under the lock: written meanwhile?
        if entry is not None:
            lock.release()
            hits[i] = entry
            continue
        writer.begin(i, ref.name, key, identity, lock, *manifest_checks(manifest, ref))
    return writer


@dataclass
class CachePlan:
    """The cache's part in one load. Without a cache (local files, the setting off, an unusable
    directory, a fan-out load) every field is empty."""

    cache: NvmeCache | None = None
    hits: dict[int, CacheEntry] = field(default_factory=dict)  # shard index -> entry read instead
    writer: CacheWriter | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # shard -> why it will not be cached

    def paths(self, count: int) -> list[str] | None:
        """Per shard, the cache file the core reads instead of Blob ('' for a fetched shard)."""
        if self.cache is None:
            return None
        return [str(self.hits[i].data_path) if i in self.hits else "" for i in range(count)]

    def entry_of(self, index: int) -> CacheEntry | None:
        """The cache entry shard `index` is read from, or None when it is fetched."""
        return self.hits.get(index)

    def remove(self, entry: CacheEntry) -> None:
        """Delete a damaged entry, so the next load fetches that shard again."""
        assert self.cache is not None
        self.cache.remove(entry)


def open_cache(settings: ResolvedSettings, plan: ShardPlan) -> CachePlan:
    """The node's cache when the load may use it (local_nvme_cache_enabled), or an empty plan
    whose `skipped` says why the directory is unusable; the cache is a shortcut, never an error."""
    if not settings.local_nvme_cache_enabled:
        return CachePlan()
    try:
        return CachePlan(cache=NvmeCache(settings.cache_dir or None, settings.cache_max_bytes))
    except OSError as e:
        why = f"the cache directory is unusable: {e.strerror} ({e.filename})"
        return CachePlan(skipped={ref.name: why for ref in plan.shards})


def shards_to_fill(
    cache: NvmeCache, location: Any, plan: ShardPlan, manifest: Any
) -> list[FillShard]:
    """The shards of `plan` the cache lacks (no complete entry of the listed version), with what
    the fill checks them against (the manifest's checksums)."""
    missing = []
    for ref in plan.shards:
        key, identity = cache_identity(location, ref)
        if cache.lookup(key, identity) is not None:
            continue
        missing.append(FillShard(ref.name, key, identity, ref, *manifest_checks(manifest, ref)))
    return missing


class _FillReader:
    """A BlobRangeReader over a container client of the fill's own (the load's connections close
    with its Loader; the fill outlives it)."""

    def __init__(self, uri: str, settings: ResolvedSettings, credential: Any, stopping: Any):
        from blob2gpu.sources.azure.container import open_container
        from blob2gpu.sources.azure.range_reader import BlobRangeReader

        self._container = open_container(uri, settings, credential)
        self._container.retry.stopping = stopping  # retry waits end at exit too
        retry = self._container.retry
        self._reader = BlobRangeReader(self._container.client, self._container.location, retry)

    def read_into(self, ref: Any, offset: int, view: memoryview) -> None:
        self._reader.read_into(ref, offset, view)

    def interrupt(self) -> None:
        self._reader.interrupt()

    def close(self) -> None:
        self._container.close()


def start_fill(
    cache: NvmeCache,
    shards: list[FillShard],
    uri: str,
    settings: ResolvedSettings,
    credential: Any = None,
    on_shard: Callable[[str, str | None], None] | None = None,
) -> CacheFill:
    """Queue the fill of `shards` (from the Blob checkpoint `uri`, with `credential`) on the
    process's fill thread, at most settings.cache_fill_bytes_per_second; returns the job.
    on_shard(name, why_not): called as each shard is published (why_not None) or not."""

    def open_reader(stopping: threading.Event) -> _FillReader:
        return _FillReader(uri, settings, credential, stopping)

    job = CacheFill(cache, shards, open_reader, settings.cache_fill_bytes_per_second, on_shard)
    return submit_fill(job)
