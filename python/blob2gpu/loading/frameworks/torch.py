"""PyTorch consumer: torch.from_dlpack, which passes its current stream so that the stream waits
on the load's events instead of the host waiting."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.dlpack import from_dlpack


def convert(view: Any) -> torch.Tensor:
    """Return a torch.Tensor sharing the view's memory (no copy)."""
    return from_dlpack(view)
