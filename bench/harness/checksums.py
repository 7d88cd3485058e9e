"""The byte checksum every load benchmark reads tensors with: the wrapping int64 sum of a tensor's
8-byte words plus its tail bytes. It reads every byte, so a lazy (mmap) loader pays for its page
faults, and a loader that returns wrong bytes is caught."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CHECKSUM_MASK = (1 << 64) - 1


def bytes_checksum(u8: Any) -> int:
    """Returns the wrapping int64 sum of a flat uint8 torch tensor's 8-byte words, plus its tail
    bytes."""
    import torch

    n = u8.numel()
    n8 = n - n % 8
    s = 0
    if n8:
        words = u8[:n8]
        try:
            w64 = words.view(torch.int64)
        except RuntimeError:  # storage offset not a multiple of 8: copy (still a full read)
            w64 = words.clone().view(torch.int64)
        s = int(w64.sum())
    if n > n8:
        s += int(u8[n8:].sum())
    return s & CHECKSUM_MASK


def tensor_checksum(t: Any) -> int:
    """Returns bytes_checksum of a torch tensor's bytes in memory order (a full read)."""
    import torch

    return bytes_checksum(t.detach().contiguous().reshape(-1).view(torch.uint8))


def checksum_all(tensors: Mapping[str, Any]) -> int:
    """Returns the wrapping sum of every tensor's checksum, read on one thread: torch's two-thread
    reduction spin-waits for a descheduled partner, so on a shared box a neighbour's build would be
    billed to the loader."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        total = 0
        for t in tensors.values():
            total = (total + tensor_checksum(t)) & CHECKSUM_MASK
        return total
    finally:
        torch.set_num_threads(threads)
