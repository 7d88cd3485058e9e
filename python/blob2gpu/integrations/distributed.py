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
from typing import Any

from blob2gpu.errors import InvalidArgument, LoadCancelled
from blob2gpu.redaction import redact

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

    def __init__(self, rank: int, world: int, group: Any = None) -> None:
        self.rank, self.world, self.group = rank, world, group
        self.exchange: GroupExchange | None = None

    def shards_to_read(self, listed: Any, selected: Any) -> Any:
        """Every listed shard some rank's selection needs, in listing order (a collective)."""
        import torch.distributed as dist

        kept = {s.name for s in selected.shards}
        needs = [s.name in kept for s in listed.shards]
        group_needs: list[Any] = [None] * self.world
        dist.all_gather_object(group_needs, needs, group=self.group)
        shards = [s for i, s in enumerate(listed.shards) if any(n[i] for n in group_needs)]
        return dataclasses.replace(listed, shards=tuple(shards))

    def start(self, prepared: Any, pipeline: Any) -> tuple[Any, Any]:
        from blob2gpu.loading.fetch import start_fed_session

        session = start_fed_session(prepared, pipeline)
        self.exchange = GroupExchange(session, prepared, self.rank, self.world, self.group)
        return session, self.exchange


class GroupExchange:
    """Feeds one session from the group: shard by shard (the same order on every rank), this
    rank fetches its byte ranges, every range is broadcast from its owner, and the shard's bytes
    go through the pipeline as a feeder's would. Host memory holds one shard at a time.

    start() runs the exchange on a thread of its own, so the caller consumes shard k (iterating
    the Checkpoint) while shard k+1 is exchanged; the group's collectives run on that thread
    only, in the same order on every rank."""

    def __init__(self, session: Any, prepared: Any, rank: int, world: int, group: Any = None):
        self._session = session
        self._prepared = prepared
        self._rank = rank
        self._group = group
        self._thread: threading.Thread | None = None
        self._owners = byte_owners([s.size for s in prepared.plan.shards], world)
        self._throttle = _throttle(prepared)
        self._reader = _range_reader(prepared.source, self._throttle)
        container = prepared.source.container
        self._retry = container.retry if container is not None else None  # the load's policy
        self.error: BaseException | None = None

    @property
    def requests(self) -> int:
        return int(self._reader.requests)

    @property
    def shard_retries(self) -> list[int]:
        return [self._reader.retries_of(ref.path) for ref in self._prepared.plan.shards]

    @property
    def retries(self) -> int:
        return self._retry.retries if self._retry is not None else 0

    @property
    def throttle_stats(self) -> Any:
        """Throttled answers, and the concurrency and range size this rank settled at (None for
        local files)."""
        return self._throttle.stats() if self._throttle is not None else None

    @property
    def retry_wait_seconds(self) -> float:
        return self._retry.waited_seconds if self._retry is not None else 0.0

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

        from blob2gpu.sources.feeding import feed_from_memory

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

    def _fetch(self, ref: Any, view: memoryview, parts: list[tuple[int, int]]) -> None:
        """Read this rank's byte ranges `parts` of shard `ref` into `view`: from Blob, in ranges
        of the throttle's size with as many in flight as it allows (prefetch_concurrency at
        most), as an ordinary load's feeder does; from local files, one read each."""
        if self._throttle is None:
            for start, end in parts:
                self._reader.read_into(ref, start, view[start:end])
            return
        pending = list(reversed(parts))
        lock = threading.Lock()
        failed: list[BaseException] = []

        def next_piece() -> tuple[int, int] | None:
            with lock:
                if failed or not pending:
                    return None
                start, end = pending.pop()
                cut = min(end, start + self._throttle.range_bytes)
                if cut < end:
                    pending.append((cut, end))
                return start, cut

        def worker() -> None:
            while (piece := next_piece()) is not None:
                try:
                    self._reader.read_into(ref, piece[0], view[piece[0] : piece[1]])
                except BaseException as error:
                    with lock:
                        failed.append(error)
                    # The load has failed: a thread waiting out throttling (up to
                    # retry_throttled_seconds) or its pace stops now, as a feeder's threads do
                    # (its first failure sets the load's stop), not when its wait is over.
                    self._reader.stop()

        threads = [
            threading.Thread(target=worker, name=f"blob2gpu-fan-out-get-{i}", daemon=True)
            for i in range(self._throttle.ceiling)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failed:
            raise failed[0]


def _throttle(prepared: Any) -> Any:
    """The throttling control of a Blob fan-out's ranged GETs (as an ordinary load's: up to
    prefetch_concurrency, a slow start only on a node throttled lately, ranges from chunk_bytes
    up to the staging slot, the node's budget shared), or None for local files."""
    if prepared.source.container is None:
        return None
    from blob2gpu.loading.fetch import node_budget, range_bytes
    from blob2gpu.sources.azure.throttle import ThrottleControl

    slot = prepared.settings.staging_slot_bytes
    chunk = range_bytes(prepared, slot)
    ceiling = prepared.settings.prefetch_concurrency
    return ThrottleControl(ceiling, chunk, max(chunk, slot), node_budget(prepared))


def _range_reader(source: Any, throttle: Any) -> Any:
    """What fetches this rank's ranges: the same ranged GETs (etag pinning, retries, the
    throttle) as every Blob load, or reads of the local files."""
    if source.container is None:
        from blob2gpu.sources.local import LocalRangeReader

        return LocalRangeReader()
    from blob2gpu.sources.azure.range_reader import BlobRangeReader

    container = source.container
    return BlobRangeReader(container.client, container.location, container.retry, None, throttle)


def load(
    uri: str | None,
    device: str,
    framework: str,
    credential: Any,
    loader_settings: dict[str, Any],
    tensor_names: Any = None,
    tensor_filter: Any = None,
) -> dict[str, Any]:
    """blob2gpu.load(..., distributed=True): see the module docstring. Needs an initialized
    torch.distributed process group (gloo for cpu tensors; the exchange runs on host memory).

    With a tensor selection (tensor_names / tensor_filter, which may differ per rank) each rank
    keeps only its tensors; the group fetches the union of what its ranks need (whole shards
    holding a wanted tensor, one copy per group) and exchanges it as above. Every check of an
    ordinary load runs (loading.prepare): only who fetches which bytes differs.

    Returns {name: tensor} on every rank. Raises InvalidArgument without a process group, and
    every error of blob2gpu.load (the same on every rank for source and header errors).
    """
    import torch.distributed as dist

    from blob2gpu.loading.loader import Loader
    from blob2gpu.loading.request import LoadRequest

    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidArgument(
            "distributed=True needs torch.distributed.init_process_group() "
            "first (gloo on CPUs, or a group whose backend handles CPU tensors)"
        )
    strategy = GroupFanOut(dist.get_rank(), dist.get_world_size())
    with Loader(**loader_settings) as loader:
        request = LoadRequest.make(
            uri,
            device,
            framework,
            credential,
            loader.settings,
            {},
            tensor_names,
            tensor_filter,
            streamed=False,  # every tensor is kept: the load holds the checkpoint, as load() does
        )
        with loader.start(request, strategy) as checkpoint:
            return checkpoint.to_dict()
