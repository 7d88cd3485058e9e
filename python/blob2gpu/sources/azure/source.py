"""AzureSource: a checkpoint in Azure Blob Storage (az://, https://, path-style http://, and the
Data Lake forms abfss://, abfs://, wasbs://, wasb://: location.py), listed once with every shard
pinned to the etag seen then (listing.py). Its bytes are ranged GETs read straight into the core's
landings by a BlobFeeder (feeder.py); its headers, a fan-out's parts and the cache fill's ranges
by the same BlobRangeReader (range_reader.py), which has the core read each body without the GIL
(native_http, the default) or azure-storage-blob read it on the calling thread. The loads of one
node share one throttling budget (NodeThrottle, next to the cache's locks)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from blob2gpu import _core
from blob2gpu.cache.directory import LOCKS, CacheDirectory, default_cache_dir
from blob2gpu.errors import BlobArchived, ConfigError
from blob2gpu.integrity.manifest import Manifest
from blob2gpu.loading.host_memory import affinity_cpus
from blob2gpu.settings import ResolvedSettings
from blob2gpu.sources.azure.container import BlobContainer, HttpSessions, open_container
from blob2gpu.sources.azure.failures import archived_error
from blob2gpu.sources.azure.feeder import BlobFeeder, read_stats
from blob2gpu.sources.azure.listing import BlobListing
from blob2gpu.sources.azure.location import BLOB_SCHEMES
from blob2gpu.sources.azure.range_reader import BlobRangeReader
from blob2gpu.sources.azure.retry import RetryPolicy
from blob2gpu.sources.azure.throttle import NodeThrottle, ThrottleControl
from blob2gpu.sources.feeding import FeedStats, Fetch
from blob2gpu.sources.plan import ShardPlan, ShardRef
from blob2gpu.sources.source import Source, Tee, register

if TYPE_CHECKING:
    from blob2gpu.loading.prepare import PreparedLoad


@register(*BLOB_SCHEMES)
class AzureSource(Source):
    """A Blob checkpoint (see the module). credential: an azure credential object, an account
    key (dict) or a SAS, else the environment's (credentials.resolve_credential)."""

    kind = "azure-blob"
    remote = True
    unverified = "size+etag"

    _container: BlobContainer | None = None
    _listing: BlobListing | None = None
    _reader: BlobRangeReader | None = None  # headers' reads
    _ranges: tuple[BlobRangeReader, ...] = ()  # a fan-out's readers

    @property
    def container(self) -> BlobContainer:
        """The container's client, made on first use (credential chosen, connections taken
        from the Loader's when it keeps them). Raises InvalidArgument, MalformedCredential."""
        if self._container is None:
            kept = self._connections
            sessions = kept.kept("azure-http", HttpSessions) if kept is not None else None
            self._container = open_container(self.uri, self.settings, self._credential, sessions)
        return self._container

    def resolve(self) -> ShardPlan:
        self._listing = self.container.list_checkpoint()
        return self._listing.plan

    def read_manifest(self) -> Manifest | None:
        assert self._listing is not None, "resolve() first"
        return self.container.read_manifest(self._listing)

    @property
    def display_uri(self) -> str:
        return self.container.display_uri

    @property
    def credential_source(self) -> str | None:
        return self.container.credential_source

    def cache_identity(self, ref: ShardRef) -> dict[str, object] | None:
        location = self.container.location
        return {
            "account": location.account,
            "container": location.container,
            "blob": ref.path,
            "etag": ref.etag,
            "size": ref.size,
        }

    def refuse(self, unreadable: Mapping[str, str], what: str | None = None) -> BlobArchived:
        return archived_error(self.container.location, unreadable, what)

    def read_into(self, ref: ShardRef, offset: int, view: memoryview) -> None:
        if self._reader is None:
            self._reader = BlobRangeReader(self.container)
        self._reader.read_into(ref, offset, view)

    def ranges(
        self, load: PreparedLoad | None = None, stopping: threading.Event | None = None
    ) -> AzureRanges:
        c = self.container
        if stopping is not None:
            c.retry.stopping = stopping  # the retry policy's waits end with it too
        throttle = load_throttle(load) if load is not None else None  # as a load's feeder's
        reader = BlobRangeReader(c, None, throttle)
        self._ranges = (*self._ranges, reader)
        return AzureRanges(reader, c.retry, throttle)

    def start(self, load: PreparedLoad, pipeline: _core.LoadPipeline) -> Fetch:
        session = load.start_fed(pipeline)
        return Fetch(
            session, load.plan, self.feed(load, session, list(range(len(load.plan.shards))))
        )

    def feed(
        self,
        load: PreparedLoad,
        session: _core.LoadSession,
        shards: list[int],
        tee: Tee | None = None,
    ) -> BlobFeeder:
        c = self.container
        # A repaired cache entry starts the rest of the load anew: its first feeder stopped (and
        # was joined), so the retry policy's stopping event is cleared for this one.
        c.retry.stopping.clear()
        chunk = range_bytes(load)
        # The first range carries the header; its data waits on the host (a staging slot's worth
        # per shard, every shard's header being read first) unless it can land at once: straight
        # into the cpu arena, host staging, or a streamed GPU load's memory, which its group may
        # not have yet. Keep it small there.
        small_first = (
            load.request.device == "cpu" or load.request.host_staging or load.device_cap > 0
        )
        return BlobFeeder(
            session,
            load.plan,
            c,
            load_throttle(load),
            fetch=shards,
            first_range_bytes=min(chunk, 1 << 20) if small_first else chunk,
            cache_writer=tee,
            side_by_side=md5_side_by_side(load),
        )

    def fetch_aux(self, dest: str | Path) -> list[Path]:
        """Download the non-weight files beside the shards into `dest` (container.fetch_aux:
        each pinned to its listed etag, checked against the manifest, renamed into place)."""
        return self.container.fetch_aux(dest, self.settings.verify)

    def finish(self, load: PreparedLoad, complete: bool) -> None:
        """The load is over: its readers' range clients (their connections kept alive) go back
        to the Loader's for its next load (the feeder gives its own back as it stops)."""
        self._release_readers()

    def close(self) -> None:
        self._release_readers()
        if self._container is not None:
            self._container.close()

    def _release_readers(self) -> None:
        readers = [self._reader, *self._ranges] if self._reader is not None else self._ranges
        self._reader, self._ranges = None, ()
        for reader in readers:
            reader.close()


class AzureRanges:
    """Ranged GETs into caller memory (a fan-out's part of the bytes, the cache fill): a
    BlobRangeReader; with a load's ThrottleControl, as many in flight as it allows, in ranges of
    its size."""

    def __init__(
        self, reader: BlobRangeReader, retry: RetryPolicy, throttle: ThrottleControl | None = None
    ) -> None:
        self.reader, self.retry, self.throttle = reader, retry, throttle

    @property
    def parallel(self) -> int:
        return self.throttle.ceiling if self.throttle is not None else 1

    def piece_bytes(self) -> int:
        return self.throttle.range_bytes if self.throttle is not None else 1 << 62

    def read_into(self, ref: ShardRef, offset: int, view: memoryview) -> None:
        self.reader.read_into(ref, offset, view)

    def stop(self) -> None:
        self.reader.stop()

    def stats(self, plan: ShardPlan) -> FeedStats:
        return read_stats(self.reader, self.retry, self.throttle, plan)


def load_throttle(load: PreparedLoad) -> ThrottleControl:
    """How a load's ranged GETs are paced: up to prefetch_concurrency in flight, ranges of
    range_bytes that throttling may grow to a staging slot, in the budget the node's loads share
    (next to the cache's locks)."""
    chunk = range_bytes(load)
    ceiling, slot = load.settings.prefetch_concurrency, load.settings.staging_slot_bytes
    return ThrottleControl(ceiling, chunk, max(chunk, slot), node_budget(load.settings))


def md5_side_by_side(load: PreparedLoad) -> int:
    """How many shards a load checking Content-MD5 (one sequential hash per shard) fetches side
    by side: as many as it has threads and this process has CPUs, when its memory holds every
    shard at once anyway (not a streamed GPU load, whose bound holds one such shard, handed out
    whole, at a time); else 1, shard after shard."""
    if not load.content_md5 or load.device_cap > 0:
        return 1
    return max(1, min(load.settings.prefetch_concurrency, affinity_cpus()))


def range_bytes(load: PreparedLoad) -> int:
    """The size of one ranged GET: chunk_bytes, or a staging slot's size; never more than a slot
    when a range lands in one (a GPU load without host staging)."""
    slot = load.settings.staging_slot_bytes
    chunk = load.settings.chunk_bytes or slot
    if load.request.device != "cpu" and not load.request.host_staging:
        chunk = min(chunk, slot)
    return chunk


def node_budget(settings: ResolvedSettings) -> NodeThrottle | None:
    """The throttling budget a load shares with the other loads on its node (NodeThrottle): a
    file in the locks directory of the node's cache directory (cache_dir, or its default),
    whether or not the load uses the cache; a record asking for a longer wait than the load's
    retry_throttled_seconds is no state (it was not written by a loader). None when that
    directory cannot be made (a read-only home), there is no default (no home), or another user
    could write it (its owner or mode, as the cache checks them): the load then adapts alone."""
    configured = settings.cache_dir
    try:
        directory = CacheDirectory(Path(configured) if configured else default_cache_dir())
    except (OSError, ConfigError):  # ConfigError: no home, or a directory others can write
        return None
    locks = directory.path(LOCKS)
    directory.close()
    return NodeThrottle(locks, max_wait_seconds=settings.retry_throttled_seconds)
