"""blob2gpu: stream safetensors checkpoints into GPU (or CPU) memory with the fewest copies.

import blob2gpu
state_dict = blob2gpu.load("model/", device="cuda")          # {name: torch.Tensor}
with blob2gpu.open("model/", device="cuda") as checkpoint:   # tensors as shards arrive
    for name, tensor in checkpoint: ...
"""

from blob2gpu import errors
from blob2gpu._version import __version__
from blob2gpu.api import fetch_aux, load, open
from blob2gpu.errors import Blob2GpuError
from blob2gpu.loading.checkpoint import Checkpoint
from blob2gpu.loading.loader import Loader
from blob2gpu.operations.report import LoadReport

__all__ = [
    "Blob2GpuError",
    "Checkpoint",
    "LoadReport",
    "Loader",
    "__version__",
    "errors",
    "fetch_aux",
    "load",
    "open",
]
