"""Checkpoint: one load in progress or done. Iterating it yields (name, tensor) as shards arrive;
``get``, ``keys`` and ``metadata`` wait for what they need.

On a GPU an opened load is streamed: the core hands tensors out in tensor groups and holds at most
streamed_device_bytes of device memory for what it has not handed out, plus what stream() handed
out and the consumer has not dropped yet (csrc/arena_pool.hpp). Tensors the checkpoint keeps
(iteration, get, to_dict) are the consumer's and no longer counted.

It does arrival and hand-out only: which error a failed load raises and what its feeder counted
are the Fetch's (sources/feeding.py), the NVMe cache's repair and fill the CachedSource's
(cache/source.py), the index checks selection.py's, the numbers the LoadReport's."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NoReturn

from blob2gpu import _core
from blob2gpu.cache.fill import CacheFill, FillResult
from blob2gpu.errors import BlobChanged, InvalidArgument, LoadCancelled
from blob2gpu.loading.frameworks import Tensor
from blob2gpu.loading.selection import check_found
from blob2gpu.operations import metrics
from blob2gpu.operations.report import LoadReport
from blob2gpu.sources.feeding import Fetch
from blob2gpu.sources.plan import ShardRef

if TYPE_CHECKING:
    from blob2gpu.loading.prepare import PreparedLoad

log = logging.getLogger("blob2gpu")


class Checkpoint:
    """A checkpoint being loaded. Use as a context manager; closing it stops an unfinished load and
    releases what the load holds, while tensors already handed out stay valid."""

    def __init__(
        self,
        prepared: PreparedLoad,
        fetch: Fetch,
        convert: Callable[[_core.TensorView], Tensor],
        pipeline: _core.LoadPipeline,
        keep_completed: bool = False,
        fills: list[CacheFill] | None = None,
    ) -> None:
        """A started load: `prepared` by loading.prepare, read by `fetch`. keep_completed: a
        BlobChanged error carries the complete shards (Loader.load with on_blob_change='restart'
        keeps them). fills: the list (its Loader's) that the cache fill this load starts is
        added to."""
        self._prepared = prepared
        self._fetch = fetch
        self._selection = prepared.selection  # the tensors this load hands out
        self._plan = prepared.plan  # every shard this load reads
        self._pipeline = pipeline  # for GPU memory readings
        self._convert = convert
        self._report = prepared.report
        self._on_close: Callable[[], None] | None = None  # call_on_close
        self._keep_completed = keep_completed
        self._tensors: dict[str, Tensor] = {}
        self._metadata: dict[str, str] = {}
        self._shard_of: dict[str, str] = {}
        self._finished = False
        self._closed = False
        self._fill: CacheFill | None = None
        self._fills = fills
        self._keep_tensors = True  # stream() hands tensors out without keeping them
        # Arrived, not kept, not handed out yet: where any later iteration or stream() goes on.
        self._pending: deque[tuple[str, Tensor]] = deque()
        # Shards kept from an earlier attempt of this load (same blob, same etag), with their
        # tensors, already converted.
        self._preloaded_refs = {ref.name: ref for ref in prepared.preloaded}
        for ref, tensors in prepared.preloaded.items():
            self._tensors.update(tensors)
            self._shard_of.update(dict.fromkeys(tensors, ref.name))

    # -- arrival ----------------------------------------------------------------------------------
    def _receive_next(self) -> list[tuple[str, Tensor]] | None:
        """Pull the next arrived shard into the checkpoint; None once every shard arrived."""
        if self._finished:
            return None
        if self._closed:
            raise LoadCancelled("the checkpoint is closed")
        try:
            # Kept tensors are the consumer's; streamed ones count against the load's device
            # memory until the consumer drops them.
            arrived = self._fetch.next_shard(keep=self._keep_tensors)
        except BaseException as error:
            self._fail(error)
        if arrived is None:
            self._finish()
            return None
        return self._arrive(*arrived)

    def _arrive(self, ref: ShardRef, shard: _core.PublishedShard) -> list[tuple[str, Tensor]]:
        """A published shard, converted: its (name, tensor) pairs."""
        self._metadata.update(shard.metadata)
        arrived = []
        for view in shard.tensors:
            tensor = self._convert(view)
            if self._keep_tensors:
                self._tensors[view.name] = tensor
            self._shard_of[view.name] = ref.name
            arrived.append((view.name, tensor))
        return arrived

    def _fail(self, error: BaseException) -> NoReturn:
        """Fail the load with `error` (the fetch's), releasing everything it holds."""
        raised = error
        if isinstance(error, BlobChanged) and self._keep_completed:
            # Complete shards of unchanged blobs can be kept by a restarted load
            # (Loader.load with on_blob_change='restart'), which removes them from the error.
            raised = error.evolve(completed_shards=self._completed_shards())
        # A failed load keeps nothing: tensors it already handed out live only as long as the
        # caller holds them (a traceback holding this checkpoint must not pin GPU memory).
        self._tensors.clear()
        self.close()
        if raised is not error:
            raise raised from None
        raise error

    def _completed_shards(self) -> dict[tuple[str, str | None], dict[str, Tensor]]:
        """{(blob path, etag): {name: tensor}} of the shards whose tensors all arrived, those
        published but not yet pulled included."""
        by_shard: dict[str, dict[str, Tensor]] = {}
        for name, tensor in self._tensors.items():
            by_shard.setdefault(self._shard_of[name], {})[name] = tensor
        for ref, shard in self._fetch.take_ready():
            tensors = {v.name: self._convert(v) for v in shard.tensors}
            by_shard.setdefault(ref.name, {}).update(tensors)
        refs = {r.name: r for r in self._plan.shards}
        refs.update(self._preloaded_refs)
        return {(refs[n].path, refs[n].etag): t for n, t in by_shard.items() if n in refs}

    def _finish(self) -> None:
        report = self._report
        self._fetch.finish(report, order=[ref.name for ref in self._plan.shards])
        report.tensors = len(self._shard_of)
        if report.gpu_memory_total is not None:
            info = self._pipeline.memory_info()
            report.gpu_memory_free_after = info[0] if info is not None else None
        self._finished = True
        if self._prepared.settings.emit_phase_timings:
            log.info(
                "blob2gpu load complete: %s",
                report.summary(),
                extra={"blob2gpu_report": report.to_dict()},
            )
        check_found(self._selection, self._shard_of, self._plan)
        metrics.observe_load(report)  # a load that failed its index check is not a load
        self.close()

    def _drain(self) -> None:
        self._require_kept()
        while self._receive_next() is not None:
            pass

    def _require_kept(self) -> None:
        if not self._keep_tensors:
            raise InvalidArgument("this checkpoint was streamed: its tensors were not kept")

    # -- public API -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        """Yield (name, tensor): those already arrived, then the rest in arrival order (after
        stream(): the tensors it has not handed out)."""
        yield from list(self._tensors.items())
        while self._pending:
            yield self._pending.popleft()
        while (arrived := self._receive_next()) is not None:
            yield from arrived

    def stream(self) -> Iterator[tuple[str, Tensor]]:
        """Yield (name, tensor) in arrival order without keeping them: each tensor (and the shard
        memory behind it) lives only as long as the consumer holds it, so a consumer that copies
        each tensor into its own storage (a serving engine's model.load_weights) never holds a
        second full copy of the weights. The index checks of a full iteration run at the end;
        get(), keys() and to_dict() then raise InvalidArgument. A later stream() or iteration
        goes on with the tensors this one has not handed out."""
        self._keep_tensors = False
        self._pending.extend(self._tensors.items())  # tensors kept by an earlier attempt
        self._tensors = {}
        # Handed out one by one and let go of as they are: while the next group is awaited, only
        # the consumer's last tensor holds device memory, not the whole previous group.
        while True:
            while self._pending:
                yield self._pending.popleft()
            arrived = self._receive_next()
            if arrived is None:
                return
            self._pending.extend(arrived)
            del arrived

    def keys(self) -> list[str]:
        """Every tensor name (waits for the load to finish)."""
        self._drain()
        return list(self._tensors)

    def get(self, name: str) -> Tensor:
        """The tensor named `name`, waiting for its shard if needed. Raises KeyError if absent."""
        self._require_kept()
        wanted = self._selection.names
        if wanted is not None and name not in wanted and name not in self._tensors:
            raise KeyError(f"'{name}' is not among the tensors this load selected")
        while name not in self._tensors:
            if self._receive_next() is None:
                raise KeyError(f"no tensor '{name}' in '{self._plan.uri}'")
        return self._tensors[name]

    def __getitem__(self, name: str) -> Tensor:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.keys()

    def __len__(self) -> int:
        return len(self.keys())

    def to_dict(self) -> dict[str, Tensor]:
        """Every tensor by name (waits for the load to finish)."""
        self._drain()
        return dict(self._tensors)

    @property
    def metadata(self) -> dict[str, str]:
        """The shards' ``__metadata__`` merged (waits for the load to finish)."""
        self._drain()
        return dict(self._metadata)

    @property
    def report(self) -> LoadReport:
        """The LoadReport; complete once the load has finished."""
        return self._report

    def progress(self) -> tuple[int, int]:
        """(bytes read so far, bytes the load will read): safe to call from another thread.
        With a tensor selection the total shrinks as headers reveal what the selection needs."""
        done, total = self._fetch.progress()
        if self._selection.everything:
            total = self._plan.total_bytes
        return min(done, total), total

    def call_on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback` once when this checkpoint closes (after its own resources go)."""
        self._on_close = callback

    @property
    def finished(self) -> bool:
        return self._finished

    def close(self) -> None:
        """Stop the load if unfinished and release its staging; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()  # arrived, never handed out: their device memory goes back now
        try:
            self._fetch.close()
            self._fill = self._prepared.source.finish(self._prepared, complete=self._finished)
            if self._fill is not None and self._fills is not None:
                self._fills.append(self._fill)
        finally:
            if self._on_close is not None:
                self._on_close()

    @property
    def cache_fill(self) -> CacheFill | None:
        """The background fill of the node's cache this load started (None when the cache held
        or wrote every shard, or is off); its progress() is (bytes, total)."""
        return self._fill

    def wait_for_cache_fill(self, timeout: float | None = None) -> FillResult:
        """Wait until the cache fill this load started has ended (at most `timeout` seconds);
        returns what it wrote and skipped (`finished` False when the timeout passed first). The
        report's cache_filled / cache_fill_skipped say the same. Returns an empty, finished
        result when there is no fill."""
        if self._fill is None:
            return FillResult(finished=True)
        return self._fill.wait(timeout)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
