"""torch.distributed fan-out: the ranks of a process group split a checkpoint's bytes, each
fetches only its part from storage, and broadcasts it to the others, so the storage account
serves one copy per group instead of one per rank.

Every rank then runs the same shards through its own pipeline (header checks, manifest checks,
staging, device copies), so each rank ends with the whole state dict on its own device. Host
memory holds one shard at a time. Works for any world size, for fewer shards than ranks, and for
uneven sizes: the split is by bytes, not by shard.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING

from blob2gpu import _core
from blob2gpu.errors import InvalidArgument, LoadCancelled
from blob2gpu.redaction import redact
from blob2gpu.sources.feeding import FeedStats, Fetch, feed_from_memory
from blob2gpu.sources.plan import ShardPlan, ShardRef

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from blob2gpu.loading.frameworks import Tensor
    from blob2gpu.loading.loader import Loader
    from blob2gpu.loading.prepare import PreparedLoad
    from blob2gpu.loading.request import LoadRequest

ALIGN = 1 << 20  # rank boundaries fall on MiB boundaries: large, aligned requests
STOP_WAIT_SECONDS = 30.0  # how long closing a fan-out load waits for its exchange thread


def byte_owners(sizes: list[int], world: int) -> list[list[tuple[int, int, int]]]:
    """For each shard, the (rank, start, end) byte ranges each rank fetches (shard coordinates).

    The checkpoint's bytes, shards end to end, are cut into `world` nearly equal MiB-aligned
    parts; rank r fetches part r.
    """
    total = sum(sizes)
    per_rank = -(-total // world)
    per_rank = -(-per_rank // ALIGN) * ALIGN
    owners: list[list[tuple[int, int, int]]] = []
    base = 0
    for size in sizes:
        ranges = []
        pos = 0
        while pos < size:
            rank = min((base + pos) // per_rank, world - 1)
            end = min(size, (rank + 1) * per_rank - base)
            ranges.append((rank, pos, end))
            pos = end
        owners.append(ranges)
        base += size
    return owners


class GroupFanOut:
    """The FetchStrategy of a fan-out load: the group reads every shard some rank needs, each
    rank fetching its part of the bytes (byte_owners) and broadcasting it. The node's NVMe cache
    is not used: the bytes come from the group, not from this node's storage.

    rank, world: this process's rank in `group` and the group's size; group: the process group
    (None: the default group), e.g. a serving engine's tensor-parallel group."""

    uses_node_cache = False

    def __init__(self, rank: int, world: int, group: ProcessGroup | None = None) -> None:
        self.rank, self.world, self.group = rank, world, group
        self.exchange: GroupExchange | None = None

    def shards_to_read(self, listed: ShardPlan, selected: ShardPlan) -> ShardPlan:
        """Every listed shard some rank's selection needs, in listing order (a collective)."""
        import torch.distributed as dist

        kept = {s.name for s in selected.shards}
        needs = [s.name in kept for s in listed.shards]
        group_needs: list[list[bool] | None] = [None] * self.world
        dist.all_gather_object(group_needs, needs, group=self.group)
        shards = [
            s
            for i, s in enumerate(listed.shards)
            if any(n is not None and n[i] for n in group_needs)
        ]
        return dataclasses.replace(listed, shards=tuple(shards))

    def start(self, prepared: PreparedLoad, pipeline: _core.LoadPipeline) -> Fetch:
        session = prepared.start_fed(pipeline)
        self.exchange = GroupExchange(session, prepared, self.rank, self.world, self.group)
        return Fetch(session, prepared.plan, self.exchange)


class GroupExchange:
    """Feeds one session from the group: shard by shard (the same order on every rank), this
    rank fetches its byte ranges, every range is broadcast from its owner, and the shard's bytes
    go through the pipeline as a feeder's would. Host memory holds one shard at a time.

    start() runs the exchange on a thread of its own, so the caller consumes shard k (iterating
    the Checkpoint) while shard k+1 is exchanged; the group's collectives run on that thread
    only, in the same order on every rank."""

    def __init__(
        self,
        session: _core.LoadSession,
        prepared: PreparedLoad,
        rank: int,
        world: int,
        group: ProcessGroup | None = None,
    ) -> None:
        self._session = session
        self._prepared = prepared
        self._rank = rank
        self._group = group
        self._thread: threading.Thread | None = None
        self._owners = byte_owners([s.size for s in prepared.plan.shards], world)
        # This rank's ranged reads: the same as every load of its source (a Blob load's etag
        # pinning, retries and throttling), or reads of the local files.
        self._ranges = prepared.source.ranges(prepared)
        self.error: BaseException | None = None

    def stats(self) -> FeedStats:
        """What this rank's reads counted (throttling: the concurrency and range size it settled
        at)."""
        return self._ranges.stats(self._prepared.plan)

    def start(self) -> GroupExchange:
        self._thread = threading.Thread(target=self._run_or_abort, name="blob2gpu-fan-out")
        self._thread.daemon = True  # a peer that died mid-broadcast must not hold up exit
        self._thread.start()
        return self

    def stop(self) -> None:
        """Cancel the session (a feed waiting for staging returns) and wait for the thread; one
        blocked in a collective whose peer is gone is left to the group's timeout."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._session.cancel()
            thread.join(timeout=STOP_WAIT_SECONDS)

    def _run_or_abort(self) -> None:
        try:
            self.run()
        except BaseException as error:
            # The consumer (Checkpoint) raises this typed error instead of the core's echo.
            self.error = error
            kind = "LoadCancelled" if isinstance(error, LoadCancelled) else "SourceReadError"
            try:
                self._session.abort(kind, redact(error))
            except Exception:
                pass

    def run(self) -> None:
        """Exchange and feed every shard; raises what fetching or the pipeline raised."""
        import torch
        import torch.distributed as dist

        plan = self._prepared.plan
        slot_bytes = self._prepared.settings.staging_slot_bytes
        for index, ref in enumerate(plan.shards):
            buffer = torch.empty(ref.size, dtype=torch.uint8)
            view = buffer.numpy().data  # the tensor's bytes, as a memoryview
            mine = [(start, end) for rank, start, end in self._owners[index] if rank == self._rank]
            self._fetch(ref, view, mine)
            for owner, start, end in self._owners[index]:
                if self._group is None:
                    dist.broadcast(buffer[start:end], src=owner)
                else:
                    dist.broadcast(buffer[start:end], group=self._group, group_src=owner)
            feed_from_memory(self._session, index, view, slot_bytes)

    def _fetch(self, ref: ShardRef, view: memoryview, parts: list[tuple[int, int]]) -> None:
        """Read this rank's byte ranges `parts` of shard `ref` into `view`, as many reads at
        once and of the size its source's reader says (from Blob: as many in flight as the
        load's throttling allows, prefetch_concurrency at most, as an ordinary load's feeder;
        from local files: one read each)."""
        ranges = self._ranges
        pending = list(reversed(parts))
        lock = threading.Lock()
        failed: list[BaseException] = []

        def next_piece() -> tuple[int, int] | None:
            with lock:
                if failed or not pending:
                    return None
                start, end = pending.pop()
                cut = min(end, start + ranges.piece_bytes())
                if cut < end:
                    pending.append((cut, end))
                return start, cut

        def worker() -> None:
            while (piece := next_piece()) is not None:
                try:
                    ranges.read_into(ref, piece[0], view[piece[0] : piece[1]])
                except BaseException as error:
                    with lock:
                        failed.append(error)
                    # The load has failed: a thread waiting out throttling (up to
                    # retry_throttled_seconds) or its pace stops now, as a feeder's threads do
                    # (its first failure sets the load's stop), not when its wait is over.
                    ranges.stop()

        threads = [
            threading.Thread(target=worker, name=f"blob2gpu-fan-out-get-{i}", daemon=True)
            for i in range(ranges.parallel)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failed:
            raise failed[0]


def load(loader: Loader, request: LoadRequest) -> dict[str, Tensor]:
    """blob2gpu.load(..., distributed=True): `request` fetched by the group (GroupFanOut, see the
    module) through `loader`. Needs an initialized torch.distributed process group (gloo for cpu
    tensors; the exchange runs on host memory).

    With a tensor selection (which may differ per rank) each rank keeps only its tensors; the
    group fetches the union of what its ranks need (whole shards holding a wanted tensor, one
    copy per group) and exchanges it as above. Every check of an ordinary load runs
    (loading.prepare): only who fetches which bytes differs.

    Returns {name: tensor} on every rank. Raises InvalidArgument without a process group, and
    every error of blob2gpu.load (the same on every rank for source and header errors).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidArgument(
            "distributed=True needs torch.distributed.init_process_group() "
            "first (gloo on CPUs, or a group whose backend handles CPU tensors)"
        )
    strategy = GroupFanOut(dist.get_rank(), dist.get_world_size())
    with loader.start(request, strategy) as checkpoint:
        return checkpoint.to_dict()
