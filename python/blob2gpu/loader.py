"""Loader: keeps the staging ring, core threads and CUDA streams between loads, and turns a URI
into a running load: resolve the source, check the memory fit, start the core session and (for
Blob Storage) the feeder that fetches its ranges."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import _core
from .checkpoint import Checkpoint
from .errors import (
    BlobChanged,
    ChecksumMismatch,
    InsufficientGPUMemory,
    InsufficientHostMemory,
    InvalidArgument,
    ShardCountMismatch,
)
from .frameworks import converter
from .guardrails import check_memory_fit
from .manifest import core_checksums, read_local_manifest, require_manifest
from .report import LoadReport
from .selection import header_reader, select, selected_sizes, selection_from_arguments
from .settings import ResolvedSettings, resolve
from .sources import ShardPlan
from .sources import resolve as resolve_local
from .sources.azure_blob import is_blob_uri
from .sources.nvme_cache import CacheEntry, CacheWriter, NvmeCache

# Settings fixed when a target's pipeline is built; the others may change per load.
PIPELINE_SETTINGS = (
    "staging_slots",
    "staging_slot_bytes",
    "copy_streams",
    "io_threads",
    "use_pinned_host_fallback",
)
SOURCE_URI_ENV = "MODEL_SOURCE_URI"


def current_cuda_device() -> int:
    """The caller's current GPU, what device='cuda' means (as in torch): torch's current device
    when torch is imported and has initialized CUDA, else the device of the CUDA context current on
    this thread (CuPy, a framework, the driver API), else 0. Never raises."""
    import sys

    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        # Not asked of a torch that has not initialized CUDA: answering would initialize it (a
        # context, seconds) just to say 0, and torch.cuda.set_device() initializes it anyway.
        if cuda is not None and cuda.is_available() and cuda.is_initialized():
            return int(cuda.current_device())
    except Exception:  # a broken torch CUDA setup: fall back to the driver's notion
        pass
    current = _core.current_device()
    return current if current >= 0 else 0


def normalize_device(device: str) -> str:
    """'cpu', 'cuda' or 'cuda:N' -> the canonical form ('cuda' is the caller's current device,
    see current_cuda_device); raises InvalidArgument otherwise."""
    device = str(device).strip().lower()
    if device == "cpu":
        return device
    if device == "cuda":
        return f"cuda:{current_cuda_device()}"
    if device.startswith("cuda:") and device[5:].isdigit():
        return f"cuda:{int(device[5:])}"
    raise InvalidArgument(f"device '{device}' is not one of 'cpu', 'cuda', 'cuda:N'")


def chunk_algorithm(verify: str) -> str:
    """How manifest chunks are checked under the `verify` setting: sha256 or crc32c."""
    return "sha256" if verify == "sha256" else "crc32c"


def content_md5_to_check(
    container: Any, manifest: Any, verify: str, wanted: list[str] | None, plan: ShardPlan
) -> list[bytes | None] | None:
    """verify='auto' on a Blob checkpoint without a manifest: each blob's Content-MD5 (where it
    has one), for a load that reads whole blobs (no tensor selection); else None."""
    if container is None or manifest is not None or verify != "auto" or wanted is not None:
        return None
    if not any(s.content_md5 for s in plan.shards):
        return None
    return [s.content_md5 for s in plan.shards]


def verification_of(
    manifest: Any, algorithm: str, container: Any, content_md5: list[bytes | None] | None
) -> str:
    """What the load checks, as the report names it: crc32c / sha256 (every chunk against the
    manifest), content-md5 (every blob against its Content-MD5), size+etag (a Blob checkpoint
    with neither, or only some blobs with a Content-MD5: flagged), none."""
    if manifest is not None:
        return algorithm
    if container is None:
        return "none"
    if content_md5 and all(content_md5):
        return "content-md5"
    return "size+etag"


def source_uri(uri: str | None) -> str:
    """`uri`, or $MODEL_SOURCE_URI when it is None; raises InvalidArgument when both are missing."""
    if uri:
        return uri
    if os.environ.get(SOURCE_URI_ENV):
        return os.environ[SOURCE_URI_ENV]
    raise InvalidArgument(f"no checkpoint URI given and {SOURCE_URI_ENV} is not set")


def _cache_identity(location: Any, ref: Any) -> tuple[str, dict[str, Any]]:
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
        entry = cache.lookup(*_cache_identity(location, ref))
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
        key, identity = _cache_identity(location, ref)
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


class _PipelineMaker:
    """Makes one LoadPipeline on its own thread (the core releases the GIL while it does)."""

    def __init__(self, device: str, settings: dict[str, Any]) -> None:
        self.device = device
        self._pipeline: _core.LoadPipeline | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._make, args=(settings,), name=f"blob2gpu-pipeline-{device}", daemon=True
        )
        self._thread.start()

    def _make(self, settings: dict[str, Any]) -> None:
        try:
            self._pipeline = _core.LoadPipeline(self.device, **settings)
        except BaseException as e:  # handed to the load that waits for it
            self._error = e

    def result(self) -> _core.LoadPipeline:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._pipeline is not None
        return self._pipeline


class Loader:
    """A reusable loader. Settings given here apply to every load (see blob2gpu.settings);
    `config` names a YAML settings file (else $BLOB2GPU_CONFIG).

    Pinned staging and streams are allocated on the first load to each device and kept until
    close(), so later loads skip that cost. On that first load they are made on a thread while
    the checkpoint is listed, so CUDA's start-up overlaps the storage round trips. Connections
    to storage are kept too: a later load from the same account skips connecting (and the TLS
    handshakes).
    """

    def __init__(self, config: str | os.PathLike[str] | None = None, **settings: Any) -> None:
        self._settings: ResolvedSettings = resolve(settings, config_path=config)
        self._pipelines: dict[str, _core.LoadPipeline] = {}
        self._being_made: dict[str, _PipelineMaker] = {}
        self._pipelines_lock = threading.Lock()
        self._closed = False
        self._http: Any = None  # blob_client.HttpSessions, made by the first Blob load

    @property
    def settings(self) -> ResolvedSettings:
        return self._settings

    def _start_pipeline(self, device: str) -> None:
        """Begin making the device's pipeline (CUDA context, pinned staging ring, streams; io
        threads on cpu) on a thread, if it does not exist yet, so that it overlaps the storage
        round trips that come first (listing, index, manifest): on a cold GPU node CUDA's
        initialisation alone takes hundreds of milliseconds. _pipeline() waits for it."""
        with self._pipelines_lock:
            if self._closed or device in self._pipelines or device in self._being_made:
                return
            s = self._settings
            self._being_made[device] = _PipelineMaker(
                device, {name: s.values[name] for name in PIPELINE_SETTINGS}
            )

    def _http_sessions(self) -> Any:
        """The storage connections kept across this Loader's loads (closed by close())."""
        from .sources.blob_client import HttpSessions

        with self._pipelines_lock:
            if self._closed:
                raise InvalidArgument("this Loader is closed")
            if self._http is None:
                self._http = HttpSessions()
            return self._http

    def _pipeline(self, device: str) -> _core.LoadPipeline:
        """The device's pipeline, made by _start_pipeline; raises what making it raised."""
        self._start_pipeline(device)  # nothing when it exists or is being made
        with self._pipelines_lock:
            if self._closed:
                raise InvalidArgument("this Loader is closed")
            if device in self._pipelines:
                return self._pipelines[device]
            maker = self._being_made[device]
        try:
            pipeline = maker.result()
        finally:  # made or failed: the next load asks again
            with self._pipelines_lock:
                if self._being_made.get(device) is maker:
                    del self._being_made[device]
        with self._pipelines_lock:
            kept = None if self._closed else self._pipelines.setdefault(device, pipeline)
        if kept is not pipeline:  # closed meanwhile, or another load's was kept first
            pipeline.close()
        if kept is None:
            raise InvalidArgument("this Loader is closed")
        return kept

    def open(
        self,
        uri: str | None = None,
        device: str = "cpu",
        framework: str = "torch",
        credential: Any = None,
        tensor_names: Iterable[str] | None = None,
        tensor_filter: Callable[[str], bool] | None = None,
        _reuse: dict[tuple[str, str | None], dict[str, Any]] | None = None,
        **settings: Any,
    ) -> Checkpoint:
        """Start loading `uri` and return a Checkpoint at once (tensors arrive as it is iterated).

        uri: a local file, directory or index, or a Blob URI (az://, https://, path-style http://);
        None takes $MODEL_SOURCE_URI. credential: for Blob URIs, an azure credential, account key
        or SAS (else see sources.azure_blob.resolve_credential for the environment it reads).
        tensor_names / tensor_filter: load only these tensors, reading only their bytes (see
        blob2gpu.selection). Raises, before any weight is read: SourceUnavailable (BlobNotFound,
        AccessDenied, ...), InsufficientGPUMemory / InsufficientHostMemory, ShardCountMismatch,
        TensorNotFound (with an index), InvalidArgument, ConfigError. Errors of the load itself
        (InvalidHeader, GPUOutOfMemory, BlobChanged, StorageUnavailable, TensorNotFound without
        an index, ...) surface while iterating.
        """
        wanted_names, wanted_filter = selection_from_arguments(tensor_names, tensor_filter)
        uri = source_uri(uri)
        device = normalize_device(device)
        bad = [k for k in settings if k in PIPELINE_SETTINGS]
        if bad:
            raise InvalidArgument(f"{', '.join(bad)} must be given to Loader(...), not per load")
        effective = self._settings.with_overrides(settings)
        convert = converter(framework, device, effective.unsupported_dtype)
        started_at, clock_start = time.time(), time.perf_counter()
        self._start_pipeline(device)
        container = None
        if is_blob_uri(uri):
            from .sources.blob_client import open_container

            container = open_container(uri, effective, credential, self._http_sessions())
            listing = container.list_checkpoint()
            plan = listing.plan
        else:
            plan = resolve_local(uri)
        self._check_plan(plan, effective)
        checkpoint_dir = os.path.dirname(plan.shards[0].path) if container is None else None
        read_header = header_reader(container)
        plan, selection = select(plan, wanted_names, wanted_filter, read_header)
        wanted = None if selection.everything else sorted(selection.names)
        # A restart after BlobChanged keeps the complete shards whose blob is unchanged: only the
        # changed ones (and those not complete yet) are fetched again, from the new listing.
        preloaded = {}
        if _reuse:
            for ref in plan.shards:
                if (ref.path, ref.etag) in _reuse:
                    preloaded[ref] = _reuse[(ref.path, ref.etag)]
            plan = dataclasses.replace(
                plan, shards=tuple(s for s in plan.shards if s not in preloaded)
            )
        manifest = None
        if effective.verify != "none":
            if container is not None:
                manifest = container.read_manifest(listing)
            else:
                manifest = read_local_manifest(checkpoint_dir)
            require_manifest(manifest, effective.verify, f"'{plan.uri}'")
        algorithm = chunk_algorithm(effective.verify)
        checksums = core_checksums(manifest, plan.shards, algorithm)
        content_md5 = content_md5_to_check(container, manifest, effective.verify, wanted, plan)
        host_staging = device != "cpu" and not effective.direct_gpu_load
        pipeline = self._pipeline(device)
        try:
            gpu_memory = check_memory_fit(
                [s.size for s in plan.shards], device, pipeline, effective, host_staging
            )
        except (InsufficientGPUMemory, InsufficientHostMemory):
            if selection.everything:
                raise
            # The shards a selection touches do not fit whole: size the selection itself from
            # the headers (one small read per shard) before deciding.
            sizes = selected_sizes(
                plan, selection, read_header, manifest.chunk_bytes if manifest is not None else 0
            )
            gpu_memory = check_memory_fit(
                sizes, device, pipeline, effective, host_staging, what="the selected tensors"
            )
        report = LoadReport(
            uri=container.display_uri if container else plan.uri,
            device=device,
            framework=framework,
            started_at=started_at,
            settings=dict(effective.values),
            source="azure-blob" if container else "local",
            credential=container.credential_source if container else None,
            strategy="host-staging" if host_staging else "direct-gpu",
            verification=verification_of(manifest, algorithm, container, content_md5),
            tensor_selection=None if selection.everything else len(selection.names),
            reused_shards=[ref.name for ref in preloaded],
            _clock_start=clock_start,
        )
        report.phases["artifact_fetch_start"] = 0.0
        if gpu_memory is not None and effective.emit_gpu_memory_watermark:
            report.gpu_memory_free_before, report.gpu_memory_total = gpu_memory
        mmap = bool(effective.mmap_local_files and device == "cpu")
        feeder = cache = hits = writer = None
        if container is None:
            report._session_offset = time.perf_counter() - clock_start
            session = pipeline.start_local(
                [s.path for s in plan.shards],
                [s.name for s in plan.shards],
                mmap=mmap,
                host_staging=host_staging,
                checksums=checksums,
                fail_on_checksum_mismatch=effective.fail_if_checksum_mismatch,
                wanted=wanted,
            )
        else:
            from .sources.azure_blob import archived_error
            from .sources.blob_feeder import BlobFeeder

            slot_bytes = self._settings.staging_slot_bytes
            chunk = effective.chunk_bytes or slot_bytes
            if device != "cpu" and not host_staging:
                chunk = min(chunk, slot_bytes)  # a range lands in one staging slot
            paths = None
            if effective.local_nvme_cache_enabled:
                try:
                    cache = NvmeCache(effective.cache_dir or None, effective.cache_max_bytes)
                except OSError as e:  # the cache is a shortcut: without it, Blob serves all
                    why = f"the cache directory is unusable: {e.strerror} ({e.filename})"
                    report.cache_skipped = {ref.name: why for ref in plan.shards}
            count = len(plan.shards)
            hits = cache_hits(cache, container.location, plan) if cache is not None else {}
            archived = {
                ref.path: ref.archived
                for i, ref in enumerate(plan.shards)
                if ref.archived and i not in hits
            }
            if archived:  # refused before any memory, lock or cache file is taken
                raise archived_error(container.location, archived)
            if cache is not None:
                writer = start_cache_writes(
                    cache, container.location, plan, manifest, hits, write=wanted is None
                )
                paths = [str(hits[i].data_path) if i in hits else "" for i in range(count)]
                checksums = checksums or [None] * count
                for i, entry in hits.items():  # a hit is checked against what was written
                    if algorithm == "crc32c" or checksums[i] is None:
                        checksums[i] = (entry.size, entry.meta["chunk_bytes"], entry.meta["crc32c"])
            fetch = [i for i in range(count) if i not in hits]
            report._session_offset = time.perf_counter() - clock_start
            session = pipeline.start_fed(
                [s.name for s in plan.shards],
                [s.size for s in plan.shards],
                host_staging=host_staging,
                checksums=checksums,
                fail_on_checksum_mismatch=effective.fail_if_checksum_mismatch,
                paths=paths,
                wanted=wanted,
                content_md5=content_md5,
                direct_io=effective.cache_direct_io,
                mmap=mmap,
            )
            feeder = BlobFeeder(
                session,
                plan,
                container.client,
                container.retry,
                effective.prefetch_concurrency,
                chunk,
                fetch=fetch,
                cache_writer=writer,
                first_range_bytes=min(chunk, 1 << 20) if device == "cpu" or host_staging else None,
            )
        checkpoint = Checkpoint(
            session,
            plan,
            convert,
            report,
            settings=effective,
            pipeline=pipeline,
            feeder=feeder,
            cache=cache,
            cache_hits=hits,
            cache_writer=writer,
            selection=selection,
            preloaded=preloaded,
        )
        checkpoint._keep_completed = _reuse is not None
        if feeder is not None:
            feeder.start()
        return checkpoint

    @staticmethod
    def _check_plan(plan: ShardPlan, settings: ResolvedSettings) -> None:
        expected = settings.shard_count
        if expected and len(plan.shards) != expected:
            raise ShardCountMismatch(
                f"'{plan.uri}' has {len(plan.shards)} shard(s) but model.shard_count is "
                f"{expected} (source {settings.sources['shard_count']}); fix the URI or the "
                "setting"
            )

    def load(
        self,
        uri: str | None = None,
        device: str = "cpu",
        framework: str = "torch",
        credential: Any = None,
        tensor_names: Iterable[str] | None = None,
        tensor_filter: Callable[[str], bool] | None = None,
        **settings: Any,
    ) -> dict[str, Any]:
        """Load every tensor of `uri` onto `device`; returns {name: tensor}.

        Returns once every byte has landed. Raises the load's typed error (see blob2gpu.errors)
        after releasing everything the load allocated. With on_blob_change='restart', a blob
        overwritten during the load makes it list again and start over (at most 3 times).
        """
        restart = self._settings.with_overrides(settings).on_blob_change == "restart"
        restarts_left = 3 if restart else 0
        cache_retried = False
        reuse: dict[tuple[str, str | None], dict[str, Any]] = {}
        while True:
            try:
                with self.open(
                    uri,
                    device=device,
                    framework=framework,
                    credential=credential,
                    tensor_names=tensor_names,
                    tensor_filter=tensor_filter,
                    _reuse=reuse if restart else None,
                    **settings,
                ) as checkpoint:
                    return checkpoint.to_dict()
            except BlobChanged as error:
                completed = getattr(error, "completed_shards", None) or {}
                error.completed_shards = {}  # the caller's traceback must not pin them
                if restarts_left == 0:
                    raise
                restarts_left -= 1
                reuse.update(completed)
            except ChecksumMismatch as error:
                # A corrupted NVMe cache entry was removed: load again, that shard from Blob.
                if not getattr(error, "cache_entry_removed", False) or cache_retried:
                    raise
                cache_retried = True

    def close(self) -> None:
        """Release the staging ring, threads, streams and storage connections. Tensors already
        loaded stay valid."""
        with self._pipelines_lock:
            self._closed = True
            pipelines, self._pipelines = self._pipelines, {}
            makers, self._being_made = self._being_made, {}
        for maker in makers.values():
            try:
                pipelines[maker.device] = maker.result()
            except Exception:
                pass  # never used: its error belongs to no load
        for pipeline in pipelines.values():
            pipeline.close()
        with self._pipelines_lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
