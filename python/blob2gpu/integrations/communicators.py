"""The collectives a fan-out's exchange (distributed.py) runs, behind one interface with two
implementations: HostCommunicator (a torch.distributed group that moves CPU tensors: gloo, the
CPU build and the tests) and DeviceCommunicator (a group whose backend moves GPU memory: NCCL,
vLLM's tensor-parallel device group), which writes the peers' device memory directly.

Small messages (which shards, header bytes, whether a rank failed) always go over the host group;
only the weights' bytes take the device group. The exchange code is the same for both: it hands
the communicator the core's destination views (uint8 TensorViews over this load's own memory)
and the stream that the core orders the writes by.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup

    from blob2gpu import _core


class Communicator(Protocol):
    """A group's collectives, as the exchange uses them; every call is a collective (every rank
    makes it, in the same order)."""

    rank: int
    world: int
    kind: str  # "host" or "device": where the weights' bytes travel (the load report's words)

    def bind(self) -> None:
        """Make the calling thread (the exchange's own) use the group's device."""
        ...

    def all_gather_object(self, value: object) -> list[object]:
        """Every rank's `value` (picklable), by rank."""
        ...

    def max_int(self, value: int) -> int:
        """The largest `value` of the group."""
        ...

    def broadcast_host(self, tensor: torch.Tensor, src: int) -> None:
        """Rank `src`'s bytes of a CPU uint8 tensor into every rank's."""
        ...

    def broadcast_destinations(self, views: Sequence[_core.TensorView], src: int) -> None:
        """Rank `src`'s bytes of each view into every rank's view of the same bytes (the core's
        destinations: equal sizes, in the same order on every rank), written on stream()."""
        ...

    def stream(self) -> int:
        """The CUDA stream that broadcast_destinations' writes are ordered on, for
        LoadSession.order_writes and arrived, as DLPack names streams (1: the legacy default
        stream, 2: the per-thread one, else a handle); -1: none (host memory, done on return)."""
        ...


class HostCommunicator:
    """A torch.distributed group over host memory (gloo): `group` None is the default group;
    rank and world are this process's rank in it and its size."""

    kind = "host"

    def __init__(self, rank: int, world: int, group: ProcessGroup | None = None) -> None:
        self.rank, self.world, self.group = rank, world, group

    def bind(self) -> None:
        pass

    def all_gather_object(self, value: object) -> list[object]:
        import torch.distributed as dist

        out: list[object] = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out

    def max_int(self, value: int) -> int:
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def broadcast_host(self, tensor: torch.Tensor, src: int) -> None:
        broadcast(tensor, src, self.group)

    def broadcast_destinations(self, views: Sequence[_core.TensorView], src: int) -> None:
        from torch.utils.dlpack import from_dlpack

        for view in views:
            broadcast(from_dlpack(view), src, self.group)

    def stream(self) -> int:
        return -1


class DeviceCommunicator(HostCommunicator):
    """The group's host collectives on `group` (gloo) and the weights' bytes on `device_group`
    (NCCL) of `device` ('cuda:N'): each view is imported with torch.from_dlpack on the device's
    current stream (which then waits for the bytes the view already holds) and broadcast there;
    a blocking NCCL collective leaves that stream waiting for its end, so events the core
    records on it after the call cover the writes (and the sender's reads)."""

    kind = "device"

    def __init__(
        self,
        rank: int,
        world: int,
        group: ProcessGroup | None,
        device_group: ProcessGroup,
        device: str,
    ) -> None:
        super().__init__(rank, world, group)
        self.device_group, self.device = device_group, device

    def bind(self) -> None:
        import torch

        torch.cuda.set_device(self.device)  # a new thread's current device is cuda:0
        # A stream of the exchange's own: on the legacy default stream (a new thread's current
        # one) the broadcasts and their waits would queue behind, and ahead of, the consumer's
        # work on the same stream (vLLM's weight loaders), serializing what can overlap. Pool
        # streams live as long as the process, so the handle the core keeps stays valid.
        self._exchange_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        torch.cuda.set_stream(self._exchange_stream)

    def broadcast_destinations(self, views: Sequence[_core.TensorView], src: int) -> None:
        from torch.utils.dlpack import from_dlpack

        for view in views:
            broadcast(from_dlpack(view), src, self.device_group)

    def stream(self) -> int:
        import torch

        handle = int(torch.cuda.current_stream().cuda_stream)  # bind()'s, on the exchange thread
        return handle or 1  # the NULL handle is the legacy default stream, as torch passes it


def broadcast(tensor: torch.Tensor, src: int, group: ProcessGroup | None) -> None:
    """torch.distributed.broadcast from rank `src` of `group` (None: of the default group)."""
    import torch.distributed as dist

    if group is None:
        dist.broadcast(tensor, src=src)
    else:  # src as a global rank: group_src= exists only from torch 2.6 (vLLM 0.7 has 2.5)
        dist.broadcast(tensor, src=dist.get_global_rank(group, src), group=group)
