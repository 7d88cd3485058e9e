"""Memory-fit checks made before any byte is downloaded: a model that does not fit with headroom
fails in milliseconds with both numbers and what to change, not minutes later mid-load.

A streamed GPU load (its consumer takes tensors as they arrive and drops them: stream(), a serving
engine) holds at most streamed_device_bytes of device memory beside what its consumer keeps
(csrc/arena_pool.hpp), so its check counts that bound, not the checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blob2gpu import phrasing
from blob2gpu.errors import InsufficientGPUMemory, InsufficientHostMemory
from blob2gpu.loading.host_memory import host_budget, memory_size

if TYPE_CHECKING:
    from blob2gpu import _core
    from blob2gpu.loading.request import LoadRequest
    from blob2gpu.settings import ResolvedSettings

# streamed_device_bytes=0: min(this, a share of the GPU's memory). A few GB keeps several tensor
# groups of the largest models' tensors (an embedding of 128k x 8k bf16 is 2 GB) landing while the
# consumer copies; a tenth leaves a small GPU nearly all its memory.
STREAMED_DEFAULT_CEILING = 4 << 30
STREAMED_DEFAULT_SHARE = 0.10
STREAMED_FLOOR = 1 << 20


def streamed_device_cap(request: LoadRequest, pipeline: _core.LoadPipeline) -> int:
    """The device memory a GPU load may hold for tensors its consumer has not dropped: the
    streamed_device_bytes setting, or when 0 min(4 GiB, 10% of the GPU's total memory). 0 when the
    load is not bounded: a cpu target, host staging, or a caller that keeps every tensor
    (request.streamed False: load()). `pipeline`: the device's core pipeline (its memory_info())."""
    if not request.streamed or request.device == "cpu" or request.host_staging:
        return 0
    configured = int(request.settings.streamed_device_bytes)
    if configured > 0:
        return configured
    info = pipeline.memory_info()
    return default_streamed_cap(int(info[1]) if info is not None else 0)


def default_streamed_cap(device_total: int) -> int:
    """streamed_device_bytes=0 on a GPU with `device_total` bytes of memory: min(4 GiB, 10%)."""
    share = int(device_total * STREAMED_DEFAULT_SHARE)
    return max(STREAMED_FLOOR, min(STREAMED_DEFAULT_CEILING, share))


def check_memory_fit(
    shard_sizes: list[int],
    device: str,
    pipeline: _core.LoadPipeline,
    settings: ResolvedSettings,
    host_staging: bool,
    what: str = "the checkpoint",
    streamed_cap: int = 0,
) -> tuple[int, int] | None:
    """Raise InsufficientGPUMemory / InsufficientHostMemory when the weights will not fit.

    shard_sizes: bytes each shard will hold in target memory; what: how messages name them;
    streamed_cap: a streamed GPU load's bound (streamed_device_cap; 0: the load holds all of it).
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
                f"host_headroom_factor {settings.host_headroom_factor:g}) but {budget.bound}",
                hint=f"{budget.remedy}, load to a GPU ({phrasing.device('cuda')}), or lower "
                f"host_headroom_factor ({phrasing.setting('host_headroom_factor', 1.0)})",
            )
    if measured is not None and 0 < streamed_cap < weights:
        free, total = measured
        need = streamed_cap * settings.gpu_headroom_factor
        if free < need:
            raise InsufficientGPUMemory(
                f"{device} has {memory_size(free)} free of {memory_size(total)} but streaming "
                f"{what} needs {memory_size(need)} ({memory_size(streamed_cap)} of "
                "streamed_device_bytes, the device memory a streamed load holds, x "
                f"gpu_headroom_factor {settings.gpu_headroom_factor:g})",
                hint="free GPU memory (other processes, caches), or lower streamed_device_bytes "
                f"({phrasing.setting('streamed_device_bytes', '1GiB')}) or "
                f"gpu_headroom_factor ({phrasing.setting('gpu_headroom_factor', 1.0)})",
            )
    elif measured is not None:
        free, total = measured
        need = weights * settings.gpu_headroom_factor
        if free < need:
            raise InsufficientGPUMemory(
                f"{device} has {memory_size(free)} free of {memory_size(total)} but loading "
                f"{what} needs {memory_size(need)} ({memory_size(weights)} of weights x "
                f"gpu_headroom_factor {settings.gpu_headroom_factor:g})",
                hint="free GPU memory (other processes, caches), use a larger GPU, quantize or "
                "shard the model, or lower gpu_headroom_factor "
                f"({phrasing.setting('gpu_headroom_factor', 1.0)})",
            )
    return measured
