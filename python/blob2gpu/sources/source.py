"""What a source is: where a checkpoint's bytes come from, behind one interface, and the registry
that picks the Source class of a URI by its scheme.

A Source is made per load (open_source). It resolves its URI to a ShardPlan (the shards, each
pinned to the version it found), reads the checkpoint's manifest and the shards' headers, names
itself for messages and reports, says what the node's cache keys a shard by, and reads the bytes:
  LocalSource (sources/local.py)         local files: the core reads the paths on its own threads
                                         (pread, no GIL), or maps them on the CPU.
  AzureSource (sources/azure/source.py)  Azure Blob Storage (az://, https://, path-style http://,
                                         abfss:// ...): a fed session, its ranged GETs written
                                         straight into the core's landings by a BlobFeeder.
  CachedSource (cache/source.py)         the node's NVMe cache around a source it can key: hits
                                         read by the core from local files, checked against the
                                         wrapped source's authority; the rest fetched by it and
                                         written through.
A new kind of storage is a Source subclass registered for its URI schemes (@register); callers
never ask which kind a source is.
"""

from __future__ import annotations

import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, cast
from urllib.parse import urlparse

from blob2gpu import _core
from blob2gpu.errors import Blob2GpuError, InvalidArgument, SourceUnavailable
from blob2gpu.sources.feeding import Feeder, FeedStats, Fetch
from blob2gpu.sources.plan import ShardPlan, ShardRef

if TYPE_CHECKING:
    from blob2gpu.cache.fill import CacheFill
    from blob2gpu.integrity.manifest import Manifest
    from blob2gpu.loading.prepare import PreparedLoad
    from blob2gpu.settings import ResolvedSettings

HEADER_PROBE_BYTES = 64 << 10  # first read of a header; a longer header costs one more read


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


class Tee(Protocol):
    """What gets a copy of each range a feeder lands (the cache's write-through)."""

    def offer(self, shard: int, offset: int, view: memoryview) -> None: ...


class Connections:
    """What a Loader keeps for its sources between loads (an account's HTTP connection pools:
    a later load skips connecting and the TLS handshakes), closed with the Loader."""

    def __init__(self) -> None:
        self._kept: dict[str, Closable] = {}
        self._lock = threading.Lock()
        self._closed = False

    def kept(self, key: str, make: Callable[[], C]) -> C:
        """What is kept under `key`, made by make() on first use; raises InvalidArgument once
        closed."""
        with self._lock:
            if self._closed:
                raise InvalidArgument("this Loader is closed")
            if key not in self._kept:
                self._kept[key] = make()
            return cast(C, self._kept[key])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            kept, self._kept = list(self._kept.values()), {}
        for each in kept:
            each.close()


class RangeReader(Protocol):
    """Reads byte ranges of a source's listed shards into memory the caller owns (a fan-out's
    part of the bytes, the cache fill), `parallel` reads at a time of piece_bytes() each."""

    @property
    def parallel(self) -> int:
        """How many reads are worth running at once."""
        ...

    def read_into(self, ref: ShardRef, offset: int, view: memoryview) -> None:
        """Fill `view` with bytes [offset, offset + len(view)) of shard `ref`, as listed."""
        ...

    def piece_bytes(self) -> int:
        """How many bytes one read should ask for now."""
        ...

    def stop(self) -> None:
        """Cancel the reads: waits end, reads in flight break (each ends as LoadCancelled)."""
        ...

    def stats(self, plan: ShardPlan) -> FeedStats:
        """What the reads of `plan`'s shards counted."""
        ...


class Source(ABC):
    """One checkpoint in one kind of storage (see the module). resolve() comes first; the
    methods that take a load (a PreparedLoad) run in the load sequence's order: begin() once
    its checks passed, start() (or ranges(), for a fan-out), finish() when it ends."""

    kind = "local"  # the report's `source`
    remote = False  # its bytes cross a network (a group fan-out reads them once per group)
    unverified = "none"  # what a load with neither manifest nor Content-MD5 checks

    def __init__(
        self,
        uri: str,
        settings: ResolvedSettings,
        credential: object = None,
        connections: Connections | None = None,
    ) -> None:
        """credential: for storage that needs one (else ignored); connections: what the
        Loader keeps between loads (None: connections of this source's own)."""
        self.uri = uri
        self.settings = settings
        self._credential = credential
        self._connections = connections
        self._headers: dict[ShardRef, _core.ParsedHeader] = {}

    # -- what the checkpoint is -------------------------------------------------------------------
    @abstractmethod
    def resolve(self) -> ShardPlan:
        """The checkpoint's shards in order. Raises SourceUnavailable and its kinds
        (BlobNotFound, AccessDenied, StorageUnavailable, ...), InvalidIndex, InvalidArgument."""

    @abstractmethod
    def read_manifest(self) -> Manifest | None:
        """The resolved checkpoint's blob2gpu.manifest.json, None when it has none; raises
        InvalidManifest."""

    @property
    @abstractmethod
    def display_uri(self) -> str:
        """The checkpoint as messages and reports name it (never a secret)."""

    @property
    def credential_source(self) -> str | None:
        """How the credential was chosen (never the credential), None without one."""
        return None

    def cache_identity(self, ref: ShardRef) -> dict[str, object] | None:
        """What the node's cache files shard `ref` by (account, container, blob, etag, size);
        None: this source's shards are not cached."""
        return None

    def refuse(self, unreadable: Mapping[str, str], what: str | None = None) -> Blob2GpuError:
        """The error for listed shards whose bytes the storage serves not now (path -> why)."""
        said = ", ".join(f"'{path}' ({why})" for path, why in unreadable.items())
        return SourceUnavailable((f"{what}: " if what else "") + f"{said} cannot be read")

    def refuse_unreadable(self, refs: Iterable[ShardRef], what: str | None = None) -> None:
        """Raise refuse() for those of `refs` the storage serves no bytes of now (an archived
        blob: ShardRef.archived says why), if any."""
        unreadable = {ref.path: ref.archived for ref in refs if ref.archived}
        if unreadable:
            raise self.refuse(unreadable, what)

    # -- reading it --------------------------------------------------------------------------------
    @abstractmethod
    def read_into(self, ref: ShardRef, offset: int, view: memoryview) -> None:
        """Fill `view` with bytes [offset, offset + len(view)) of shard `ref`, as listed; raises
        SourceUnavailable and its kinds, SourceReadError, BlobChanged."""

    def read_header(self, ref: ShardRef) -> _core.ParsedHeader:
        """The parsed header of shard `ref`, read once per source (selecting, then sizing a
        selection, may both need it): one small read, two for a header longer than
        HEADER_PROBE_BYTES (never one the core would refuse: the shard's bytes are input).
        Raises InvalidHeader and its kinds, and what read_into raises."""
        if ref not in self._headers:
            head = bytearray(min(HEADER_PROBE_BYTES, ref.size))
            if head:
                self.read_into(ref, 0, memoryview(head))
            if len(head) >= 8:
                need = 8 + struct.unpack("<Q", head[:8])[0]
                if len(head) < need <= min(ref.size, 8 + _core.MAX_HEADER_BYTES):
                    rest = bytearray(need - len(head))
                    self.read_into(ref, len(head), memoryview(rest))
                    head += rest
            self._headers[ref] = _core.parse_header(bytes(head), ref.size, ref.name)
        return self._headers[ref]

    @abstractmethod
    def ranges(
        self, load: PreparedLoad | None = None, stopping: threading.Event | None = None
    ) -> RangeReader:
        """A reader of the shards' byte ranges into caller memory: for a fan-out's part of
        `load` (paced as the load's own reads are), or the cache fill (None; `stopping` ends its
        waits and reads)."""

    def begin(self, load: PreparedLoad) -> None:
        """Decide how `load` reads its shards, before any memory is taken for them; raises
        (refuse()) for shards the storage serves no bytes of now (an archived blob)."""
        self.refuse_unreadable(load.plan.shards)

    @abstractmethod
    def start(self, load: PreparedLoad, pipeline: _core.LoadPipeline) -> Fetch:
        """Start the core session that reads `load`'s shards and what feeds it (not started:
        Fetch.start())."""

    def feed(
        self,
        load: PreparedLoad,
        session: _core.LoadSession,
        shards: list[int],
        tee: Tee | None = None,
    ) -> Feeder:
        """A feeder fetching shards `shards` (indices in load.plan) into the fed `session`,
        offering `tee` each range before it is committed (the cache's write-through). Only a
        source whose bytes Python hands the core has one."""
        raise NotImplementedError(f"a {self.kind} source reads its own files")

    def finish(self, load: PreparedLoad, complete: bool) -> CacheFill | None:
        """`load` ended (`complete`: every shard arrived) or will not start: release what
        begin() took. Returns the background work it left (the cache fill), if any."""
        return None

    def reopen(self) -> Source:
        """This checkpoint's source, with its credential, over connections of its own (for work
        that outlives the load's Loader)."""
        return type(self)(self.uri, self.settings, self._credential)

    def fetch_aux(self, dest: str | Path) -> list[Path]:
        """Download the files beside the shards (config, tokenizer) into `dest`; see
        AzureSource. Raises InvalidArgument for a source whose files are already local."""
        raise InvalidArgument(f"fetch_aux needs a Blob URI (az://, https://), not '{self.uri}'")

    def close(self) -> None:  # noqa: B027 (most sources hold nothing of their own)
        """Release the connections this source holds of its own."""


S = TypeVar("S", bound=type[Source])
_BY_SCHEME: dict[str, type[Source]] = {}


def register(*schemes: str) -> Callable[[S], S]:
    """Class decorator: the Source reads URIs of these schemes ('' and 'file': local paths)."""

    def add(cls: S) -> S:
        for scheme in schemes:
            _BY_SCHEME[scheme] = cls
        return cls

    return add


def source_class(uri: str) -> type[Source]:
    """The Source class of `uri`, by its scheme (a local path has none); raises InvalidArgument
    for a scheme no source reads (s3://, gs://, ...)."""
    scheme = urlparse(uri).scheme
    if scheme in _BY_SCHEME:
        return _BY_SCHEME[scheme]
    if len(scheme) > 1 and uri.startswith(f"{scheme}://"):
        raise InvalidArgument(
            f"'{scheme}://' is not a source blob2gpu reads",
            hint="give an Azure Blob URI (az://, https://, abfss://) or a local path",
        )
    return _BY_SCHEME[""]  # a path, a Windows drive letter, a name with a colon


def open_source(
    uri: str,
    settings: ResolvedSettings,
    credential: object = None,
    connections: Connections | None = None,
) -> Source:
    """The Source reading `uri` (see source_class), not yet resolved."""
    return source_class(uri)(uri, settings, credential, connections)
