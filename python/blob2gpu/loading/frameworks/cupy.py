"""CuPy consumer: cupy.from_dlpack passes its current stream, which waits on the load's events."""

from __future__ import annotations

from typing import Any

import cupy


def convert(view: Any) -> Any:
    """Return a cupy.ndarray sharing the view's device memory (no copy)."""
    return cupy.from_dlpack(view)
