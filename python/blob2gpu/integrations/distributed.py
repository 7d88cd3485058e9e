"""torch.distributed fan-out: the ranks of a process group split a checkpoint's bytes, each
fetches only its part from storage, and the group shares it, so the storage account serves one
copy per group instead of one per rank.

Shard by shard (the same order on every rank): each rank fetches its part into host memory; the
rank holding the header shares it over the host group and every rank parses it in its own
session. Then the data moves part by part, each within one of the shard's tensor groups: its
fetcher checks it against the manifest and copies it host-to-device into its own memory
(LoadSession.land_from_host), and the group's communicator broadcasts it from there into every
other rank's memory at the same place (communicators.py: NCCL device to device on GPUs, gloo on
the CPU build; the same code). So a rank copies host-to-device only its own part, host memory
holds one part of one shard, and a streamed load's bound on device memory holds on every rank
(the parts follow its tensor groups, which take memory in hand-out order).

A shard checked by its Content-MD5 (which needs every byte, in order, in one process), or whose
tensor groups differ between ranks (each rank selecting other tensors), or a GPU target without a
device communicator, is shared whole over the host group instead, and every rank feeds all of it
through its own checks. Works for any world
size, for fewer shards than ranks, and for uneven sizes: the split is by bytes, not by shard.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import TYPE_CHECKING

from blob2gpu import _core, errors
from blob2gpu.errors import InvalidArgument, LoadCancelled
from blob2gpu.integrations.communicators import Communicator, DeviceCommunicator, HostCommunicator
from blob2gpu.redaction import redact
from blob2gpu.sources.feeding import FeedStats, Fetch, feed_range, split_range
from blob2gpu.sources.plan import ShardPlan, ShardRef

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup

    from blob2gpu.loading.frameworks import Tensor
    from blob2gpu.loading.loader import Loader
    from blob2gpu.loading.prepare import PreparedLoad
    from blob2gpu.loading.request import LoadRequest

ALIGN = 1 << 20  # rank boundaries fall on MiB boundaries: large, aligned requests
STOP_WAIT_SECONDS = 30.0  # how long closing a fan-out load waits for its exchange thread
HEADER_LIMIT = 8 + _core.MAX_HEADER_BYTES  # the core's cap on a header: a longer one is not read


def byte_owners(
    sizes: list[int], world: int, align: int = ALIGN
) -> list[list[tuple[int, int, int]]]:
    """For each shard, the (rank, start, end) byte ranges each rank fetches (shard coordinates).

    The checkpoint's bytes, shards end to end, are cut into `world` nearly equal MiB-aligned
    parts; rank r fetches part r, its cuts within a shard moved up to a multiple of `align` in
    the shard (a manifest's chunk: each chunk is fetched, and checked, by one rank).
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
            end = min(size, -(-end // align) * align)
            ranges.append((rank, pos, end))
            pos = end
        owners.append(ranges)
        base += size
    return owners


class GroupFanOut:
    """The FetchStrategy of a fan-out load: the group reads every shard some rank needs, each
    rank fetching its part of the bytes (byte_owners) and sharing it. The node's NVMe cache is
    not used: the bytes come from the group, not from this node's storage.

    rank, world: this process's rank in `group` and the group's size; group: the process group
    of host tensors (None: the default group), e.g. a serving engine's tensor-parallel gloo
    group; device_group: the same ranks' group over GPU memory (NCCL), used when the load's
    target is a GPU; communicator: the group's collectives, when given (tests), in place of
    those two."""

    uses_node_cache = False

    def __init__(
        self,
        rank: int,
        world: int,
        group: ProcessGroup | None = None,
        device_group: ProcessGroup | None = None,
        communicator: Communicator | None = None,
    ) -> None:
        self.rank, self.world, self.group = rank, world, group
        self.device_group = device_group
        self.communicator: Communicator = communicator or HostCommunicator(rank, world, group)
        self.exchange: GroupExchange | None = None

    def shards_to_read(self, listed: ShardPlan, selected: ShardPlan) -> ShardPlan:
        """Every listed shard some rank's selection needs, in listing order (a collective)."""
        kept = {s.name for s in selected.shards}
        needs = [s.name in kept for s in listed.shards]
        group_needs = self.communicator.all_gather_object(needs)
        shards = [
            s
            for i, s in enumerate(listed.shards)
            if any(isinstance(n, list) and n[i] for n in group_needs)
        ]
        return dataclasses.replace(listed, shards=tuple(shards))

    def start(self, prepared: PreparedLoad, pipeline: _core.LoadPipeline) -> Fetch:
        session = prepared.start_fed(pipeline)
        communicator = self.communicator
        device = prepared.request.device
        if self.device_group is not None and device.startswith("cuda"):
            communicator = DeviceCommunicator(
                self.rank, self.world, self.group, self.device_group, device
            )
        self.exchange = GroupExchange(session, prepared, communicator)
        return Fetch(session, prepared.plan, self.exchange)


class GroupExchange:
    """Feeds one session from the group (see the module): shard by shard, this rank fetches its
    byte ranges, the header is shared and parsed everywhere, then each part is landed by its
    fetcher and broadcast into the others' memory.

    start() runs the exchange on a thread of its own, so the caller consumes shard k (iterating
    the Checkpoint) while shard k+1 is exchanged; the group's collectives run on that thread
    only, in the same order on every rank. A rank that fails to fetch or check its part tells
    the group, and every rank fails with its error type."""

    def __init__(
        self, session: _core.LoadSession, prepared: PreparedLoad, communicator: Communicator
    ) -> None:
        self._session = session
        self._prepared = prepared
        self._comm = communicator
        self._rank = communicator.rank
        self._thread: threading.Thread | None = None
        manifest = prepared.manifest
        align = math.lcm(ALIGN, manifest.chunk_bytes) if manifest is not None else ALIGN
        sizes = [s.size for s in prepared.plan.shards]
        self._owners = byte_owners(sizes, communicator.world, align)
        # This rank's ranged reads: the same as every load of its source (a Blob load's etag
        # pinning, retries and throttling), or reads of the local files.
        self._ranges = prepared.source.ranges(prepared)
        self._chunk = prepared.settings.staging_slot_bytes
        # Parts go straight into the load's memory when the communicator can write it: host
        # memory (the cpu target) or a device communicator's GPU memory. A host group with a GPU
        # target shares whole shards on the host instead.
        on_gpu = prepared.request.device.startswith("cuda")
        self._in_place = communicator.kind == "device" or not on_gpu
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
        self._comm.bind()
        for index, ref in enumerate(self._prepared.plan.shards):
            self._shard(index, ref)

    def _shard(self, index: int, ref: ShardRef) -> None:
        import torch

        owners = self._owners[index]
        parts: list[tuple[int, torch.Tensor]] = []  # this rank's (start, bytes)
        header: torch.Tensor | None = None
        error: BaseException | None = None
        try:
            for rank, start, end in owners:
                if rank == self._rank:
                    part = torch.empty(end - start, dtype=torch.uint8)
                    self._fetch(ref, part.numpy().data, start, [(start, end)])
                    parts.append((start, part))
            if owners and owners[0][0] == self._rank:
                header = self._header_of(ref, parts[0][1])
        except BaseException as failure:
            error = failure
        self._agree(error)
        header = self._share_header(owners[0][0] if owners else 0, header)
        data_offset = 0
        try:  # a rank that stops here must say so: its peers wait in the next collective
            data_offset = self._feed_header(index, header)
        except BaseException as failure:
            error = failure
        self._agree(error)
        if not self._same_layout_everywhere(index):
            self._share_whole(index, ref, owners, parts)
            return
        # Each rank checks its whole part first; then the group's memory takes it group by
        # group, in the order the consumer is handed the groups.
        try:
            for start, part in parts:
                if start + part.numel() > data_offset:
                    skip = max(0, data_offset - start)
                    self._session.check_fetched(index, start + skip, part[skip:].numpy().data)
        except BaseException as failure:
            error = failure
        self._agree(error)
        self._session.exchange_checked(index)
        self._exchange_parts(index, owners, parts)

    def _header_of(self, ref: ShardRef, first: torch.Tensor) -> torch.Tensor:
        """The shard's header bytes (8 + its length), from the first part (read further when the
        header is longer); a length past the file or the parser's cap: the 8 bytes alone, for
        the core to refuse."""
        import torch

        have = first.numel()
        n = 8 + int.from_bytes(first[: min(8, have)].numpy().tobytes(), "little")
        if have < 8 or n > min(ref.size, HEADER_LIMIT):
            return first[: min(8, have)].clone()
        if n <= have:
            return first[:n].clone()
        header = torch.empty(n, dtype=torch.uint8)
        header[:have] = first
        self._fetch(ref, header.numpy().data[have:], have, [(have, n)])
        return header

    def _share_header(self, src: int, header: torch.Tensor | None) -> torch.Tensor:
        """Rank `src`'s header bytes, on every rank (over the host group)."""
        import torch

        size = torch.tensor([header.numel() if header is not None else 0], dtype=torch.int64)
        self._comm.broadcast_host(size, src)
        if header is None:
            header = torch.empty(int(size.item()), dtype=torch.uint8)
        self._comm.broadcast_host(header, src)
        return header

    def _feed_header(self, index: int, header: torch.Tensor) -> int:
        """Feed the header's bytes to the session, in the protocol's ranges (feeding.py); returns
        where the shard's data starts."""
        data = header.numpy().data
        start, end = 0, min(len(data), self._chunk)
        while True:
            landing = self._session.acquire(index, start, end - start)
            if landing is None:
                raise LoadCancelled("the load was cancelled")
            try:
                landing.view[:] = data[start:end]
            except BaseException:
                self._session.release(landing)
                raise
            status = self._session.commit(landing)
            if status.header_ready:
                return int(status.data_offset)
            start, end = status.header_have, status.data_offset
            if end > len(data):  # the core reads a longer header than the fetcher shared
                raise errors.HeaderTruncated(
                    f"shard #{index}: the header shared by the group has {len(data)} bytes, "
                    f"its length field says {end}"
                )

    def _same_layout_everywhere(self, index: int) -> bool:
        """Whether every rank lands the shard's data in the same places (a collective)."""
        session = self._session
        mine = None
        if self._in_place and session.exchangeable(index):
            mine = (session.exchange_steps(index), session.destinations(index))
        everyone = self._comm.all_gather_object(mine)  # every rank joins, whatever its answer
        return mine is not None and all(x == mine for x in everyone)

    def _exchange_parts(
        self, index: int, owners: list[tuple[int, int, int]], parts: list[tuple[int, torch.Tensor]]
    ) -> None:
        """Each part, within each tensor group: landed by its fetcher, broadcast into the others'
        memory by the communicator, counted everywhere."""
        session, comm = self._session, self._comm
        stream = comm.stream()
        for step_begin, step_end in session.exchange_steps(index):
            for owner, start, end in owners:
                begin, stop = max(start, step_begin), min(end, step_end)
                if begin >= stop:
                    continue
                views = session.open_destinations(index, begin, stop)
                error: BaseException | None = None
                if views is None:  # cancelled: said to the group before any broadcast
                    error = LoadCancelled("the load was cancelled")
                elif owner == self._rank:
                    try:
                        base, part = next((s, p) for s, p in parts if s == start)
                        data = part[begin - base : stop - base].numpy().data
                        if not session.land_from_host(index, begin, data):
                            raise LoadCancelled("the load was cancelled")
                    except BaseException as failure:
                        error = failure
                self._agree(error)
                assert views is not None  # else _agree raised
                session.order_writes(stream)
                comm.broadcast_destinations(views, owner)
                del views
                session.arrived(index, begin, stop, stream, owner != self._rank)

    def _share_whole(
        self,
        index: int,
        ref: ShardRef,
        owners: list[tuple[int, int, int]],
        parts: list[tuple[int, torch.Tensor]],
    ) -> None:
        """The whole shard to every rank over the host group; each feeds the data its load
        needs through its own checks (a Content-MD5, or tensor groups that differ by rank)."""
        import torch

        buffer = torch.empty(ref.size, dtype=torch.uint8)
        for start, part in parts:
            buffer[start : start + part.numel()] = part
        for owner, start, end in owners:
            self._comm.broadcast_host(buffer[start:end], owner)
        view = buffer.numpy().data
        for begin, end in self._session.needed_ranges(index):
            for task in split_range(index, begin, end, self._chunk):
                source = view[task.start : task.end]

                def fill(landing: memoryview, source: memoryview = source) -> None:
                    landing[:] = source

                if feed_range(self._session, task, fill, self._chunk) is None:
                    raise LoadCancelled("the load was cancelled")

    def _agree(self, error: BaseException | None) -> None:
        """Returns when no rank failed; raises `error` on the rank that met it, and the same type
        of error naming that rank on the others (two collectives, a second only on failure)."""
        if self._comm.max_int(int(error is not None)) == 0:
            return
        said = None
        if error is not None:
            hint = getattr(error, "hint", None)
            said = (type(error).__name__, redact(error), redact(hint) if hint else None)
        reports = self._comm.all_gather_object(said)
        if error is not None:
            raise error
        rank, (kind, message, hint) = next(
            (r, x) for r, x in enumerate(reports) if isinstance(x, tuple)
        )
        cls = getattr(errors, kind, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.Blob2GpuError)):
            cls = errors.SourceReadError
        raise cls(f"rank {rank} of the fan-out group failed: {message}", hint=hint)

    def _fetch(
        self, ref: ShardRef, view: memoryview, base: int, parts: list[tuple[int, int]]
    ) -> None:
        """Read byte ranges `parts` of shard `ref` into `view` (which holds the shard's bytes
        from `base` on), as many reads at once and of the size its source's reader says (from
        Blob: as many in flight as the load's throttling allows, prefetch_concurrency at most,
        as an ordinary load's feeder; from local files: one read each)."""
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
                    ranges.read_into(ref, piece[0], view[piece[0] - base : piece[1] - base])
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
    tensors): the exchange runs on host memory (to a GPU target, whole shards are shared on the
    host and each rank copies all of them to its device; vLLM's loader passes its device group).

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
    strategy = GroupFanOut(dist.get_rank(), dist.get_world_size())  # host tensors: gloo
    with loader.start(request, strategy) as checkpoint:
        return checkpoint.to_dict()
