"""Prometheus metrics of the loads in this process (the optional ``prometheus`` extra).

Every finished load and every ``report.mark_first_token()`` update a few metrics in a registry:
prometheus_client's default REGISTRY unless ``use_registry()`` picked another. The serving process
exposes it as it already does (``prometheus_client.start_http_server(9100)``, or its framework's
/metrics route). Without prometheus_client installed every function here is a no-op.

In prometheus_client's multiprocess mode ($PROMETHEUS_MULTIPROC_DIR set before the processes
start) the values of every process land in that directory, and a server that exposes it (vLLM's
API server does) shows the loads of its worker processes too; the gauges then show the value of
the process that set them last ('mostrecent').

    blob2gpu_loads_total{device,source,strategy}   loads completed
    blob2gpu_load_bytes_total                      bytes read by those loads
    blob2gpu_load_seconds                          histogram: artifact fetch start -> model loaded
    blob2gpu_load_throughput_gbps                  gauge: the last load's GB/s
    blob2gpu_storage_retries_total                 transient storage failures retried
    blob2gpu_storage_retry_wait_seconds_total      seconds loads backed off before those retries
    blob2gpu_gpu_memory_peak_used_bytes            gauge: GPU memory in use at the last load's peak
    blob2gpu_first_token_seconds                   histogram: artifact fetch start -> first token
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("blob2gpu")

# Cold starts run from about a second (small models, warm cache) to minutes (large ones, cold).
SECONDS_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)

_lock = threading.Lock()
_registry: Any = None  # the registry in use; None until first used
_metrics: dict[str, Any] | None = None


def available() -> bool:
    """Whether prometheus_client is installed (else the metrics are no-ops)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def _create(reg: Any) -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "loads": Counter(
            "blob2gpu_loads_total",
            "Checkpoint loads completed.",
            ("device", "source", "strategy"),
            registry=reg,
        ),
        "bytes": Counter(
            "blob2gpu_load_bytes_total", "Bytes read by completed loads.", registry=reg
        ),
        "seconds": Histogram(
            "blob2gpu_load_seconds",
            "Seconds from artifact fetch start to model load complete.",
            buckets=SECONDS_BUCKETS,
            registry=reg,
        ),
        "throughput": Gauge(
            "blob2gpu_load_throughput_gbps",
            "Throughput of the last completed load, GB/s (10^9 bytes).",
            registry=reg,
            multiprocess_mode="mostrecent",
        ),
        "retries": Counter(
            "blob2gpu_storage_retries_total",
            "Transient storage failures retried (ranges and listing calls).",
            registry=reg,
        ),
        "retry_wait": Counter(
            "blob2gpu_storage_retry_wait_seconds_total",
            "Seconds backed off before retries (throttling, Retry-After), summed over threads.",
            registry=reg,
        ),
        "gpu_peak": Gauge(
            "blob2gpu_gpu_memory_peak_used_bytes",
            "GPU memory in use at the peak of the last GPU load (total minus the watermark).",
            registry=reg,
            multiprocess_mode="mostrecent",
        ),
        "first_token": Histogram(
            "blob2gpu_first_token_seconds",
            "Seconds from artifact fetch start to the first token (report.mark_first_token()).",
            buckets=SECONDS_BUCKETS,
            registry=reg,
        ),
    }


def _ensure() -> dict[str, Any] | None:
    global _registry, _metrics
    with _lock:
        if _metrics is None:
            if not available():
                return None
            from prometheus_client import REGISTRY

            _registry = _registry if _registry is not None else REGISTRY
            _metrics = _create(_registry)
        return _metrics


def registry() -> Any:
    """The prometheus_client registry that holds blob2gpu's metrics (registering them on first
    call), or None when prometheus_client is not installed."""
    _ensure()
    return _registry


def use_registry(reg: Any) -> None:
    """Keep blob2gpu's metrics in `reg` (a prometheus_client CollectorRegistry) from now on, with
    fresh values; e.g. a registry a multi-tenant server exposes apart. Raises ImportError when
    prometheus_client is not installed."""
    global _registry, _metrics
    metrics = _create(reg)
    with _lock:
        _registry, _metrics = reg, metrics


def observe_load(report: Any) -> None:
    """Count one completed load (a LoadReport). Never raises: metrics must not fail a load."""
    try:
        m = _ensure()
        if m is None:
            return
        m["loads"].labels(report.device, report.source, report.strategy).inc()
        m["bytes"].inc(report.bytes)
        m["seconds"].observe(report.seconds)
        m["throughput"].set(report.throughput_gbps)
        if report.retries:
            m["retries"].inc(report.retries)
            m["retry_wait"].inc(report.retry_wait_seconds)
        if report.gpu_memory_peak_used is not None:
            m["gpu_peak"].set(report.gpu_memory_peak_used)
    except Exception:
        log.debug("blob2gpu metrics: observe_load failed", exc_info=True)


def observe_first_token(seconds: float) -> None:
    """Record one first-token latency (seconds since artifact fetch start). Never raises."""
    try:
        m = _ensure()
        if m is not None:
            m["first_token"].observe(seconds)
    except Exception:
        log.debug("blob2gpu metrics: observe_first_token failed", exc_info=True)
