"""The one load sequence: a LoadRequest becomes a PreparedLoad.

Every way of loading (Loader.open, the torch.distributed fan-out, a serving engine's loader) goes
through prepare_load, so every load runs the same checks in the same order: open the request's
Source (by the URI's scheme, within the node's cache when the strategy reads through it), resolve
it, check the shard count, apply the tensor selection, keep what a restart may reuse, apply the
manifest policy, check that the weights fit, then let the source decide how it reads the shards
(cache hits, archived blobs refused). Callers differ only in the FetchStrategy: who fetches which
bytes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from blob2gpu import _core
from blob2gpu.cache.source import with_node_cache
from blob2gpu.errors import InsufficientGPUMemory, InsufficientHostMemory, ShardCountMismatch
from blob2gpu.integrity.manifest import Manifest, core_checksums, require_manifest
from blob2gpu.loading.frameworks import Tensor
from blob2gpu.loading.memory_fit import check_memory_fit, streamed_device_cap
from blob2gpu.loading.request import LoadRequest
from blob2gpu.loading.selection import Selection, select, selected_sizes
from blob2gpu.operations.report import LoadReport
from blob2gpu.settings import ResolvedSettings
from blob2gpu.sources import Connections, ShardPlan, ShardRef, Source, open_source
from blob2gpu.sources.feeding import Fetch

# {(blob path, etag): {name: tensor}}: complete shards an earlier attempt of a load keeps.
Reusable = dict[tuple[str, str | None], dict[str, Tensor]]


class FetchStrategy(Protocol):
    """Who fetches which bytes of a prepared load."""

    # Whether the load reads hits from, and writes shards to, the node's NVMe cache.
    uses_node_cache: bool

    def shards_to_read(self, listed: ShardPlan, selected: ShardPlan) -> ShardPlan:
        """The shards this process reads, given every listed shard and those its selection
        needs."""
        ...

    def start(self, prepared: PreparedLoad, pipeline: _core.LoadPipeline) -> Fetch:
        """Start the core session and what feeds it (not yet started: Fetch.start())."""
        ...


class StorageFetch:
    """The FetchStrategy of an ordinary load: every byte from the load's source (the core reads
    local files and NVMe cache hits itself; a Blob checkpoint's ranges are fetched by its feeder
    and written through to the node's cache)."""

    uses_node_cache = True

    def shards_to_read(self, listed: ShardPlan, selected: ShardPlan) -> ShardPlan:
        return selected

    def start(self, prepared: PreparedLoad, pipeline: _core.LoadPipeline) -> Fetch:
        return prepared.source.start(prepared, pipeline)


@dataclass
class PreparedLoad:
    """Everything a load checked and decided before its first weight byte is read."""

    request: LoadRequest
    source: Source
    plan: ShardPlan  # the shards this load reads, in order
    selection: Selection
    manifest: Manifest | None
    checksums: list[_core.ChunkChecksums | None] | None  # per shard, what the core checks
    content_md5: list[bytes | None] | None  # per shard, the blob's Content-MD5 to check
    report: LoadReport
    preloaded: dict[ShardRef, dict[str, Tensor]] = field(default_factory=dict)
    # The device memory a streamed GPU load may hold for what its consumer has not dropped
    # (memory_fit.streamed_device_cap); 0: not bounded.
    device_cap: int = 0

    @property
    def settings(self) -> ResolvedSettings:
        return self.request.settings

    @property
    def wanted(self) -> list[str] | None:
        """The selected tensor names, sorted; None for every tensor."""
        return None if self.selection.everything else sorted(self.selection.names or ())

    @property
    def mmap(self) -> bool:
        return self.settings.mmap_local_files and self.request.device == "cpu"

    def _shards(
        self,
        paths: Sequence[str] | None,
        checksums: Sequence[_core.ChunkChecksums | None] | None,
    ) -> list[_core.ShardSource]:
        checksums = checksums if checksums is not None else self.checksums
        md5 = self.content_md5
        return [
            _core.ShardSource(
                ref.name,
                size=ref.size,
                path=paths[i] if paths is not None else "",
                checksums=checksums[i] if checksums is not None else None,
                content_md5=md5[i] if md5 is not None else None,
            )
            for i, ref in enumerate(self.plan.shards)
        ]

    def start_local(self, pipeline: _core.LoadPipeline) -> _core.LoadSession:
        """Start the core session that reads the plan's local files itself."""
        self.report.mark_session_start()
        return pipeline.start_local(
            self._shards([s.path for s in self.plan.shards], None),
            mmap=self.mmap,
            host_staging=self.request.host_staging,
            fail_on_checksum_mismatch=self.settings.fail_if_checksum_mismatch,
            wanted=self.wanted,
            device_cap=self.device_cap,
        )

    def start_fed(
        self,
        pipeline: _core.LoadPipeline,
        paths: Sequence[str] | None = None,
        checksums: Sequence[_core.ChunkChecksums | None] | None = None,
        direct_io: bool = False,
        mmap: bool = False,
    ) -> _core.LoadSession:
        """Start a core session whose bytes a feeder hands in; paths: per shard, a local file
        the core reads instead ('' for a fed shard: the cache's hits); checksums: per shard,
        in place of the manifest's."""
        self.report.mark_session_start()
        return pipeline.start_fed(
            self._shards(paths, checksums),
            host_staging=self.request.host_staging,
            fail_on_checksum_mismatch=self.settings.fail_if_checksum_mismatch,
            wanted=self.wanted,
            direct_io=direct_io,
            mmap=mmap,
            device_cap=self.device_cap,
        )

    def narrowed(self, shards: tuple[ShardRef, ...]) -> PreparedLoad:
        """The same load reading only `shards` (the rest of it, in a new session)."""
        plan = dataclasses.replace(self.plan, shards=shards)
        return dataclasses.replace(
            self,
            plan=plan,
            checksums=core_checksums(self.manifest, shards, chunk_algorithm(self.settings.verify)),
            content_md5=content_md5_to_check(
                self.manifest, self.settings.verify, plan, self.selection
            ),
            preloaded={},
        )

    def abandon(self) -> None:
        """Release what preparing took (the cache's locks and descriptors) for a load that will
        not start; a started load's Checkpoint releases them instead."""
        self.source.finish(self, complete=False)


def chunk_algorithm(verify: str) -> str:
    """How manifest chunks are checked under the `verify` setting: sha256 or crc32c."""
    return "sha256" if verify == "sha256" else "crc32c"


def resolve_source(source: Source, settings: ResolvedSettings) -> ShardPlan:
    """Resolve the source; checks model.shard_count. Raises what Source.resolve raises, and
    ShardCountMismatch."""
    plan = source.resolve()
    expected = settings.shard_count
    if expected and len(plan.shards) != expected:
        raise ShardCountMismatch(
            f"'{plan.uri}' has {len(plan.shards)} shard(s) but model.shard_count is {expected} "
            f"(source {settings.sources['shard_count']})",
            hint="fix the URI or the setting",
        )
    return plan


def read_manifest(source: Source, verify: str, plan: ShardPlan) -> Manifest | None:
    """The checkpoint's manifest under the `verify` policy (None for verify='none', or 'auto'
    without one); raises ManifestMissing when the policy needs one, InvalidManifest."""
    if verify == "none":
        return None
    return require_manifest(source.read_manifest(), verify, f"'{plan.uri}'")


def content_md5_to_check(
    manifest: Manifest | None, verify: str, plan: ShardPlan, selection: Selection
) -> list[bytes | None] | None:
    """verify='auto' on a checkpoint without a manifest whose shards have a Content-MD5 (blobs
    that do): each shard's, for a load that reads whole shards (no tensor selection); else
    None."""
    if manifest is not None or verify != "auto" or not selection.everything:
        return None
    if not any(s.content_md5 for s in plan.shards):
        return None
    return [s.content_md5 for s in plan.shards]


def verification_of(
    manifest: Manifest | None, algorithm: str, source: Source, md5: list[bytes | None] | None
) -> str:
    """What the load checks, as the report names it: crc32c / sha256 (every chunk against the
    manifest), content-md5 (every blob against its Content-MD5), else what the source checks
    without either (size+etag for blobs, flagged; none for local files)."""
    if manifest is not None:
        return algorithm
    if md5 and all(md5):
        return "content-md5"
    return source.unverified


def split_reusable(
    plan: ShardPlan, reuse: Reusable | None
) -> tuple[ShardPlan, dict[ShardRef, dict[str, Tensor]]]:
    """A restart after BlobChanged keeps the complete shards whose blob is unchanged: returns the
    plan without them, and them with their tensors."""
    if not reuse:
        return plan, {}
    kept = {r: reuse[(r.path, r.etag)] for r in plan.shards if (r.path, r.etag) in reuse}
    rest = tuple(s for s in plan.shards if s not in kept)
    return dataclasses.replace(plan, shards=rest), kept


def check_fit(
    request: LoadRequest,
    pipeline: _core.LoadPipeline,
    plan: ShardPlan,
    selection: Selection,
    read_header: Callable[[ShardRef], _core.ParsedHeader],
    manifest: Manifest | None,
    cap: int,
) -> tuple[int, int] | None:
    """Raises InsufficientGPUMemory / InsufficientHostMemory when the weights will not fit (a
    streamed load's: its `cap`, not the weights); returns (free, total) GPU bytes measured (None
    on cpu). A selection whose shards do not fit whole is sized from its headers (one small read
    per shard) before deciding."""
    settings, device, staging = request.settings, request.device, request.host_staging
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


def load_strategy(request: LoadRequest) -> str:
    """How the bytes reach their target, as reports and metrics name it: cpu (straight into host
    memory, or mapped), direct-gpu (through the pinned ring to the device), host-staging (whole
    shards in host memory, then copied)."""
    if request.device == "cpu":
        return "cpu"
    return "host-staging" if request.host_staging else "direct-gpu"


def prepare_load(
    request: LoadRequest,
    pipeline: Callable[[], _core.LoadPipeline],
    connections: Connections | None,
    strategy: FetchStrategy,
    reuse: Reusable | None = None,
) -> PreparedLoad:
    """Run every check of a load and decide what it reads; nothing is allocated for weights yet.

    pipeline(): the device's core pipeline (waited for only when the fit check needs it);
    connections: what the Loader keeps for its sources. Raises what Source.resolve,
    read_manifest, check_fit and Source.begin raise (BlobArchived; ConfigError for a cache
    directory another user could write), ShardCountMismatch, and TensorNotFound for a named
    tensor the index lacks.
    """
    started_at, clock_start = time.time(), time.perf_counter()
    settings = request.settings
    source = open_source(request.uri, settings, request.credential, connections)
    if strategy.uses_node_cache:
        source = with_node_cache(source)
    listed = resolve_source(source, settings)
    names, name_filter = request.tensor_names, request.tensor_filter
    selected, selection = select(listed, names, name_filter, source.read_header)
    plan, preloaded = split_reusable(strategy.shards_to_read(listed, selected), reuse)
    manifest = read_manifest(source, settings.verify, plan)
    algorithm = chunk_algorithm(settings.verify)
    content_md5 = content_md5_to_check(manifest, settings.verify, plan, selection)
    core = pipeline()
    cap = streamed_device_cap(request, core)
    gpu_memory = check_fit(request, core, plan, selection, source.read_header, manifest, cap)
    report = LoadReport(
        uri=source.display_uri,
        device=request.device,
        framework=request.framework,
        started_at=started_at,
        settings=settings.values,
        source=source.kind,
        credential=source.credential_source,
        strategy=load_strategy(request),
        verification=verification_of(manifest, algorithm, source, content_md5),
        tensor_selection=None if selection.everything else len(selection.names or ()),
        reused_shards=[ref.name for ref in preloaded],
    )
    report.start_clock(clock_start)
    if gpu_memory is not None and settings.emit_gpu_memory_watermark:
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
        device_cap=cap,
    )
    source.begin(prepared)
    return prepared
