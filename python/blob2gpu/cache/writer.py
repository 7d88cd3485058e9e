"""CacheWriter: a Blob load's write-through to the NVMe cache, in the background while its shards
stream (EntryWrite, cache/nvme.py, writes and publishes each entry)."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from blob2gpu import _core
from blob2gpu.cache.checks import BlobChecks
from blob2gpu.cache.nvme import EntryLock, EntryRefused, EntryWrite, NvmeCache


@dataclass
class _Pending:
    name: str  # the shard's
    entry: EntryWrite
    done: bool = False  # given up or complete: nothing more is queued for it


@dataclass
class WriterStats:
    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # shard name -> why it was not cached


class CacheWriter:
    """Writes shards to the cache in the background while they stream from Blob (write-through).

    The feeder offers each range before committing it; a bounded queue of copies
    (`queue_bytes`) decouples the disk from the load: when the disk falls behind or fills up,
    that shard is not cached now (the fill after the load fetches it: cache/fill.py). A
    complete shard is published (EntryWrite.publish) by a second thread, so the writes of the
    other shards go on meanwhile.
    """

    def __init__(self, cache: NvmeCache, queue_bytes: int = 256 << 20) -> None:
        self.cache = cache
        self.stats = WriterStats()
        self._pending: dict[int, _Pending] = {}
        self._budget = queue_bytes
        self._queued = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, int, bytes | bytearray] | None] = queue.Queue()
        self._complete: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="blob2gpu-cache-writer", daemon=True)
        self._publisher = threading.Thread(
            target=self._run_publisher, name="blob2gpu-cache-publisher", daemon=True
        )
        self._started = False

    def begin(
        self,
        index: int,
        name: str,
        key: str,
        identity: dict[str, Any],
        lock: EntryLock,
        checks: BlobChecks | None = None,
    ) -> None:
        """Start writing shard `index` (the caller holds its entry lock, now ours). checks: the
        manifest's checksums of the file, which the entry is checked against before it is
        published (the core checks a Content-MD5 over the same bytes as they land)."""
        try:
            self._start()
        except RuntimeError as e:  # no thread to be had: this shard is not cached
            lock.release()
            self.stats.skipped[name] = f"cannot start the cache writer: {e}"
            return
        try:
            entry = EntryWrite(self.cache, key, identity, lock, checks)
        except EntryRefused as e:
            self.stats.skipped[name] = e.why
            return
        self._pending[index] = _Pending(name, entry)

    def _start(self) -> None:
        """Start the writing and publishing threads, with the first shard to write: a load of
        cache hits starts none (each start hands the GIL back and forth). Raises RuntimeError
        when a thread cannot be started (then none runs)."""
        if self._started:
            return
        self._thread.start()
        try:
            self._publisher.start()
        except RuntimeError:
            self._queue.put(None)
            self._thread.join()
            self._thread = threading.Thread(
                target=self._run, name="blob2gpu-cache-writer", daemon=True
            )
            raise
        self._started = True

    def offer(self, index: int, offset: int, view: memoryview) -> None:
        """Queue a copy of bytes [offset, offset + len(view)) of shard `index` for writing."""
        with self._lock:
            p = self._pending.get(index)
            if p is None or p.done:
                return
            if self._queued + len(view) > self._budget:
                p.done = True  # the disk is behind: give this shard up, the load goes on
                self._queue.put((index, -1, b"disk write queue full"))
                return
            self._queued += len(view)
        self._queue.put((index, offset, _core.copied(view)))  # copied without the GIL

    def _run(self) -> None:
        try:
            self._write_queued()
        finally:
            self._complete.put(None)

    def _run_publisher(self) -> None:
        while (p := self._complete.get()) is not None:
            why = p.entry.publish()
            p.done = True
            if why is None:
                self.stats.written.append(p.name)
            else:
                self._skip(p, why)

    def _write_queued(self) -> None:
        while (item := self._queue.get()) is not None:
            index, offset, data = item
            p = self._pending.get(index)
            if p is None:
                continue
            if offset < 0:
                self._abandon(p, data.decode())
                continue
            with self._lock:
                self._queued -= len(data)
            if p.entry.finished:
                continue
            try:
                p.entry.write(offset, data)
            except OSError as e:
                self._abandon(p, f"write failed: {e.strerror}")
                continue
            if p.entry.complete:
                self._complete.put(p)

    def _abandon(self, p: _Pending, why: str) -> None:
        p.done = True
        if not p.entry.finished:
            p.entry.abandon(why)
        self._skip(p, why)

    def _skip(self, p: _Pending, why: str) -> None:
        self.stats.skipped.setdefault(p.name, why)

    def close(self) -> WriterStats:
        """Finish queued writes, give up shards not complete, release every lock."""
        if self._started:
            self._queue.put(None)
            self._thread.join()
            self._publisher.join()
        for p in self._pending.values():
            if not p.entry.finished:
                self._abandon(p, "the load ended before the shard was complete")
        return self.stats
