"""The checkpoint's checks: found locally, or the storage endpoint reachable with the credentials,
and the checkpoint listed; each shard's header read (one small ranged GET from Blob) and its size
checked against it, so a truncated checkpoint fails here rather than in the load."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from blob2gpu.errors import Blob2GpuError
from blob2gpu.operations.preflight.result import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    PreflightRun,
    gb,
)

if TYPE_CHECKING:
    from blob2gpu.sources.azure.source import AzureSource

STORAGE_CONNECT_TIMEOUT = 5.0  # preflight must fail fast on a dead endpoint


def check_source(run: PreflightRun, source: str | None) -> None:
    if not source:
        t = time.perf_counter()
        run.add(Check("storage", SKIP, "no --source (or MODEL_SOURCE_URI) given"), t)
        return
    from blob2gpu.sources import source_class

    try:
        remote = source_class(source).remote
    except Blob2GpuError as e:  # a scheme no source reads
        run.add(Check("storage", FAIL, str(e), "fix the URI"), time.perf_counter())
        return
    if remote:
        _check_blob(run, source)
    else:
        _check_local(run, source)


def _check_local(run: PreflightRun, uri: str) -> None:
    from blob2gpu.sources.local import LocalSource

    t = time.perf_counter()
    run.add(Check("storage", SKIP, "local source: no storage endpoint"), t)
    t = time.perf_counter()
    source = LocalSource(uri, run.settings)
    try:
        plan = source.resolve()
    except Blob2GpuError as e:
        run.add(Check("checkpoint", FAIL, str(e), "check the path and that the node mounts it"), t)
        return
    checkpoint_found(run, plan, t, source.read_header)


def _bad_shard(plan: Any, read_header: Callable[[Any], Any], parallel: int) -> str | None:
    """What is wrong with the first shard of `plan` whose header cannot be read or parsed, or
    whose size is not the one its header implies (a truncated upload); None when all are whole.
    Each header is one small read (a ranged GET from Blob), `parallel` at a time; shards in the
    Archive tier are left out (they serve no bytes)."""
    shards = [s for s in plan.shards if not s.archived]

    def problem(ref: Any) -> str | None:
        try:
            read_header(ref)
        except Blob2GpuError as e:
            return str(e)
        except OSError as e:  # a local shard that cannot be opened
            return f"shard '{ref.name}': {e.strerror}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(shards)))) as pool:
        return next((p for p in pool.map(problem, shards) if p is not None), None)


def checkpoint_found(
    run: PreflightRun, plan: Any, t: float, read_header: Callable[[Any], Any] | None = None
) -> None:
    """Add the checkpoint check of a resolved `plan`: its shards and size, failed for shards in
    the Archive tier and, with `read_header`, for a shard whose header is bad or whose size is
    not what its header says."""
    if run.model_bytes is None:
        run.model_bytes, run.model_bytes_from = plan.total_bytes, "the checkpoint"
    index = "with index" if plan.weight_map is not None else "no index"
    found = f"{len(plan.shards)} shard(s), {gb(plan.total_bytes)} ({index})"
    data = {"shards": len(plan.shards), "bytes": plan.total_bytes}
    archived = [s.name for s in plan.shards if s.archived]
    if archived:
        # The service serves no bytes of these for hours; only cached copies can still load.
        cached = run.settings.local_nvme_cache_enabled
        run.add(
            Check(
                "checkpoint",
                WARN if cached else FAIL,
                f"{found}, {len(archived)} in the Archive tier ({', '.join(archived[:3])}"
                f"{', ...' if len(archived) > 3 else ''})"
                + ("; they load only from the NVMe cache" if cached else ""),
                "rehydrate them to Hot or Cool (az storage blob set-tier --tier Hot "
                "--rehydrate-priority High) or copy the checkpoint to an online tier",
                data={**data, "archived": archived},
            ),
            t,
        )
        return
    bad = _bad_shard(plan, read_header, run.settings.prefetch_concurrency) if read_header else None
    if bad is not None:
        run.add(
            Check(
                "checkpoint",
                FAIL,
                f"{found}, not whole: {bad}",
                "publish the checkpoint again (`blob2gpu publish` checks every shard first)",
                data=data,
            ),
            t,
        )
        return
    run.add(Check("checkpoint", OK, f"{found}, headers read", data=data), t)


def _check_blob(run: PreflightRun, uri: str) -> None:
    from blob2gpu.sources.azure.source import AzureSource

    t = time.perf_counter()
    fast = run.settings.with_overrides(
        {
            "connect_timeout_seconds": min(
                run.settings.connect_timeout_seconds, STORAGE_CONNECT_TIMEOUT
            ),
            "retry_max_attempts": min(run.settings.retry_max_attempts, 2),
        }
    )
    source = AzureSource(uri, fast)
    try:
        _ = source.container  # the URI parsed, the credential chosen
    except Blob2GpuError as e:
        run.add(
            Check("storage", FAIL, str(e), e.hint or "fix the URI or install blob2gpu[azure]"), t
        )
        return
    try:
        _probe_storage(run, source, t)
    finally:
        source.close()


def _storage_failure(error: Blob2GpuError, source: AzureSource, cause: Exception | None) -> Check:
    """The storage check of a listing that failed with `error` (mapped from `cause`, the
    transport's exception, when there was one): why, as the loads' own classifier says it
    (failures.failure_reason: the proxy, a refused connection, a name that does not resolve, an
    untrusted certificate, by type)."""
    from blob2gpu.errors import AccessDenied, BlobNotFound, ProxyAuthenticationRefused
    from blob2gpu.sources.azure.failures import failure_reason

    location = source.container.location
    if isinstance(error, AccessDenied):
        refused = (
            "the proxy refused its credentials (HTTP 407)"
            if isinstance(error, ProxyAuthenticationRefused)
            else f"credentials refused ({source.credential_source})"
        )
        return Check(
            "storage", FAIL, f"{location.account_url}: {refused}", error.hint or str(error)
        )
    if isinstance(error, BlobNotFound):
        return Check("storage", FAIL, str(error), "create the container or fix the URI")
    why = failure_reason(cause, location) if cause is not None else str(error)
    return Check(
        "storage",
        FAIL,
        f"{location.account_url} unreachable: {why}",
        "check DNS, firewall / NSG rules, the private endpoint and proxy settings",
    )


def _probe_storage(run: PreflightRun, source: AzureSource, t: float) -> None:
    """List one blob (reachable? credentials accepted?), then the checkpoint itself."""
    from blob2gpu.sources.azure.failures import storage_error

    container = source.container
    endpoint = container.location.account_url
    cause: Exception | None = None  # what the transport raised, classified by its type
    failure: Blob2GpuError | None = None
    try:
        first = next(
            iter(
                container.client.list_blobs(
                    name_starts_with=container.location.path or None, results_per_page=1
                )
            ),
            None,
        )
    except Blob2GpuError as e:
        failure = e
    except Exception as e:  # the SDK's and the transport's errors, mapped to ours
        cause = e
        failure = storage_error(e, container.location, None, "listing")
    if failure is not None:
        run.add(_storage_failure(failure, source, cause), t)
        return
    ms = (time.perf_counter() - t) * 1000
    data = {"endpoint": endpoint, "credential": container.credential_source, "ms": round(ms, 1)}
    if first is None:
        run.add(
            Check(
                "storage",
                WARN,
                f"{endpoint} reachable, credentials accepted, but nothing under the prefix",
                "check the URI's container and prefix",
                data=data,
            ),
            t,
        )
    else:
        run.add(
            Check(
                "storage",
                OK,
                f"{endpoint} reachable, listed in {ms:.0f} ms ({container.credential_source})",
                data=data,
            ),
            t,
        )
    t = time.perf_counter()
    try:
        plan = source.resolve()
    except Blob2GpuError as e:
        run.add(Check("checkpoint", FAIL, str(e), "fix the URI or publish the checkpoint"), t)
        return
    checkpoint_found(run, plan, t, source.read_header)
