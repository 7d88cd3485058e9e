"""PyTorch consumer: torch.from_dlpack, which passes its current stream so that the stream waits
on the load's events instead of the host waiting."""

from __future__ import annotations

import torch
from torch.utils.dlpack import from_dlpack

from blob2gpu import _core


def convert(view: _core.TensorView) -> torch.Tensor:
    """Return a torch.Tensor sharing the view's memory (no copy)."""
    return from_dlpack(view)
