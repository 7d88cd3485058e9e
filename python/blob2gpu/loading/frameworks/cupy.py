"""CuPy consumer: cupy.from_dlpack passes its current stream, which waits on the load's events."""

from __future__ import annotations

import cupy

from blob2gpu import _core
from blob2gpu.loading.frameworks import Tensor


def convert(view: _core.TensorView) -> Tensor:
    """Return a cupy.ndarray sharing the view's device memory (no copy)."""
    return cupy.from_dlpack(view)
