"""How one Blob load uses the node's NVMe cache: which shards it reads from the cache (hits), which
it writes through as they stream from Blob, and which it refuses because their blob is archived."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
) -> CacheWriter:
    """The writer that puts every shard not in `hits` into the cache as it streams from Blob.

    A shard another process on this node is writing (or wrote since `hits` was looked up) is
    waited for, then read from the cache (added to `hits`): the node downloads it once.
    write=False (a load that reads only some tensors, so never a whole shard) writes nothing.
    """
    writer = CacheWriter(cache)
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
        listed = manifest.files.get(ref.name) if manifest is not None else None
        writer.begin(
            i,
            ref.name,
            key,
            identity,
            lock,
            listed.sha256 if listed else None,
            (manifest.chunk_bytes, listed.crc32c) if listed else None,
        )
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
