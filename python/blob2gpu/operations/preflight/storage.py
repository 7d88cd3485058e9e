"""The checkpoint's checks: found locally, or the storage endpoint reachable with the credentials,
and the checkpoint listed."""

from __future__ import annotations

import time
from typing import Any

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
from blob2gpu.redaction import redact

STORAGE_CONNECT_TIMEOUT = 5.0  # preflight must fail fast on a dead endpoint


def check_source(run: PreflightRun, source: str | None) -> None:
    if not source:
        t = time.perf_counter()
        run.add(Check("storage", SKIP, "no --source (or MODEL_SOURCE_URI) given"), t)
        return
    from blob2gpu.sources.azure.location import is_blob_uri

    if is_blob_uri(source):
        _check_blob(run, source)
    else:
        _check_local(run, source)


def _check_local(run: PreflightRun, source: str) -> None:
    from blob2gpu.sources import resolve as resolve_local

    t = time.perf_counter()
    run.add(Check("storage", SKIP, "local source: no storage endpoint"), t)
    t = time.perf_counter()
    try:
        plan = resolve_local(source)
    except Blob2GpuError as e:
        run.add(Check("checkpoint", FAIL, str(e), "check the path and that the node mounts it"), t)
        return
    checkpoint_found(run, plan, t)


def checkpoint_found(run: PreflightRun, plan: Any, t: float) -> None:
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
    run.add(Check("checkpoint", OK, found, data=data), t)


_NETWORK_REASONS = (
    ("unable to connect to proxy", "the proxy (HTTPS_PROXY / HTTP_PROXY) cannot be reached"),
    ("connection refused", "connection refused (nothing listens there)"),
    ("name or service not known", "the host name does not resolve (DNS)"),
    ("temporary failure in name resolution", "the host name does not resolve (DNS)"),
    ("nodename nor servname", "the host name does not resolve (DNS)"),
    ("timed out", "the connection timed out"),
    ("network is unreachable", "the network is unreachable"),
    ("no route to host", "no route to host"),
    ("certificate verify failed", "TLS certificate verification failed"),
    ("connection reset", "the connection was reset"),
)


def _network_reason(message: str) -> str:
    """A transport error's cause in a few words (the SDK's text runs to hundreds of characters)."""
    lowered = message.lower()
    for needle, reason in _NETWORK_REASONS:
        if needle in lowered:
            return reason
    return message[:160]


def _check_blob(run: PreflightRun, uri: str) -> None:
    from blob2gpu.sources.azure.container import open_container

    t = time.perf_counter()
    fast = run.settings.with_overrides(
        {
            "connect_timeout_seconds": min(
                run.settings.connect_timeout_seconds, STORAGE_CONNECT_TIMEOUT
            ),
            "retry_max_attempts": min(run.settings.retry_max_attempts, 2),
        }
    )
    try:
        container = open_container(uri, fast, credential=None)
    except Blob2GpuError as e:
        run.add(
            Check("storage", FAIL, str(e), e.hint or "fix the URI or install blob2gpu[azure]"), t
        )
        return
    with container:
        _probe_storage(run, container, t)


def _storage_failure(error: Blob2GpuError, container: Any, raw: str) -> Check:
    """The storage check of a listing that failed with `error` (raw: the transport's own words,
    of which the mapped error keeps only the start)."""
    from blob2gpu.errors import AccessDenied, BlobNotFound, ProxyAuthenticationRefused

    endpoint = container.location.account_url
    if isinstance(error, AccessDenied):
        refused = (
            "the proxy refused its credentials (HTTP 407)"
            if isinstance(error, ProxyAuthenticationRefused)
            else f"credentials refused ({container.credential_source})"
        )
        return Check("storage", FAIL, f"{endpoint}: {refused}", error.hint or str(error))
    if isinstance(error, BlobNotFound):
        return Check("storage", FAIL, str(error), "create the container or fix the URI")
    return Check(
        "storage",
        FAIL,
        f"{endpoint} unreachable: {_network_reason(raw or str(error))}",
        "check DNS, firewall / NSG rules, the private endpoint and proxy settings",
    )


def _probe_storage(run: PreflightRun, container: Any, t: float) -> None:
    """List one blob (reachable? credentials accepted?), then the checkpoint itself."""
    from blob2gpu.sources.azure.failures import storage_error

    endpoint = container.location.account_url
    raw = ""  # the transport's own words: the mapped error keeps only their first 300 characters
    try:
        try:
            first = next(
                iter(
                    container.client.list_blobs(
                        name_starts_with=container.location.path or None, results_per_page=1
                    )
                ),
                None,
            )
        except Blob2GpuError:
            raise
        except Exception as e:  # the SDK's and the transport's errors, mapped to ours
            raw = redact(e)
            raise storage_error(e, container.location, None, "listing") from None
    except Blob2GpuError as e:
        run.add(_storage_failure(e, container, raw), t)
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
        plan = container.list_checkpoint().plan
    except Blob2GpuError as e:
        run.add(Check("checkpoint", FAIL, str(e), "fix the URI or publish the checkpoint"), t)
        return
    checkpoint_found(run, plan, t)
