"""Checkpoint: one load in progress or done. Iterating it yields (name, tensor) as shards arrive;
``get``, ``keys`` and ``metadata`` wait for what they need.

On a GPU an opened load is streamed: the core hands tensors out in tensor groups and holds at most
streamed_device_bytes of device memory for what it has not handed out, plus what stream() handed
out and the consumer has not dropped yet (csrc/arena_pool.hpp). Tensors the checkpoint keeps
(iteration, get, to_dict) are the consumer's and no longer counted."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from blob2gpu import _core
from blob2gpu.cache.fill import CacheFill, FillResult
from blob2gpu.errors import (
    Blob2GpuError,
    BlobChanged,
    InvalidArgument,
    InvalidIndex,
    LoadCancelled,
)
from blob2gpu.loading.cache_repair import damaged_hit, unrepaired, what_was_wrong
from blob2gpu.loading.selection import check_found
from blob2gpu.operations import metrics
from blob2gpu.operations.report import LoadReport

if TYPE_CHECKING:
    from blob2gpu.loading.prepare import PreparedLoad

log = logging.getLogger("blob2gpu")


class Checkpoint:
    """A checkpoint being loaded. Use as a context manager; closing it stops an unfinished load and
    releases what the load holds, while tensors already handed out stay valid."""

    def __init__(
        self,
        prepared: PreparedLoad,
        session: _core.LoadSession,
        convert: Callable[[Any], Any],
        pipeline: Any,
        feeder: Any = None,
        keep_completed: bool = False,
        on_close: Callable[[], None] | None = None,
        fills: list[CacheFill] | None = None,
        restart: Callable[[PreparedLoad], tuple[Any, Any]] | None = None,
    ) -> None:
        """A started load: `prepared` by loading.prepare, its core `session` fed by `feeder`
        (None when the core reads the files itself). keep_completed: a BlobChanged error carries
        the complete shards (Loader.load with on_blob_change='restart' keeps them). fills: the
        list (its Loader's) that the cache fill this load starts is added to. restart: starts
        the rest of the load in a new session (its fetch strategy's start) when a cache entry
        fails its check (loading/cache_repair.py); None: such a failure fails the load."""
        self._prepared = prepared
        self._session = session
        self._selection = prepared.selection  # the tensors this load hands out
        self._cache = prepared.cache  # the NVMe cache's part in this load
        self._settings = prepared.settings
        self._pipeline = pipeline  # for GPU memory readings
        self._feeder = feeder
        self._plan = prepared.plan
        self._convert = convert
        self._report = prepared.report
        self._on_close = on_close
        self._keep_completed = keep_completed
        self._tensors: dict[str, Any] = {}
        self._metadata: dict[str, str] = {}
        self._shard_of: dict[str, str] = {}
        self._finished = False
        self._closed = False
        self._fill: CacheFill | None = None
        self._fills = fills
        self._keep_tensors = True  # stream() hands tensors out without keeping them
        self._restart = restart
        self._full_plan = prepared.plan  # every shard of the load (a repair narrows _plan)
        self._done: set[str] = set()  # shards whose tensors were handed out
        self._taken_over: deque[list[tuple[str, Any]]] = deque()  # a replaced session's shards
        self._repaired: dict[str, str] = {}  # shard -> key of its entry that failed its check
        self._bytes_before = 0  # bytes read by sessions a repair replaced
        # Shards kept from an earlier attempt of this load (same blob, same etag): ShardRef ->
        # their tensors, already converted.
        self._preloaded_refs = {ref.name: ref for ref in prepared.preloaded}
        for ref, tensors in prepared.preloaded.items():
            self._tensors.update(tensors)
            self._shard_of.update(dict.fromkeys(tensors, ref.name))

    # -- arrival ----------------------------------------------------------------------------------
    def _receive_next(self) -> list[tuple[str, Any]] | None:
        """Pull the next arrived shard into the checkpoint; None once every shard arrived."""
        if self._finished:
            return None
        if self._closed:
            raise LoadCancelled("the checkpoint is closed")
        if self._taken_over:
            return self._taken_over.popleft()
        try:
            # Kept tensors are the consumer's; streamed ones count against the load's device
            # memory until the consumer drops them.
            item = self._session.next_shard(keep=self._keep_tensors)
        except BaseException as error:
            if self._repair(error):
                return self._receive_next()
            self._fail(error)
        if item is None:
            self._finish()
            return None
        return self._arrive(item)

    def _arrive(self, item: Any) -> list[tuple[str, Any]]:
        """A published shard of the current session, converted: its (name, tensor) pairs."""
        shard_name = self._plan.shards[item.index].name
        self._metadata.update(item.metadata)
        arrived = []
        for view in item.tensors:
            tensor = self._convert(view)
            if self._keep_tensors:
                self._tensors[view.name] = tensor
            self._shard_of[view.name] = shard_name
            arrived.append((view.name, tensor))
        self._done.add(shard_name)
        return arrived

    def _fail(self, error: BaseException) -> NoReturn:
        """Fail the load with `error` (next_shard's), the feeder's typed error preferred."""
        source_error = self._feeder.error if self._feeder is not None else None
        raised = error
        if (
            source_error is not None
            and source_error is not error
            and not isinstance(source_error, LoadCancelled)
        ):
            raised = source_error  # the feeder's typed error, not the core's echo
        if isinstance(raised, BlobChanged) and self._keep_completed:
            # Complete shards of unchanged blobs can be kept by a restarted load
            # (Loader.load with on_blob_change='restart'), which removes them from the error.
            raised = raised.evolve(completed_shards=self._completed_shards())
        # A failed load keeps nothing: tensors it already handed out live only as long as the
        # caller holds them (a traceback holding this checkpoint must not pin GPU memory).
        self._tensors.clear()
        self.close()
        raised = self._note_repair(raised)
        if raised is not error:
            raise raised from None
        raise error

    def _note_repair(self, error: BaseException) -> BaseException:
        """`error`, naming the cache entry and how to repair it when it stopped the fetch of a
        shard whose entry failed its check in this load."""
        if not self._repaired or not isinstance(error, Blob2GpuError):
            return error
        blobs = {ref.path: ref.name for ref in self._full_plan.shards}
        shard = error.shard or blobs.get(error.blob or "")
        if shard is None and len(self._repaired) == 1 and error.blob is None:
            shard = next(iter(self._repaired))  # not about another shard: about the fetch again
        if shard not in self._repaired:
            return error
        return unrepaired(error, shard, self._repaired[shard])

    def _repair(self, error: BaseException) -> bool:
        """When `error` condemns a cache hit of the current session: keep what the session
        completed, close it, remove the entry's data, and start the shards not yet handed out in
        a new session, that one fetched from Blob (loading/cache_repair.py). Returns whether it
        did; raises the error of a repair that cannot start (naming the entry)."""
        from blob2gpu.loading.prepare import continue_load

        index = damaged_hit(self._cache, self._plan, error) if self._restart else None
        if index is None or self._restart is None or self._cache.cache is None:
            return False
        assert isinstance(error, Blob2GpuError)
        hit, name = self._cache.hits[index], self._plan.shards[index].name
        taken = [self._arrive(shard) for shard in self._session.take_ready()]
        if self._feeder is not None:
            self._feeder.stop()
        stats = self._session.stats()
        self._session.close()
        self._bytes_before += stats.bytes_read
        hit_names = {self._plan.shards[i].name for i in self._cache.hits}
        self._report.carry_session(stats, self._done, hit_names)
        self._close_cache(final=False)
        self._cache.cache.remove_data(hit.entry)
        self._cache.cache.close()  # the rest of the load opens the directory again
        self._report.cache_repaired[name] = what_was_wrong(error)
        self._repaired[name] = hit.entry.key
        log.warning(
            "blob2gpu: NVMe cache entry %s of shard '%s' failed its check (%s); fetching the "
            "shard again from Blob",
            hit.entry.key,
            name,
            self._report.cache_repaired[name],
        )
        rest = tuple(ref for ref in self._plan.shards if ref.name not in self._done)
        try:
            prepared = continue_load(self._prepared, rest, frozenset(self._repaired))
            try:
                session, feeder = self._restart(prepared)
            except BaseException:
                prepared.abandon()
                raise
        except BaseException as e:
            self._tensors.clear()
            self._closed = True
            if self._on_close is not None:
                self._on_close()
            raise unrepaired(e, name, hit.entry.key) from None
        self._prepared, self._plan, self._cache = prepared, prepared.plan, prepared.cache
        self._session, self._feeder = session, feeder
        self._taken_over.extend(taken)
        if feeder is not None:
            feeder.start()
        return True

    def _completed_shards(self) -> dict[tuple[str, str | None], dict[str, Any]]:
        """{(blob path, etag): {name: tensor}} of the shards whose tensors all arrived, those
        published but not yet pulled included."""
        by_shard: dict[str, dict[str, Any]] = {}
        for name, tensor in self._tensors.items():
            by_shard.setdefault(self._shard_of[name], {})[name] = tensor
        for shard in self._session.take_ready():
            ref = self._plan.shards[shard.index]
            tensors = {v.name: self._convert(v) for v in shard.tensors}
            by_shard.setdefault(ref.name, {}).update(tensors)
        refs = {r.name: r for r in self._full_plan.shards}
        refs.update(self._preloaded_refs)
        return {(refs[n].path, refs[n].etag): t for n, t in by_shard.items() if n in refs}

    def _finish(self) -> None:
        self._session.wait_landed()
        report = self._report
        report.seconds = report.phases["model_load_complete"] = report.elapsed()
        stats = self._session.stats()
        report.absorb_core_stats(stats, order=[ref.name for ref in self._full_plan.shards])
        published = report.session_seconds(stats.all_published_ns)
        report.phases["artifact_fetch_complete"] = published
        report.phases["host_staging_complete"] = published
        report.tensors = len(self._shard_of)
        settings = self._settings
        if report.verification in ("crc32c", "sha256", "content-md5"):
            failures = {s.name: s.checksum_failures for s in stats.shards}
            for shard in report.shards:  # those of a replaced session were complete: checked
                shard.checksum = "mismatch" if failures.get(shard.name) else "ok"
        if report.gpu_memory_total is not None:
            if stats.min_free_device_bytes >= 0:
                report.gpu_memory_free_min = stats.min_free_device_bytes
            report.gpu_memory_free_after = self._pipeline.memory_info()[0]
        if self._feeder is not None:
            report.retries = self._feeder.retries
            report.retry_wait_seconds = self._feeder.retry_wait_seconds
            report.requests = self._feeder.requests
            if (throttle := self._feeder.throttle_stats) is not None:
                report.throttled = throttle.throttled
                report.throttle_decreases = throttle.decreases
                report.throttle_node_decreases = throttle.node_decreases
                report.concurrency_lowest = throttle.min_concurrency
                report.concurrency_settled = throttle.concurrency
                report.range_bytes_settled = throttle.range_bytes
                report.pace_bytes_per_second = throttle.pace_bytes_per_second
                report.pace_requests_per_second = throttle.pace_requests_per_second
            names = [ref.name for ref in self._plan.shards]
            retries = dict(zip(names, self._feeder.shard_retries, strict=True))
            for shard in report.shards:
                shard.retries = retries.get(shard.name, shard.retries)
        hits = {self._plan.shards[i].name for i in self._cache.hits}
        for shard in report.shards:
            shard.cache_hit = shard.cache_hit or shard.name in hits
        self._finished = True
        if settings is None or settings.emit_phase_timings:
            log.info(
                "blob2gpu load complete: %s",
                report.summary(),
                extra={"blob2gpu_report": report.to_dict()},
            )
        self._check_weight_map()
        metrics.observe_load(report)  # a load that failed its index check is not a load
        self.close()

    def _check_weight_map(self) -> None:
        weight_map = self._plan.weight_map
        if weight_map is None:
            check_found(self._selection, self._shard_of, self._plan.uri)
            return
        wanted = self._selection.names
        missing = [
            n for n in weight_map if n not in self._shard_of and (wanted is None or n in wanted)
        ]
        misplaced = [
            n
            for n, shard in weight_map.items()
            if n in self._shard_of and self._shard_of[n] != shard
        ]
        if missing or misplaced:
            detail = []
            if missing:
                detail.append(f"missing from every shard: {', '.join(sorted(missing)[:5])}")
            if misplaced:
                n = sorted(misplaced)[0]
                detail.append(
                    f"'{n}' is in '{self._shard_of[n]}' but the index says '{weight_map[n]}'"
                )
            raise InvalidIndex(
                f"index of '{self._plan.uri}' disagrees with its shards: " + "; ".join(detail)
            )

    def _drain(self) -> None:
        self._require_kept()
        while self._receive_next() is not None:
            pass

    def _require_kept(self) -> None:
        if not self._keep_tensors:
            raise InvalidArgument("this checkpoint was streamed: its tensors were not kept")

    # -- public API -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, Any]]:
        """Yield (name, tensor): those already arrived, then the rest in arrival order."""
        yield from list(self._tensors.items())
        while (arrived := self._receive_next()) is not None:
            yield from arrived

    def stream(self) -> Iterator[tuple[str, Any]]:
        """Yield (name, tensor) in arrival order without keeping them: each tensor (and the shard
        memory behind it) lives only as long as the consumer holds it, so a consumer that copies
        each tensor into its own storage (a serving engine's model.load_weights) never holds a
        second full copy of the weights. The index checks of a full iteration run at the end;
        get(), keys() and to_dict() then raise InvalidArgument."""
        self._keep_tensors = False
        kept, self._tensors = self._tensors, {}  # tensors kept by an earlier attempt
        pending = deque(kept.items())
        del kept
        # Handed out one by one and let go of as they are: while the next group is awaited, only
        # the consumer's last tensor holds device memory, not the whole previous group.
        while True:
            while pending:
                yield pending.popleft()
            arrived = self._receive_next()
            if arrived is None:
                return
            pending.extend(arrived)
            del arrived

    def keys(self) -> list[str]:
        """Every tensor name (waits for the load to finish)."""
        self._drain()
        return list(self._tensors)

    def get(self, name: str) -> Any:
        """The tensor named `name`, waiting for its shard if needed. Raises KeyError if absent."""
        self._require_kept()
        wanted = self._selection.names
        if wanted is not None and name not in wanted and name not in self._tensors:
            raise KeyError(f"'{name}' is not among the tensors this load selected")
        while name not in self._tensors:
            if self._receive_next() is None:
                raise KeyError(f"no tensor '{name}' in '{self._plan.uri}'")
        return self._tensors[name]

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.keys()

    def __len__(self) -> int:
        return len(self.keys())

    def to_dict(self) -> dict[str, Any]:
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
        stats = self._session.stats()
        done = self._bytes_before + stats.bytes_read
        if self._selection.everything:
            return min(done, self._full_plan.total_bytes), self._full_plan.total_bytes
        total = self._bytes_before + sum(
            8 + s.header_bytes + s.needed_bytes if s.header_ns >= 0 else ref.size
            for s, ref in zip(stats.shards, self._plan.shards, strict=True)
        )
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
        try:
            if self._feeder is not None:
                self._feeder.stop()
            self._session.close()
            if self._close_cache(final=True) and self._finished:
                self._start_cache_fill()
        finally:
            if self._on_close is not None:
                self._on_close()

    def _close_cache(self, final: bool) -> bool:
        """Release the session's cache hits (their descriptors) and stop its writer, its stats
        added to the report (of a replaced session: those of the shards it completed). Returns
        whether there was a writer."""
        self._cache.close()
        writer = self._cache.writer
        if writer is None:
            return False
        stats = writer.close()
        self._report.cache_written += stats.written
        self._report.cache_skipped.update(
            {n: why for n, why in stats.skipped.items() if final or n in self._done}
        )
        return True

    def _start_cache_fill(self) -> None:
        """After a whole load: queue the fetch of what the node's cache still lacks of it (the
        shards the write-through writer skipped) on the background fill (cache/fill.py)."""
        from blob2gpu.loading.cache_plan import shards_to_fill, start_fill

        cache, settings = self._cache.cache, self._settings
        if cache is None or not settings.cache_fill or not self._selection.everything:
            return
        prepared = self._prepared
        location = prepared.source.container.location
        shards = [
            shard
            for shard in shards_to_fill(cache, location, self._full_plan, prepared.manifest)
            if shard.name not in self._report.cache_bypassed
        ]
        if not shards:
            return
        report = self._report
        report.cache_fill_pending = [s.name for s in shards]

        def on_shard(name: str, why_not: str | None) -> None:
            if why_not is None:
                report.cache_filled.append(name)
            else:
                report.cache_fill_skipped[name] = why_not

        request = prepared.request
        self._fill = start_fill(cache, shards, request.uri, settings, request.credential, on_shard)
        if self._fills is not None:
            self._fills.append(self._fill)

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
