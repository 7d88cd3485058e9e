"""NumPy consumer (host memory only)."""

from __future__ import annotations

import numpy

from blob2gpu import _core


def convert(view: _core.TensorView) -> numpy.ndarray:
    """Return a numpy.ndarray sharing the view's memory (no copy)."""
    return numpy.from_dlpack(view)
