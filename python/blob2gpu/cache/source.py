"""CachedSource: the node's NVMe cache around a source whose shards it can key (Azure Blob), the
cache's one home in a load. It decides which shards a load reads from the cache (hits), which it
writes through as they stream from the wrapped source, which it does not use the cache for (and
why), which it refuses because their blob is archived; it repairs a hit that fails its check
within the load, starts the fill after it, and warms the cache without a load (`cache warm`,
`cache verify --repair`).

A hit is read by the core through the descriptor this process opened and checked (never through
a symlink, a regular file of the listed size: /proc/self/fd/N names exactly that file, so no name
can be swapped between the check and the read), and checked as it streams against the wrapped
source's authority (cache/checks.py): the manifest's checksums per chunk, else the blob's
Content-MD5 over the whole blob, before any tensor of the shard is handed out. A shard with
neither is read from the cache only when no other user can write the directory; it is then
checked against the entry's record, which can only tell a damaged disk.

A hit that fails its check (or cannot be read, or whose header is no safetensors header) makes
the core fail its session with an error naming the shard. The load then keeps what that session
completed (the shards handed out, and those published but not yet taken), closes it, removes the
entry's data (its record stays, so `cache verify --repair` sees the entry until a fetch replaces
it), and starts a new session for the shards not handed out yet, the damaged one fetched from
the wrapped source and written through. Any number of entries are repaired so, one new session
each; the report's cache_repaired lists them. When the fetch fails too, the load's error names
the entry and `cache verify --repair`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import threading
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from blob2gpu import _core
from blob2gpu.cache.checks import BlobChecks
from blob2gpu.cache.directory import writable_by_others
from blob2gpu.cache.fill import CacheFill, FillShard, submit_fill, what_was_wrong
from blob2gpu.cache.nvme import CacheEntry, NvmeCache
from blob2gpu.cache.writer import CacheWriter
from blob2gpu.errors import (
    Blob2GpuError,
    ChecksumMismatch,
    InvalidArgument,
    InvalidHeader,
    SourceReadError,
    SourceUnavailable,
)
from blob2gpu.integrity.manifest import Manifest
from blob2gpu.settings import ResolvedSettings
from blob2gpu.sources.feeding import Arrived, Feeder, Fetch
from blob2gpu.sources.plan import ShardPlan, ShardRef
from blob2gpu.sources.source import RangeReader, Source, open_source

if TYPE_CHECKING:
    from blob2gpu.loading.prepare import PreparedLoad
    from blob2gpu.operations.report import LoadReport

log = logging.getLogger("blob2gpu")

PROC_FD = "/proc/self/fd"  # how the core opens the very file a descriptor of this process holds

NO_AUTHORITY = (
    "nothing from Blob to check a cached copy by (no manifest entry, no Content-MD5) and other "
    "users can write the cache directory"
)
LETS_MISMATCHES_THROUGH = (
    "fail_if_checksum_mismatch is off: a damaged entry would be handed out, not fetched again"
)
NO_PROC_FD = f"no {PROC_FD} here, through which the core reads the entry this process checked"

# How long a load waits for another process writing the same entry: the time that writer needs
# at a slow disk's or link's pace, and a floor for its start. Past it the writer is taken for
# hung (or hostile: anyone who can open the lock file can hold it) and the shard is fetched.
WRITER_FLOOR_SECONDS = 30.0
WRITER_SLOWEST_BYTES_PER_SECOND = 20e6

# What a damaged, malformed, unreadable or replaced entry makes the core raise for its shard.
REPAIRABLE = (ChecksumMismatch, InvalidHeader, SourceReadError, SourceUnavailable)


def with_node_cache(source: Source) -> Source:
    """`source` within the node's cache when its load may use it (local_nvme_cache_enabled) and
    it is a remote source, whose shards the cache keys (Source.cache_identity); else `source`."""
    if not source.settings.local_nvme_cache_enabled or not source.remote:
        return source
    return CachedSource(source)


def writer_wait_seconds(size: int) -> float:
    """How long to wait for another process writing an entry of `size` bytes."""
    return WRITER_FLOOR_SECONDS + size / WRITER_SLOWEST_BYTES_PER_SECOND


def blob_checks(
    manifest: Manifest | None, ref: ShardRef, content_md5: bytes | None = None
) -> BlobChecks:
    """What Blob says shard `ref`'s bytes are: the manifest's SHA-256 of the file and its
    (chunk_bytes, CRC32C list) when it lists the shard, else the blob's Content-MD5 (when it
    has one and the caller checks it)."""
    listed = manifest.files.get(ref.name) if manifest is not None else None
    if manifest is None or listed is None:
        return BlobChecks(content_md5=content_md5)
    return BlobChecks(
        chunk_crc32c=(manifest.chunk_bytes, tuple(listed.crc32c)), sha256=listed.sha256
    )


@dataclass
class CacheHit:
    """A shard read from the cache: its entry, and the data file the core reads (opened here,
    checked to be a regular file of the listed size)."""

    entry: CacheEntry
    fd: int
    mappable: bool  # may be mapped into tensors (the cpu target's mmap): see opened()

    @classmethod
    def opened(cls, entry: CacheEntry, file: _core.OpenedFile) -> CacheHit:
        """The hit of a data file the core opened. Only a file no other user can write is
        mappable, since a mapping shows later writes to it."""
        mappable = file.uid in (os.geteuid(), 0) and not writable_by_others(file.mode)
        return cls(entry, file.fd, mappable)

    @property
    def path(self) -> str:
        """How the core opens this very file (not the entry's name, which may change)."""
        return f"{PROC_FD}/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class CachedSource(Source):
    """The node's cache around `inner` (see the module): what the checkpoint is, and the bytes
    of the shards the cache lacks, come from `inner`."""

    def __init__(self, inner: Source) -> None:
        super().__init__(inner.uri, inner.settings)
        self.inner = inner
        self.kind, self.remote, self.unverified = inner.kind, inner.remote, inner.unverified
        self.cache: NvmeCache | None = None  # opened by begin(); None when unusable
        self.hits: dict[int, CacheHit] = {}  # of the session being started or read: read instead
        self._writer: CacheWriter | None = None  # that session's write-through
        self._listed: ShardPlan | None = None  # every shard of the load (a repair narrows it)
        self._repaired: dict[str, str] = {}  # shard -> key of its entry that failed its check
        self._served: set[str] = set()  # shards the load read from the cache, repairs included

    # -- what the wrapped source says -------------------------------------------------------------
    def resolve(self) -> ShardPlan:
        return self.inner.resolve()

    def read_manifest(self) -> Manifest | None:
        return self.inner.read_manifest()

    @property
    def display_uri(self) -> str:
        return self.inner.display_uri

    @property
    def credential_source(self) -> str | None:
        return self.inner.credential_source

    def cache_identity(self, ref: ShardRef) -> dict[str, object] | None:
        return self.inner.cache_identity(ref)

    def refuse(self, unreadable: Mapping[str, str], what: str | None = None) -> Blob2GpuError:
        return self.inner.refuse(unreadable, what)

    def read_into(self, ref: ShardRef, offset: int, view: memoryview) -> None:
        self.inner.read_into(ref, offset, view)

    def read_header(self, ref: ShardRef) -> _core.ParsedHeader:
        return self.inner.read_header(ref)

    def ranges(
        self, load: PreparedLoad | None = None, stopping: threading.Event | None = None
    ) -> RangeReader:
        return self.inner.ranges(load, stopping)

    def reopen(self) -> Source:
        return self.inner.reopen()

    def fetch_aux(self, dest: str | Path) -> list[Path]:
        return self.inner.fetch_aux(dest)

    def close(self) -> None:
        self.inner.close()

    # -- a load -----------------------------------------------------------------------------------
    def begin(self, load: PreparedLoad) -> None:
        """Look up the shards the cache already holds, refuse archived blobs it does not (before
        any memory, lock or cache file is taken), and start writing the others through. Shards
        no authority from Blob vouches for are left out of a directory other users can write
        (the report's cache_bypassed says why); an unusable directory (a disk error: the cache
        is a shortcut) leaves the load to the wrapped source (cache_skipped says why). Raises
        BlobArchived, and ConfigError for a directory another user could write."""
        settings, plan, report = load.settings, load.plan, load.report
        self._listed = self._listed or plan
        if self.cache is None:
            try:
                self.cache = NvmeCache(settings.cache_dir or None, settings.cache_max_bytes)
            except OSError as e:
                why = f"the cache directory is unusable: {e.strerror} ({e.filename})"
                log.warning("NVMe cache not used by this load: %s", why)
                report.cache_skipped.update(dict.fromkeys((r.name for r in plan.shards), why))
                return self.inner.begin(load)
        bypassed = self._bypassed(load)
        report.cache_bypassed.update({plan.shards[i].name: why for i, why in bypassed.items()})
        again = {i for i, ref in enumerate(plan.shards) if ref.name in self._repaired}
        self.hits = {}
        looked_up = {
            i: self._key(ref)
            for i, ref in enumerate(plan.shards)
            if i not in bypassed and i not in again
        }
        records = self.cache.read_records([key for key, _ in looked_up.values()])
        opened = self.cache.open_hits(
            {key: (identity, records[key]) for key, identity in looked_up.values()}
        )
        for i, (key, _) in looked_up.items():
            if key in opened:
                self.hits[i] = CacheHit.opened(*opened[key])
        self._served.update(plan.shards[i].name for i in self.hits)
        try:
            self.refuse_unreadable(r for i, r in enumerate(plan.shards) if i not in self.hits)
        except BaseException:
            self._release()
            raise
        self._writer = self._write_through(load, skip=set(bypassed), refetch=again)

    def start(self, load: PreparedLoad, pipeline: _core.LoadPipeline) -> Fetch:
        if self.cache is None:
            return self.inner.start(load, pipeline)
        return _RepairingFetch(self, load, pipeline, *self.open_session(load, pipeline))

    def finish(self, load: PreparedLoad, complete: bool) -> CacheFill | None:
        """Release the hits and stop the write-through, its counts in the report; after a
        whole load, queue the fetch of what the cache still lacks of it (the shards the
        write-through skipped) on the background fill (cache/fill.py)."""
        if self.cache is None:
            return self.inner.finish(load, complete)
        self.inner.finish(load, complete)  # what the source itself took (its range clients)
        wrote = self.end_session(load.report, done=None)
        fill = None
        if complete and wrote and load.settings.cache_fill and load.selection.everything:
            fill = self._fill(load)
        return fill

    # -- one core session -------------------------------------------------------------------------
    def open_session(
        self, load: PreparedLoad, pipeline: _core.LoadPipeline
    ) -> tuple[_core.LoadSession, Feeder]:
        count = len(load.plan.shards)
        session = load.start_fed(
            pipeline,
            paths=[self.hits[i].path if i in self.hits else "" for i in range(count)],
            checksums=self._checksums(load),
            direct_io=load.settings.cache_direct_io,
            # A mapping shows later writes to the file: only entries no other user can write.
            mmap=load.mmap and all(hit.mappable for hit in self.hits.values()),
        )
        fetched = [i for i in range(count) if i not in self.hits]
        return session, self.inner.feed(load, session, fetched, self._writer)

    def end_session(self, report: LoadReport | None, done: set[str] | None) -> bool:
        """Release the session's hits (their descriptors: the core opened its own) and stop its
        writer, whose counts go to `report` (of a replaced session, `done`: the skip reasons of
        the shards it completed only). Returns whether there was a writer."""
        writer = self._release()
        if writer is None:
            return False
        stats = writer.close()
        if report is not None:
            report.cache_written += stats.written
            report.cache_skipped.update(
                {n: why for n, why in stats.skipped.items() if done is None or n in done}
            )
        return True

    def _release(self) -> CacheWriter | None:
        for hit in self.hits.values():
            hit.close()
        writer, self._writer = self._writer, None
        return writer

    def _key(self, ref: ShardRef) -> tuple[str, dict[str, object]]:
        identity = self.inner.cache_identity(ref)
        assert identity is not None, "a remote source's shards have a cache identity"
        return NvmeCache.key_of(identity), identity

    def _has_authority(self, load: PreparedLoad, index: int) -> bool:
        """Whether shard `index`'s bytes are checked against something from Blob: the
        manifest's checksums, or the blob's Content-MD5."""
        checksums, md5 = load.checksums, load.content_md5
        return bool(
            (checksums is not None and checksums[index] is not None)
            or (md5 is not None and md5[index])
        )

    def _bypassed(self, load: PreparedLoad) -> dict[int, str]:
        """The shards this load does not use the cache for, neither reading nor writing them,
        and why: every shard when a damaged entry could not be replaced (mismatches let
        through) or the core could not read the checked file; those without an authority from
        Blob when other users can write the directory."""
        assert self.cache is not None
        count = len(load.plan.shards)
        if not load.settings.fail_if_checksum_mismatch:
            return dict.fromkeys(range(count), LETS_MISMATCHES_THROUGH)
        if not os.path.isdir(PROC_FD):
            return dict.fromkeys(range(count), NO_PROC_FD)
        if not self.cache.shared:
            return {}
        return {i: NO_AUTHORITY for i in range(count) if not self._has_authority(load, i)}

    def _checksums(self, load: PreparedLoad) -> list[_core.ChunkChecksums | None] | None:
        """The core's per-shard checksums, where a hit that Blob has nothing to check by (no
        manifest entry, no Content-MD5: only in a directory no other user can write) is checked
        against its entry's record, which tells a damaged disk. A hit with an authority is
        checked against it exactly as a fetched shard is: the record is never the reference."""
        if not self.hits:
            return load.checksums
        checksums = list(load.checksums or [None] * len(load.plan.shards))
        for i, hit in self.hits.items():
            record = hit.entry.record
            if not self._has_authority(load, i) and record is not None:
                checksums[i] = _core.ChunkChecksums(record.chunk_bytes, crc32c=list(record.crc32c))
        return checksums

    def _write_through(self, load: PreparedLoad, skip: set[int], refetch: set[int]) -> CacheWriter:
        """The writer that puts every shard not a hit (nor in `skip`) into the cache as it
        streams, each checked against the manifest before it is published (the core checks a
        Content-MD5 over the same bytes as they land; an entry published before a mismatch
        fails the load is repaired when a load reads it).

        A shard another process on this node is writing (or wrote since the lookup) is waited
        for, then read from the cache (a hit): the node downloads it once; not so for a shard
        in `refetch` (its entry failed a check in this load: fetched whatever the directory
        holds, its entry replaced only once the fetch is published). A load that reads only
        some tensors (never a whole shard) writes nothing."""
        cache = self.cache
        assert cache is not None
        writer = CacheWriter(cache, load.settings.cache_write_queue_bytes)
        if not load.selection.everything:
            return writer
        for i, ref in enumerate(load.plan.shards):
            if i in self.hits or i in skip:
                continue
            key, identity = self._key(ref)
            try:
                lock = cache.lock(key)
            except OSError as e:  # out of inodes, read-only, a symlink planted: not cached
                writer.stats.skipped[ref.name] = f"cannot write to the cache: {e.strerror or e}"
                continue
            # Another process is writing this shard: wait for it, then read it (the node
            # downloads it once), but only as long as a writer making progress would take.
            if not lock.try_acquire() and not lock.acquire(timeout=writer_wait_seconds(ref.size)):
                lock.release()
                writer.stats.skipped[ref.name] = (
                    f"another process held its cache entry's lock for over "
                    f"{writer_wait_seconds(ref.size):.0f} s: fetched from Blob, not cached"
                )
                continue
            # Looked up again under the lock (written meanwhile?): an entry not of the listed
            # version, or whose data is no regular file of its size, is removed.
            if i not in refetch and key in (hit := cache.open_hits({key: (identity, None)})):
                lock.release()
                self.hits[i] = CacheHit.opened(*hit[key])
                self._served.add(ref.name)
                continue
            writer.begin(i, ref.name, key, identity, lock, blob_checks(load.manifest, ref))
        return writer

    # -- repair -----------------------------------------------------------------------------------
    def damaged_hit(self, plan: ShardPlan, error: BaseException) -> int | None:
        """The index of the hit that `error` (the core's, naming its shard) condemns, or None
        when it concerns no hit of the session."""
        if not isinstance(error, REPAIRABLE) or error.shard is None:
            return None
        return next((i for i in self.hits if plan.shards[i].name == error.shard), None)

    def unrepaired(self, error: BaseException) -> BaseException:
        """`error`, naming the cache entry and how to repair it later when it stopped the fetch
        of a shard whose entry failed its check in this load."""
        if not self._repaired or not isinstance(error, Blob2GpuError) or self._listed is None:
            return error
        blobs = {ref.path: ref.name for ref in self._listed.shards}
        shard = error.shard or blobs.get(error.blob or "")
        if shard is None and len(self._repaired) == 1 and error.blob is None:
            shard = next(iter(self._repaired))  # not about another shard: about the fetch again
        if shard not in self._repaired:
            return error
        return unrepaired(error, shard, self._repaired[shard])

    # -- filling ----------------------------------------------------------------------------------
    def _fill(self, load: PreparedLoad) -> CacheFill | None:
        assert self.cache is not None and self._listed is not None
        report = load.report
        # Hits served (and not repaired) by this load are there: not looked up again.
        served = self._served - set(self._repaired)
        shards = [
            shard
            for shard in self.to_fill(self._listed, load.manifest, cached=served)
            if shard.name not in report.cache_bypassed
        ]
        if not shards:
            return None
        report.cache_fill_pending = [s.name for s in shards]

        def on_shard(name: str, why_not: str | None) -> None:
            if why_not is None:
                report.cache_filled.append(name)
            else:
                report.cache_fill_skipped[name] = why_not

        return start_fill(self.cache, shards, self.inner, load.settings, on_shard)

    def to_fill(
        self,
        plan: ShardPlan,
        manifest: Manifest | None,
        check_cached: bool = False,
        cached: Collection[str] = (),
    ) -> list[FillShard]:
        """The shards of `plan` the cache lacks (no entry of the listed version), with what the
        fill checks them against (the manifest's checksums, else the blob's Content-MD5).
        check_cached: every shard, the cached ones to be read and checked by the fill.
        cached: names of shards known to be in the cache (not looked up)."""
        assert self.cache is not None
        shards = []
        for ref in plan.shards:
            key, identity = self._key(ref)
            if not check_cached and (
                ref.name in cached or self.cache.lookup(key, identity) is not None
            ):
                continue
            checks = blob_checks(manifest, ref, ref.content_md5)
            shards.append(FillShard(ref.name, key, identity, ref, checks, check_cached))
        return shards


class _RepairingFetch(Fetch):
    """A fetch with cache hits: a hit that fails its check is fetched again within the load, in a
    new core session for the shards not yet handed out (see the module)."""

    def __init__(
        self,
        cache: CachedSource,
        load: PreparedLoad,
        pipeline: _core.LoadPipeline,
        session: _core.LoadSession,
        feeder: Feeder,
    ) -> None:
        super().__init__(session, load.plan, feeder)
        self._cache, self._load, self._pipeline = cache, load, pipeline
        self._held: deque[Arrived] = deque()  # published by a replaced session, not yet pulled
        self._done: set[str] = set()  # shards pulled (or held)
        self._bytes_before = 0  # bytes read by replaced sessions

    def next_shard(self, keep: bool = True) -> Arrived | None:
        arrived = self._held.popleft() if self._held else super().next_shard(keep)
        if arrived is not None:
            self._done.add(arrived[0].name)
        return arrived

    def recover(self, error: BaseException) -> bool:
        """When `error` condemns a hit: keep what the session completed, close it, remove the
        entry's data, and start the shards not yet handed out in a new session, that one
        fetched. Returns whether it did; raises the error of a repair that cannot start, naming
        the entry."""
        cache, plan, report = self._cache, self.plan, self._load.report
        index = cache.damaged_hit(plan, error)
        if index is None or cache.cache is None:
            return False
        assert isinstance(error, Blob2GpuError)
        hit, name = cache.hits[index], plan.shards[index].name
        taken = Fetch.take_ready(self)
        self._done.update(ref.name for ref, _ in taken)
        if self.feeder is not None:
            self.feeder.stop()
        stats = self.session.stats()
        self.session.close()
        self._bytes_before += stats.bytes_read
        report.carry_session(stats, self._done, {plan.shards[i].name for i in cache.hits})
        cache.end_session(report, self._done)
        cache.cache.remove_data(hit.entry)
        report.cache_repaired[name] = what_was_wrong(error)
        cache._repaired[name] = hit.entry.key
        log.warning(
            "blob2gpu: NVMe cache entry %s of shard '%s' failed its check (%s); fetching the "
            "shard again from Blob",
            hit.entry.key,
            name,
            report.cache_repaired[name],
        )
        rest = self._load.narrowed(tuple(r for r in plan.shards if r.name not in self._done))
        try:
            cache.begin(rest)
            try:
                session, feeder = cache.open_session(rest, self._pipeline)
            except BaseException:
                cache.end_session(None, None)
                raise
        except BaseException as e:
            raise unrepaired(e, name, hit.entry.key) from None
        self._load, self.plan, self.session, self.feeder = rest, rest.plan, session, feeder
        self._held.extend(taken)
        feeder.start()
        return True

    def typed(self, error: BaseException) -> BaseException:
        return self._cache.unrepaired(super().typed(error))

    def take_ready(self) -> list[Arrived]:
        held, self._held = list(self._held), deque()
        return held + super().take_ready()

    def progress(self) -> tuple[int, int]:
        done, total = super().progress()
        return self._bytes_before + done, self._bytes_before + total

    def finish(self, report: LoadReport, order: list[str]) -> None:
        super().finish(report, order)
        hits = {self.plan.shards[i].name for i in self._cache.hits}
        for shard in report.shards:
            shard.cache_hit = shard.cache_hit or shard.name in hits


def unrepaired(error: BaseException, shard: str, entry_key: str) -> BaseException:
    """`error`, raised where the shard whose cache entry `entry_key` failed its check could not be
    fetched again (storage unreachable, ...), saying so and how to repair the entry later."""
    if not isinstance(error, Blob2GpuError):
        return error
    hint = (
        f"shard '{shard}' was to be fetched again from Blob because its NVMe cache entry "
        f"{entry_key} failed its check (its data was removed); once storage is reachable, "
        "`blob2gpu cache verify --repair` (or the next load) fetches it again"
    )
    message = f"{error.message or error}; {hint}"
    changed = error.evolve(hint=hint)
    if isinstance(changed, ChecksumMismatch):
        changed.cache_entry = entry_key
    changed.message = message
    changed.args = (message,)
    return changed


# -- the fill and `cache warm` --------------------------------------------------------------------
def start_fill(
    cache: NvmeCache,
    shards: list[FillShard],
    source: Source,
    settings: ResolvedSettings,
    on_shard: Callable[[str, str | None], None] | None = None,
) -> CacheFill:
    """Queue the fill of `shards` (read from `source`'s checkpoint) on the process's fill
    thread, at most settings.cache_fill_bytes_per_second; returns the job. on_shard(name,
    why_not): called as each shard is published (why_not None) or not."""
    job = CacheFill(cache, shards, source, settings.cache_fill_bytes_per_second, on_shard)
    return submit_fill(job)


def warm_cache(
    cache: NvmeCache, uri: str, settings: ResolvedSettings, credential: object = None
) -> tuple[CacheFill, dict[str, str]]:
    """List the checkpoint `uri` and start filling `cache`: each shard's entry already there is
    read and checked (its result's `cached`, or `repaired` and fetched again), the others
    fetched (their listed versions, checked against the manifest under the `verify` policy, else
    the Content-MD5); returns the fill job, and the shards not warmed and why (nothing from Blob
    to check them by, in a directory other users can write). Raises InvalidArgument for a URI
    the cache does not keep (local files), what listing raises (BlobNotFound, AccessDenied,
    ManifestMissing, ...) and BlobArchived for an archived shard the cache does not hold."""
    from blob2gpu.loading.prepare import read_manifest, resolve_source

    source = open_source(uri, settings, credential)
    if not source.remote:
        raise InvalidArgument(
            f"cache warm fills the cache of a Blob checkpoint (az://, https://), not '{uri}': "
            "local files are read from where they are"
        )
    try:
        plan = resolve_source(source, settings)
        manifest = read_manifest(source, settings.verify, plan)
    finally:
        source.close()  # the fill reads through connections of its own
    warmed = CachedSource(source)
    warmed.cache = cache
    shards = warmed.to_fill(plan, manifest, check_cached=True)
    refused = {}
    if cache.shared:
        refused = {s.name: NO_AUTHORITY for s in shards if s.checks.authority is None}
        shards = [s for s in shards if s.name not in refused]
    uncached = (s.ref for s in shards if s.ref.archived and cache.lookup(s.key, s.identity) is None)
    source.refuse_unreadable(uncached, "warming the cache")
    return start_fill(cache, shards, source, settings), refused


def refetch_entry(
    cache: NvmeCache, entry: CacheEntry, settings: ResolvedSettings
) -> tuple[CacheFill | None, str | None]:
    """Remove a damaged entry and start fetching its blob again, the version it held (its
    etag), from the account the environment names (else the public endpoint of its account);
    returns the fill job, or None and why it cannot be fetched again."""
    record = entry.record
    cache.remove(entry)
    if record is None or not record.etag:
        return None, "its record does not say which blob version it holds"
    ref = ShardRef(posixpath.basename(record.blob), record.blob, record.size, record.etag)
    identity = record.identity()
    if NvmeCache.key_of(identity) != entry.key:
        # Its name is the hash of what it holds: a record that says otherwise was not written by
        # a load, and is no reason to send a request to whatever account it names.
        return None, "its record does not match its name (forged or damaged)"
    # The record is not a reference for the bytes: the fetch is pinned to the etag, and checked
    # against what it received.
    shard = FillShard(ref.name, entry.key, identity, ref)
    source = open_source(_entry_uri(record.account, record.container, record.blob), settings)
    return start_fill(cache, [shard], source, settings), None


def _entry_uri(account: str, container: str, blob: str) -> str:
    """The blob's URI: az:// when the environment's account is the entry's (its endpoint, an
    emulator's included, and credential come from there), else the account's public endpoint."""
    from blob2gpu.sources.azure.location import parse_blob_uri

    try:
        if parse_blob_uri(f"az://{container}/{blob}").account == account:
            return f"az://{container}/{blob}"
    except InvalidArgument:
        pass
    return f"https://{account}.blob.core.windows.net/{container}/{blob}"
