"""LoadRequest: what a caller asked for (URI, device, framework, credential, selection, settings),
checked and in canonical form before anything is read, and the checks that make it so."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from blob2gpu import _core
from blob2gpu.errors import InvalidArgument
from blob2gpu.settings import ResolvedSettings

SOURCE_URI_ENV = "MODEL_SOURCE_URI"

# Settings fixed when a device's pipeline is built; the others may change per load.
PIPELINE_SETTINGS = (
    "staging_slots",
    "staging_slot_bytes",
    "copy_streams",
    "io_threads",
    "use_pinned_host_fallback",
    "pinned_staging_bytes",
    "bind_numa_node",
)


def current_cuda_device() -> int:
    """The caller's current GPU, what device='cuda' means (as in torch): torch's current device
    when torch is imported and has initialized CUDA, else the device of the CUDA context current on
    this thread (CuPy, a framework, the driver API), else 0. Never raises."""
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


def source_uri(uri: str | os.PathLike[str] | None) -> str:
    """`uri` (a path as a string), or $MODEL_SOURCE_URI when it is None; raises InvalidArgument
    when both are missing."""
    if uri:
        return os.fspath(uri)
    if os.environ.get(SOURCE_URI_ENV):
        return os.environ[SOURCE_URI_ENV]
    raise InvalidArgument(f"no checkpoint URI given and {SOURCE_URI_ENV} is not set")


@dataclass(frozen=True, kw_only=True)
class LoadRequest:
    """One load as asked for, checked and in canonical form: the one request type of every entry
    point (blob2gpu.load and open, Loader.load and open, the torch.distributed fan-out, the vLLM
    loader), built by keyword. Loader.request() makes it from what a caller passed (a URI from
    $MODEL_SOURCE_URI, 'cuda' as the current device, the selection given once, the per-load
    settings applied to the Loader's)."""

    uri: str
    settings: ResolvedSettings  # this load's effective settings
    device: str = "cpu"  # 'cpu' or 'cuda:N'
    framework: str = "torch"
    credential: object = None  # for storage that needs one (an azure credential, key or SAS)
    tensor_names: frozenset[str] | None = None  # at most one of names and filter
    tensor_filter: Callable[[str], bool] | None = None
    # The consumer takes tensors as they arrive (a Checkpoint: open(), a serving engine), so a GPU
    # load's device memory is bounded (streamed_device_bytes); False: the caller keeps every
    # tensor (load()), and the load holds the whole checkpoint.
    streamed: bool = True

    @property
    def host_staging(self) -> bool:
        """Whether a GPU load passes each shard through host memory whole (direct_gpu_load off)."""
        return self.device != "cpu" and not self.settings.direct_gpu_load
