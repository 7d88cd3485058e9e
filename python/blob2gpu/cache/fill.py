"""The cache fill: after a load returns, the shards its write-through writer could not keep (the
disk fell behind the load) are fetched again from Blob straight into their cache files, so one
load leaves the node's cache complete. `blob2gpu cache warm` runs the same fill without a load.

One process-wide thread fills one shard at a time, each range pinned to the etag the load listed
(the checkpoint source's ranged reads, with its retry policy), at no more than
`bytes_per_second`, under the entry's lock and published like any entry (EntryWrite). The thread
is a daemon: it never holds the interpreter open. At exit it is stopped and the shard it was on is
abandoned (its temporary file removed); a process killed outright leaves only a file in tmp/,
which nothing trusts and `cache prune` removes.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blob2gpu.cache.checks import BlobChecks, check_bytes
from blob2gpu.cache.nvme import CacheEntry, EntryRefused, EntryWrite, NvmeCache
from blob2gpu.errors import Blob2GpuError
from blob2gpu.sources.plan import ShardRef

if TYPE_CHECKING:
    from blob2gpu.sources.source import RangeReader, Source

_CACHED = "already cached"  # _fill_one's answer for an entry that was there and checked good
FILL_RANGE_BYTES = 8 << 20  # the largest ranged GET of the fill, into one reused buffer
MIN_RANGE_BYTES = 64 << 10
EXIT_GRACE_SECONDS = 5.0  # at exit, how long the fill gets to abandon the shard it is on


@dataclass(frozen=True)
class FillShard:
    """One shard to put in the cache: its name, its entry's key and identity (account, container,
    blob, etag, size), what Blob says its bytes are (the manifest's checksums or the blob's
    Content-MD5), and what to read it with. check_cached: an entry already there is read and
    checked (against `checks`, else against its record) and fetched again when damaged."""

    name: str
    key: str
    identity: dict[str, Any]
    ref: ShardRef  # as listed, handed to read_into
    checks: BlobChecks = field(default_factory=BlobChecks)
    check_cached: bool = False


@dataclass
class FillResult:
    """What a fill did: shards it published, shards it did not and why, and whether it ran to
    its end (False: stopped at exit, or waited for with a timeout that passed). With
    check_cached: the shards whose entry was there and checked good (`cached`), and those whose
    entry was damaged, removed and fetched again (`repaired`: shard -> what was wrong)."""

    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    finished: bool = False
    cached: list[str] = field(default_factory=list)
    repaired: dict[str, str] = field(default_factory=dict)


class CacheFill:
    """One fill job: some shards of one checkpoint. Made by submit_fill; wait() for its end."""

    def __init__(
        self,
        cache: NvmeCache,
        shards: Sequence[FillShard],
        source: Source,
        bytes_per_second: int,
        on_shard: Callable[[str, str | None], None] | None = None,
    ) -> None:
        """source: the checkpoint's, whose ranged reads the fill makes through a source of its
        own (source.reopen(): the load's connections close with its Loader; the fill outlives
        it), ended (retry waits too) when the stopping event is set at exit. bytes_per_second: 0
        for no bound. on_shard(name, why_not): called after each shard (why_not None:
        published)."""
        self.cache = cache
        self.shards = list(shards)
        self.total_bytes = sum(s.identity["size"] for s in self.shards)
        self._source = source
        self._rate = bytes_per_second
        self._on_shard = on_shard
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._bytes_done = 0
        self._reader: RangeReader | None = None
        self.result = FillResult()

    def progress(self) -> tuple[int, int]:
        """(bytes fetched into the cache so far, bytes this fill fetches at most)."""
        with self._lock:
            return self._bytes_done, self.total_bytes

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> FillResult:
        """Wait until the fill has ended (or `timeout` seconds); returns what it did so far."""
        self._done.wait(timeout)
        return self.result

    # -- run on the fill thread -------------------------------------------------------------------
    def run(self, stopping: threading.Event) -> None:
        try:
            if self.shards:
                self._fill_all(stopping)
            self.result.finished = not stopping.is_set()
        finally:
            self._done.set()

    def _fill_all(self, stopping: threading.Event) -> None:
        if stopping.is_set():  # submitted at exit: nothing is fetched
            for shard in self.shards:
                self._record(shard.name, "the process exited before the fill reached it")
            return
        try:
            source = self._source.reopen()
            reader = source.ranges(None, stopping)
        except Exception as e:  # no connection: nothing is filled, the cache stays as it was
            for shard in self.shards:
                self._record(shard.name, f"the fill could not reach storage: {what_was_wrong(e)}")
            return
        with self._lock:
            self._reader = reader
        try:
            # Ranges of a quarter second's worth at the bound: an even pace, not bursts.
            size = min(FILL_RANGE_BYTES, max(MIN_RANGE_BYTES, self._rate // 4 or FILL_RANGE_BYTES))
            buffer = memoryview(bytearray(size))
            for shard in self.shards:
                if stopping.is_set():
                    self._record(shard.name, "the process exited before the fill reached it")
                    continue
                self._record(shard.name, self._fill_one(shard, reader, buffer, stopping))
        finally:
            with self._lock:
                self._reader = None
            source.close()

    def interrupt(self) -> None:
        """Break the read in flight (the stopping event is set first)."""
        with self._lock:
            reader = self._reader
        if reader is not None:
            reader.stop()

    def _fill_one(
        self, shard: FillShard, reader: RangeReader, buffer: memoryview, stopping: threading.Event
    ) -> str | None:
        """Fetch one shard into its entry; None when published, else why not."""
        try:
            lock = self.cache.lock(shard.key)
        except OSError as e:
            return f"cannot write to the cache: {e.strerror}"
        if not lock.try_acquire():
            lock.release()  # another process on this node is writing it: it publishes it
            return "another process is writing it"
        cached = self.cache.lookup(shard.key, shard.identity)
        if cached is not None and not shard.check_cached:
            lock.release()
            return None  # written since the load looked (by another process): already there
        if cached is not None:
            problem = self._check_cached(cached, shard)
            if problem is None:
                lock.release()
                self.result.cached.append(shard.name)
                with self._lock:
                    self._bytes_done += cached.size  # read through and checked
                return _CACHED
            self.cache.remove(cached)
            self.result.repaired[shard.name] = problem
        try:
            entry = EntryWrite(self.cache, shard.key, shard.identity, lock, shard.checks)
        except EntryRefused as e:
            return e.why
        started, fetched = time.monotonic(), 0
        try:
            while not entry.complete:
                # The bound: the next range waits until the rate allows it (or the exit).
                if self._rate and stopping.wait(started + fetched / self._rate - time.monotonic()):
                    break
                n = min(len(buffer), entry.size - entry.written)
                view = buffer[:n]
                reader.read_into(shard.ref, entry.written, view)
                entry.write(entry.written, view)
                fetched += n
                with self._lock:
                    self._bytes_done += n
        except Exception as e:  # a storage error (BlobChanged, throttled out, ...): not cached
            if stopping.is_set():
                return entry.abandon("the process exited during the fill")
            if isinstance(e, OSError) and not isinstance(e, Blob2GpuError):
                return entry.abandon(f"write failed: {e.strerror}")
            return entry.abandon(f"fetching it failed: {what_was_wrong(e)}")
        if not entry.complete:
            return entry.abandon("the process exited during the fill")
        return entry.publish()

    def _check_cached(self, entry: CacheEntry, shard: FillShard) -> str | None:
        """Read a cached entry through; None when Blob's checks (else its record) say it is
        good, else what is wrong with it."""
        if shard.checks.authority is None:
            return self.cache.verify(entry)
        try:
            fd = self.cache.open_data(entry)
        except OSError as e:
            return f"unreadable: {e.strerror or e}"
        try:
            return check_bytes(fd, entry.size, shard.checks)
        except OSError as e:
            return f"unreadable: {e.strerror or e}"
        finally:
            os.close(fd)

    def _record(self, name: str, why_not: str | None) -> None:
        if why_not is _CACHED:
            return
        if why_not is None:
            self.result.written.append(name)
        else:
            self.result.skipped[name] = why_not
        if self._on_shard is not None:
            self._on_shard(name, why_not)


def what_was_wrong(error: BaseException) -> str:
    """An error as the report and the fill's skips say it: its kind and first line, without its
    hint (what the user of a failed load would do; here the error was handled)."""
    said = str(error)
    hint = getattr(error, "hint", None)
    if hint:
        said = said.removesuffix(f"; {hint}")
    return f"{type(error).__name__}: {said.splitlines()[0] if said else ''}"


class _FillThread:
    """The process's one fill thread: jobs run in the order they were submitted."""

    def __init__(self) -> None:
        self._jobs: list[CacheFill] = []
        self._cv = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: CacheFill | None = None

    def submit(self, job: CacheFill) -> None:
        with self._cv:
            if self._stopping.is_set():
                job.run(self._stopping)  # exiting: the job ends at once, nothing fetched
                return
            self._jobs.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="blob2gpu-cache-fill", daemon=True
                )
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stopping.is_set():
                    if not self._cv.wait(timeout=30):
                        self._thread = None  # idle: the next submit starts a new one
                        return
                if not self._jobs:
                    return
                job = self._current = self._jobs.pop(0)
            try:
                job.run(self._stopping)
            finally:
                with self._cv:
                    self._current = None

    def stop(self) -> None:
        """At exit: stop the fills (the shard in progress is abandoned, the queued ones end)."""
        with self._cv:
            self._stopping.set()
            jobs, self._jobs = self._jobs, []
            thread, current = self._thread, self._current
            self._cv.notify_all()
        if current is not None:
            current.interrupt()
        for job in jobs:
            job.run(self._stopping)
        if thread is not None and thread is not threading.current_thread():
            thread.join(EXIT_GRACE_SECONDS)


_FILLS = _FillThread()
atexit.register(_FILLS.stop)


def submit_fill(job: CacheFill) -> CacheFill:
    """Queue `job` on the process's fill thread; returns it."""
    _FILLS.submit(job)
    return job
