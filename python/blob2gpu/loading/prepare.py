"""The one load sequence: a LoadRequest becomes a PreparedLoad.

Every way of loading (Loader.open, the torch.distributed fan-out, a serving engine's loader) goes
through prepare_load, so every load runs the same checks in the same order: resolve the source,
check the shard count, apply the tensor selection, keep what a restart may reuse, apply the
manifest policy, check that the weights fit, refuse archived blobs, plan the NVMe cache. Callers
differ only in the FetchStrategy: who fetches which bytes.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from blob2gpu import _core
from blob2gpu.errors import InsufficientGPUMemory, InsufficientHostMemory, ShardCountMismatch
from blob2gpu.integrity.manifest import (
    Manifest,
    core_checksums,
    read_local_manifest,
    require_manifest,
)
from blob2gpu.loading.cache_plan import (
    CachePlan,
    blob_checks,
    bypassed_shards,
    cache_hits,
    open_cache,
    start_cache_writes,
)
from blob2gpu.loading.memory_fit import check_memory_fit, streamed_device_cap
from blob2gpu.loading.request import LoadRequest
from blob2gpu.loading.selection import Selection, header_reader, select, selected_sizes
from blob2gpu.operations.report import LoadReport
from blob2gpu.settings import ResolvedSettings
from blob2gpu.sources import ShardPlan, ShardRef
from blob2gpu.sources import resolve as resolve_local
from blob2gpu.sources.azure.failures import archived_error
from blob2gpu.sources.azure.location import is_blob_uri

# {(blob path, etag): {name: tensor}}: complete shards an earlier attempt of a load keeps.
Reusable = dict[tuple[str, str | None], dict[str, Any]]


class FetchStrategy(Protocol):
    """Who fetches which bytes of a prepared load."""

    # Whether the load reads hits from, and writes shards to, the node's NVMe cache.
    uses_node_cache: bool

    def shards_to_read(self, listed: ShardPlan, selected: ShardPlan) -> ShardPlan:
        """The shards this process reads, given every listed shard and those its selection
        needs."""
        ...

    def start(self, prepared: PreparedLoad, pipeline: Any) -> tuple[Any, Any]:
        """Start the core session and what feeds it; returns (session, feeder or None)."""
        ...


@dataclass
class ResolvedSource:
    """A checkpoint found: its shards, and for Blob its container and listing."""

    plan: ShardPlan
    container: Any = None  # a sources.azure.container.BlobContainer, None for local files
    listing: Any = None

    @property
    def is_blob(self) -> bool:
        return self.container is not None


@dataclass
class PreparedLoad:
    """Everything a load checked and decided before its first weight byte is read."""

    request: LoadRequest
    source: ResolvedSource
    plan: ShardPlan  # the shards this load reads, in order
    selection: Selection
    manifest: Manifest | None
    checksums: list[Any] | None  # per shard, what the core checks its chunks against
    content_md5: list[bytes | None] | None  # per shard, the blob's Content-MD5 to check
    report: LoadReport
    cache: CachePlan = field(default_factory=CachePlan)
    preloaded: dict[ShardRef, dict[str, Any]] = field(default_factory=dict)

    @property
    def settings(self) -> ResolvedSettings:
        return self.request.settings

    @property
    def wanted(self) -> list[str] | None:
        """The selected tensor names, sorted; None for every tensor."""
        return None if self.selection.everything else sorted(self.selection.names or ())

    @property
    def mmap(self) -> bool:
        return bool(self.settings.mmap_local_files and self.request.device == "cpu")

    def abandon(self) -> None:
        """Release what preparing took (the cache entries' locks, the hits' descriptors) for a
        load that will not start; a started load's Checkpoint releases them instead."""
        if self.cache.writer is not None:
            self.cache.writer.close()
        self.cache.close()


def chunk_algorithm(verify: str) -> str:
    """How manifest chunks are checked under the `verify` setting: sha256 or crc32c."""
    return "sha256" if verify == "sha256" else "crc32c"


def resolve_source(request: LoadRequest, http: Callable[[], Any]) -> ResolvedSource:
    """List a Blob checkpoint (through the caller's kept connections, `http()`) or resolve a
    local one; checks model.shard_count. Raises SourceUnavailable and its kinds,
    ShardCountMismatch, InvalidIndex."""
    if is_blob_uri(request.uri):
        from blob2gpu.sources.azure.container import open_container

        container = open_container(request.uri, request.settings, request.credential, http())
        listing = container.list_checkpoint()
        source = ResolvedSource(listing.plan, container, listing)
    else:
        source = ResolvedSource(resolve_local(request.uri))
    expected = request.settings.shard_count
    if expected and len(source.plan.shards) != expected:
        raise ShardCountMismatch(
            f"'{source.plan.uri}' has {len(source.plan.shards)} shard(s) but model.shard_count "
            f"is {expected} (source {request.settings.sources['shard_count']}); fix the URI or "
            "the setting"
        )
    return source


def read_manifest(request: LoadRequest, source: ResolvedSource, plan: ShardPlan) -> Manifest | None:
    """The checkpoint's manifest under the `verify` policy (None for verify='none', or 'auto'
    without one); raises ManifestMissing when the policy needs one, InvalidManifest."""
    verify = request.settings.verify
    if verify == "none":
        return None
    if source.is_blob:
        manifest: Manifest | None = source.container.read_manifest(source.listing)
    else:
        manifest = read_local_manifest(os.path.dirname(source.plan.shards[0].path))
    require_manifest(manifest, verify, f"'{plan.uri}'")
    return manifest


def content_md5_to_check(
    source: ResolvedSource,
    manifest: Manifest | None,
    verify: str,
    plan: ShardPlan,
    selection: Selection,
) -> list[bytes | None] | None:
    """verify='auto' on a Blob checkpoint without a manifest: each blob's Content-MD5 (where it
    has one), for a load that reads whole blobs (no tensor selection); else None."""
    if not source.is_blob or manifest is not None or verify != "auto":
        return None
    if not selection.everything or not any(s.content_md5 for s in plan.shards):
        return None
    return [s.content_md5 for s in plan.shards]


def verification_of(
    manifest: Manifest | None,
    algorithm: str,
    source: ResolvedSource,
    content_md5: list[bytes | None] | None,
) -> str:
    """What the load checks, as the report names it: crc32c / sha256 (every chunk against the
    manifest), content-md5 (every blob against its Content-MD5), size+etag (a Blob checkpoint
    with neither, or only some blobs with a Content-MD5: flagged), none."""
    if manifest is not None:
        return algorithm
    if not source.is_blob:
        return "none"
    if content_md5 and all(content_md5):
        return "content-md5"
    return "size+etag"


def split_reusable(
    plan: ShardPlan, reuse: Reusable | None
) -> tuple[ShardPlan, dict[ShardRef, dict[str, Any]]]:
    """A restart after BlobChanged keeps the complete shards whose blob is unchanged: returns the
    plan without them, and them with their tensors."""
    if not reuse:
        return plan, {}
    kept = {r: reuse[(r.path, r.etag)] for r in plan.shards if (r.path, r.etag) in reuse}
    rest = tuple(s for s in plan.shards if s not in kept)
    return dataclasses.replace(plan, shards=rest), kept


def check_fit(
    request: LoadRequest,
    pipeline: Any,
    plan: ShardPlan,
    selection: Selection,
    read_header: Callable[[ShardRef], _core.ParsedHeader],
    manifest: Manifest | None,
) -> tuple[int, int] | None:
    """Raises InsufficientGPUMemory / InsufficientHostMemory when the weights will not fit;
    returns (free, total) GPU bytes measured (None on cpu). A selection whose shards do not fit
    whole is sized from its headers (one small read per shard) before deciding."""
    settings, device, staging = request.settings, request.device, request.host_staging
    cap = streamed_device_cap(request, pipeline)  # a streamed load holds this, not the weights
    sizes = [s.size for s in plan.shards]
    try:
        return check_memory_fit(sizes, device, pipeline, settings, staging, streamed_cap=cap)
    except (InsufficientGPUMemory, InsufficientHostMemory):
        if selection.everything:
            raise
    chunk = manifest.chunk_bytes if manifest is not None else 0
    sizes = selected_sizes(plan, selection, read_header, chunk)
    what = "the selected tensors"
    return check_memory_fit(sizes, device, pipeline, settings, staging, what, streamed_cap=cap)


def has_authority(prepared: PreparedLoad, index: int) -> bool:
    """Whether shard `index`'s bytes are checked against something from Blob: the manifest's
    checksums, or the blob's Content-MD5."""
    checksums, content_md5 = prepared.checksums, prepared.content_md5
    return bool(
        (checksums is not None and checksums[index] is not None)
        or (content_md5 is not None and content_md5[index])
    )


def plan_cache(
    prepared: PreparedLoad, use_cache: bool, refetch: frozenset[str] = frozenset()
) -> CachePlan:
    """Look up the shards the node's cache already holds, refuse archived blobs that it does not
    (before any memory, lock or cache file is taken), and start writing the others through.
    Shards no authority from Blob vouches for are left out of a directory other users can write
    (cache.bypassed says why); `refetch`: shards whose entry failed its check in this load,
    fetched whatever the cache holds. Raises BlobArchived, and ConfigError for a cache
    directory another user could write."""
    source, plan, settings = prepared.source, prepared.plan, prepared.settings
    if not source.is_blob:
        return CachePlan()
    cache = open_cache(settings, plan) if use_cache else CachePlan()
    location = source.container.location
    bypassed: dict[int, str] = {}
    again = {i for i, ref in enumerate(plan.shards) if ref.name in refetch}
    if cache.cache is not None:
        checked = [has_authority(prepared, i) for i in range(len(plan.shards))]
        bypassed = bypassed_shards(cache.cache, plan, settings, checked)
        cache.bypassed = {plan.shards[i].name: why for i, why in bypassed.items()}
        cache.hits = cache_hits(cache.cache, location, plan, skip=set(bypassed) | again)
    archived = {
        ref.path: ref.archived
        for i, ref in enumerate(plan.shards)
        if ref.archived and i not in cache.hits
    }
    if archived:
        cache.close()
        raise archived_error(location, archived)
    if cache.cache is not None:
        cache.writer = start_cache_writes(
            cache.cache,
            location,
            plan,
            # The manifest's checksums; a Content-MD5 is checked by the core over the same bytes
            # as they land (an entry published before a mismatch fails the load is repaired when
            # a load reads it).
            [blob_checks(prepared.manifest, ref) for ref in plan.shards],
            cache.hits,
            write=prepared.selection.everything,
            queue_bytes=settings.cache_write_queue_bytes,
            skip=set(bypassed),
            refetch=again,
        )
    return cache


def checksums_with_cache_hits(prepared: PreparedLoad) -> list[Any] | None:
    """The core's per-shard checksums, where a cache hit that Blob has nothing to check by (no
    manifest entry, no Content-MD5: only in a directory no other user can write) is checked
    against its entry's record, which tells a damaged disk. A hit with an authority is checked
    against it exactly as a fetched shard is: the record is never the reference."""
    hits = prepared.cache.hits
    if not hits:
        return prepared.checksums
    checksums = list(prepared.checksums or [None] * len(prepared.plan.shards))
    for i, hit in hits.items():
        record = hit.entry.record
        if not has_authority(prepared, i) and record is not None:
            checksums[i] = _core.ChunkChecksums(record.chunk_bytes, crc32c=list(record.crc32c))
    return checksums


def continue_load(
    prepared: PreparedLoad, shards: tuple[ShardRef, ...], refetch: frozenset[str]
) -> PreparedLoad:
    """The rest of a load (`shards`, those not yet handed out) after the cache entries of the
    shards in `refetch` failed their checks: the same request, source, manifest and selection,
    the cache planned again (those shards fetched from Blob and written through). Raises what
    plan_cache raises."""
    plan = dataclasses.replace(prepared.plan, shards=shards)
    verify = prepared.settings.verify
    rest = dataclasses.replace(
        prepared,
        plan=plan,
        checksums=core_checksums(prepared.manifest, shards, chunk_algorithm(verify)),
        content_md5=content_md5_to_check(
            prepared.source, prepared.manifest, verify, plan, prepared.selection
        ),
        cache=CachePlan(),
        preloaded={},
    )
    rest.cache = plan_cache(rest, True, refetch)
    rest.checksums = checksums_with_cache_hits(rest)
    return rest


def load_strategy(request: LoadRequest) -> str:
    """How the bytes reach their target, as reports and metrics name it: cpu (straight into host
    memory, or mapped), direct-gpu (through the pinned ring to the device), host-staging (whole
    shards in host memory, then copied)."""
    if request.device == "cpu":
        return "cpu"
    return "host-staging" if request.host_staging else "direct-gpu"


def new_report(
    request: LoadRequest, source: ResolvedSource, started_at: float, **fields: Any
) -> LoadReport:
    """The load's report; `started_at` (unix time) is the artifact fetch start."""
    container = source.container
    report = LoadReport(
        uri=container.display_uri if container else source.plan.uri,
        device=request.device,
        framework=request.framework,
        started_at=started_at,
        settings=dict(request.settings.values),
        source="azure-blob" if container else "local",
        credential=container.credential_source if container else None,
        strategy=load_strategy(request),
        **fields,
    )
    return report


def prepare_load(
    request: LoadRequest,
    pipeline: Callable[[], Any],
    http: Callable[[], Any],
    strategy: FetchStrategy,
    reuse: Reusable | None = None,
) -> PreparedLoad:
    """Run every check of a load and decide what it reads; nothing is allocated for weights yet.

    pipeline(): the device's core pipeline (waited for only when the fit check needs it);
    http(): the storage connections to list through. Raises what resolve_source, read_manifest,
    check_fit and plan_cache raise, and TensorNotFound for a named tensor the index lacks.
    """
    started_at, clock_start = time.time(), time.perf_counter()
    source = resolve_source(request, http)
    read_header = header_reader(source.container)
    selected, selection = select(
        source.plan, request.tensor_names, request.tensor_filter, read_header
    )
    plan, preloaded = split_reusable(strategy.shards_to_read(source.plan, selected), reuse)
    manifest = read_manifest(request, source, plan)
    algorithm = chunk_algorithm(request.settings.verify)
    content_md5 = content_md5_to_check(source, manifest, request.settings.verify, plan, selection)
    gpu_memory = check_fit(request, pipeline(), plan, selection, read_header, manifest)
    report = new_report(
        request,
        source,
        started_at,
        verification=verification_of(manifest, algorithm, source, content_md5),
        tensor_selection=None if selection.everything else len(selection.names or ()),
        reused_shards=[ref.name for ref in preloaded],
    )
    report.start_clock(clock_start)
    if gpu_memory is not None and request.settings.emit_gpu_memory_watermark:
        report.gpu_memory_free_before, report.gpu_memory_total = gpu_memory
    prepared = PreparedLoad(
        request=request,
        source=source,
        plan=plan,
        selection=selection,
        manifest=manifest,
        checksums=core_checksums(manifest, plan.shards, algorithm),
        content_md5=content_md5,
        report=report,
        preloaded=preloaded,
    )
    prepared.cache = plan_cache(prepared, strategy.uses_node_cache)
    report.cache_skipped = dict(prepared.cache.skipped)
    report.cache_bypassed = dict(prepared.cache.bypassed)
    prepared.checksums = checksums_with_cache_hits(prepared)
    return prepared
