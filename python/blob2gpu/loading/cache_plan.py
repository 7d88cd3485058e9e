"""How one Blob load uses the node's NVMe cache: which shards it reads from the cache (hits), which
it writes through as they stream from Blob, which it does not use the cache for at all (and why),
which it refuses because their blob is archived, and what the fill after it fetches (the shards
the write-through writer could not keep).

A hit is read by the core through the descriptor this process opened and checked (never through
a symlink, a regular file of the listed size: /proc/self/fd/N names exactly that file, so no name
can be swapped between the check and the read), and checked as it streams against Blob's
authority (cache/checks.py): the manifest's checksums per chunk, else the blob's Content-MD5 over
the whole blob, before any tensor of the shard is handed out. A shard with neither is read from
the cache only when no other user can write the directory; it is then checked against the
entry's record, which can only tell a damaged disk. A hit that fails its check is repaired within
the load (loading/cache_repair.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from blob2gpu.cache.checks import BlobChecks
from blob2gpu.cache.fill import CacheFill, FillShard, submit_fill
from blob2gpu.cache.nvme import CacheEntry, NvmeCache
from blob2gpu.cache.writer import CacheWriter
from blob2gpu.settings import ResolvedSettings
from blob2gpu.sources import ShardPlan, ShardRef

PROC_FD = "/proc/self/fd"  # how the core opens the very file a descriptor of this process holds

NO_AUTHORITY = (
    "nothing from Blob to check a cached copy by (no manifest entry, no Content-MD5) and other "
    "users can write the cache directory"
)
LETS_MISMATCHES_THROUGH = (
    "fail_if_checksum_mismatch is off: a damaged entry would be handed out, not fetched again"
)
NO_PROC_FD = f"no {PROC_FD} here, through which the core reads the entry this process checked"


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


def blob_checks(manifest: Any, ref: ShardRef, content_md5: bytes | None = None) -> BlobChecks:
    """What Blob says shard `ref`'s bytes are: the manifest's SHA-256 of the file and its
    (chunk_bytes, CRC32C list) when it lists the shard, else the blob's Content-MD5 (when it
    has one and the caller checks it)."""
    listed = manifest.files.get(ref.name) if manifest is not None else None
    if listed is None:
        return BlobChecks(content_md5=content_md5)
    crcs = (manifest.chunk_bytes, tuple(listed.crc32c))
    return BlobChecks(chunk_crc32c=crcs, sha256=listed.sha256)


@dataclass
class CacheHit:
    """A shard read from the cache: its entry, and the descriptor of the data file the core reads
    (opened here, checked to be a regular file of the listed size)."""

    entry: CacheEntry
    fd: int

    @property
    def path(self) -> str:
        """How the core opens this very file (not the entry's name, which may change)."""
        return f"{PROC_FD}/{self.fd}"

    def mappable(self) -> bool:
        """Whether the file may be mapped into tensors (the cpu target's mmap): only a file no
        other user can write, since a mapping shows later writes to it."""
        try:
            st = os.fstat(self.fd)
        except OSError:
            return False
        return st.st_uid in (os.geteuid(), 0) and not st.st_mode & 0o022


def open_hit(cache: NvmeCache, entry: CacheEntry) -> CacheHit | None:
    """The entry as a hit, or None (the entry removed) when its data cannot be opened as a
    regular file of its size."""
    try:
        return CacheHit(entry, cache.open_data(entry))
    except OSError:
        cache.remove(entry)
        return None


def cache_hits(
    cache: NvmeCache, location: Any, plan: ShardPlan, skip: set[int]
) -> dict[int, CacheHit]:
    """The shards of a Blob checkpoint (but those in `skip`) already in the cache, of the listed
    version, opened to be read locally instead of fetched. Takes no lock and writes nothing but
    the removal of entries that are not what they must be."""
    hits = {}
    for i, ref in enumerate(plan.shards):
        if i in skip:
            continue
        entry = cache.lookup(*cache_identity(location, ref))
        hit = open_hit(cache, entry) if entry is not None else None
        if hit is not None:
            hits[i] = hit
    return hits


def start_cache_writes(
    cache: NvmeCache,
    location: Any,
    plan: ShardPlan,
    checks: Sequence[BlobChecks],
    hits: dict[int, CacheHit],
    write: bool = True,
    queue_bytes: int = 256 << 20,
    skip: set[int] | None = None,
    refetch: set[int] | None = None,
) -> CacheWriter:
    """The writer that puts every shard not in `hits` (nor in `skip`) into the cache as it
    streams from Blob, each checked against its `checks` before it is published.

    A shard another process on this node is writing (or wrote since `hits` was looked up) is
    waited for, then read from the cache (added to `hits`): the node downloads it once; not so
    for a shard in `refetch` (its entry failed a check in this load: it is fetched whatever the
    directory holds, and its entry is replaced only once the fetch is published).
    write=False (a load that reads only some tensors, so never a whole shard) writes nothing.
    queue_bytes: the writer's queue (cache_write_queue_bytes).
    """
    writer = CacheWriter(cache, queue_bytes)
    if not write:
        return writer
    skip, refetch = skip or set(), refetch or set()
    for i, ref in enumerate(plan.shards):
        if i in hits or i in skip:
            continue
        key, identity = cache_identity(location, ref)
        try:
            lock = cache.lock(key)
        except OSError as e:  # out of inodes, read-only, a symlink planted: not cached
            writer.stats.skipped[ref.name] = f"cannot write to the cache: {e.strerror or e}"
            continue
        if not lock.try_acquire():
            lock.acquire()  # another process is writing this shard: wait, then read it
        if i not in refetch:
            entry = cache.lookup(key, identity)  # looked up again under the lock: written since?
            hit = open_hit(cache, entry) if entry is not None else None
            if hit is not None:
                lock.release()
                hits[i] = hit
                continue
        writer.begin(i, ref.name, key, identity, lock, checks[i])
    return writer


@dataclass
class CachePlan:
    """The cache's part in one load. Without a cache (local files, the setting off, an unusable
    directory, a fan-out load) every field is empty."""

    cache: NvmeCache | None = None
    hits: dict[int, CacheHit] = field(default_factory=dict)  # shard index -> read instead
    writer: CacheWriter | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # shard -> why it will not be cached
    bypassed: dict[str, str] = field(default_factory=dict)  # shard -> why not read nor written

    def paths(self, count: int) -> list[str] | None:
        """Per shard, the cache file the core reads instead of Blob ('' for a fetched shard)."""
        if self.cache is None:
            return None
        return [self.hits[i].path if i in self.hits else "" for i in range(count)]

    def mappable(self) -> bool:
        """Whether every hit may be mapped (see CacheHit.mappable)."""
        return all(hit.mappable() for hit in self.hits.values())

    def entry_of(self, index: int) -> CacheEntry | None:
        """The cache entry shard `index` is read from, or None when it is fetched."""
        hit = self.hits.get(index)
        return hit.entry if hit is not None else None

    def close(self) -> None:
        """Release the hits' descriptors, once the core has opened its own (the session is
        closed, or never started). Idempotent."""
        for hit in self.hits.values():
            if hit.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(hit.fd)
                hit.fd = -1


def open_cache(settings: ResolvedSettings, plan: ShardPlan) -> CachePlan:
    """The node's cache when the load may use it (local_nvme_cache_enabled), or an empty plan
    whose `skipped` says why the directory is unusable (a disk error: the cache is a shortcut).
    Raises ConfigError for a directory another user could write (its owner or mode)."""
    if not settings.local_nvme_cache_enabled:
        return CachePlan()
    try:
        return CachePlan(cache=NvmeCache(settings.cache_dir or None, settings.cache_max_bytes))
    except OSError as e:
        why = f"the cache directory is unusable: {e.strerror} ({e.filename})"
        return CachePlan(skipped={ref.name: why for ref in plan.shards})


def bypassed_shards(
    cache: NvmeCache,
    plan: ShardPlan,
    settings: ResolvedSettings,
    checked: Sequence[bool],
) -> dict[int, str]:
    """The shards this load does not use the cache for, neither reading nor writing them, and
    why: every shard when a damaged entry could not be replaced (mismatches let through) or the
    core could not read the checked file; those without an authority from Blob (`checked`
    False) when other users can write the directory."""
    if not settings.fail_if_checksum_mismatch:
        return dict.fromkeys(range(len(plan.shards)), LETS_MISMATCHES_THROUGH)
    if not os.path.isdir(PROC_FD):
        return dict.fromkeys(range(len(plan.shards)), NO_PROC_FD)
    if not cache.shared:
        return {}
    return {i: NO_AUTHORITY for i in range(len(plan.shards)) if not checked[i]}


def shards_to_fill(
    cache: NvmeCache,
    location: Any,
    plan: ShardPlan,
    manifest: Any,
    check_cached: bool = False,
) -> list[FillShard]:
    """The shards of `plan` the cache lacks (no entry of the listed version), with what the fill
    checks them against (the manifest's checksums, else the blob's Content-MD5). check_cached:
    every shard, the cached ones to be read and checked by the fill (`cache warm`)."""
    shards = []
    for ref in plan.shards:
        key, identity = cache_identity(location, ref)
        if not check_cached and cache.lookup(key, identity) is not None:
            continue
        checks = blob_checks(manifest, ref, ref.content_md5)
        shards.append(FillShard(ref.name, key, identity, ref, checks, check_cached))
    return shards


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
