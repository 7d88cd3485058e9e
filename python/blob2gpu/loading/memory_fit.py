"""Memory-fit checks made before any byte is downloaded: a model that does not fit with headroom
fails in milliseconds with both numbers and what to change, not minutes later mid-load."""

from __future__ import annotations

from typing import Any

from blob2gpu import phrasing
from blob2gpu.errors import InsufficientGPUMemory, InsufficientHostMemory
from blob2gpu.loading.host_memory import host_budget, memory_size


def check_memory_fit(
    shard_sizes: list[int],
    device: str,
    pipeline: Any,
    settings: Any,
    host_staging: bool,
    what: str = "the checkpoint",
) -> tuple[int, int] | None:
    """Raise InsufficientGPUMemory / InsufficientHostMemory when the weights will not fit.

    shard_sizes: bytes each shard will hold in target memory; what: how messages name them.
    Returns (free, total) GPU bytes measured for a cuda target (None on cpu), for the report.
    """
    weights = sum(shard_sizes)
    measured = pipeline.memory_info() if device != "cpu" else None
    if not settings.check_memory_fit:
        return measured
    if device == "cpu" or host_staging:
        # cpu: every shard stays in host memory. host-staging: each shard passes through host
        # memory whole; as many at once as there are concurrent readers.
        if device == "cpu":
            held = weights
        else:
            readers = max(settings.io_threads, settings.prefetch_concurrency)
            held = sum(sorted(shard_sizes, reverse=True)[:readers])
        need = held * settings.host_headroom_factor
        budget = host_budget(settings.host_memory_limit_bytes)
        if budget.available < need:
            holder = f"loading {what}" if device == "cpu" else "host staging of the largest shards"
            raise InsufficientHostMemory(
                f"{holder} needs {memory_size(need)} of host memory ({memory_size(held)} x "
                f"host_headroom_factor {settings.host_headroom_factor:g}) but {budget.bound}; "
                f"{budget.remedy}, load to a GPU ({phrasing.device('cuda')}), or lower "
                f"host_headroom_factor ({phrasing.setting('host_headroom_factor', 1.0)})"
            )
    if measured is not None:
        free, total = measured
        need = weights * settings.gpu_headroom_factor
        if free < need:
            raise InsufficientGPUMemory(
                f"{device} has {memory_size(free)} free of {memory_size(total)} but loading "
                f"{what} needs {memory_size(need)} ({memory_size(weights)} of weights x "
                f"gpu_headroom_factor {settings.gpu_headroom_factor:g}); free GPU memory (other "
                "processes, caches), use a larger GPU, quantize or shard the model, or lower "
                f"gpu_headroom_factor ({phrasing.setting('gpu_headroom_factor', 1.0)})"
            )
    return measured
