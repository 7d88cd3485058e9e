"""NumPy consumer (host memory only)."""

from __future__ import annotations

from typing import Any

import numpy


def convert(view: Any) -> numpy.ndarray:
    """Return a numpy.ndarray sharing the view's memory (no copy)."""
    return numpy.from_dlpack(view)
