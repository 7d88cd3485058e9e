"""The NVMe cache tier: Blob shards kept on local disk, keyed by account, container, blob and
etag, so a node that restarts loads at disk speed while Blob stays the source of truth.

Layout under cache_dir:
  entries/<key>.bin   a shard's bytes            entries/<key>.json  what they are (published last)
  tmp/                files being written         locks/<key>.lock    one writer per entry per node
An entry is published only after its bytes were written, fsync'ed, read back and checked (against
the manifest when there is one), by renaming the data and then the metadata into entries/. A
process killed mid-write leaves only a file in tmp/, which nothing trusts. A hit is read by the
core's threads and every chunk is CRC-checked as it lands; a bad entry is removed and refetched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blob2gpu import _core
from blob2gpu.errors import ConfigError

CHUNK_BYTES = 4 << 20
META_VERSION = 1


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/blob2gpu, or ~/.cache/blob2gpu; the home is looked up only without
    XDG_CACHE_HOME. Raises ConfigError when there is neither: no HOME and a uid without a
    passwd entry, as in some containers."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "blob2gpu"
    try:
        home = Path.home()
    except RuntimeError:  # no HOME, and no passwd entry for this uid
        raise ConfigError(
            "this process has no home directory (no HOME, no passwd entry for its uid), so the "
            "cache directory has no default: set cache_dir (BLOB2GPU_CACHE_DIR) or XDG_CACHE_HOME"
        ) from None
    return home / ".cache" / "blob2gpu"


@dataclass
class CacheEntry:
    """A published shard: where its bytes are and what they must be."""

    key: str
    data_path: Path
    meta_path: Path
    meta: dict[str, Any]

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    @property
    def last_used(self) -> float:
        try:
            return self.meta_path.stat().st_mtime
        except OSError:
            return 0.0


class EntryLock:
    """An exclusive per-entry file lock: the process holding it is the one writing the entry."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.held = False

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        return True

    def acquire(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if self._fd >= 0:
            if self.held:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
            self.held = False


class NvmeCache:
    """The cache directory. `max_bytes` 0 means no cap."""

    def __init__(self, directory: str | os.PathLike[str] | None, max_bytes: int = 0) -> None:
        self.root = Path(directory) if directory else default_cache_dir()
        self.max_bytes = max_bytes
        self.entries_dir = self.root / "entries"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        self.reserved = 0  # bytes of entries this process is writing (not yet in entries/)
        for d in (self.entries_dir, self.tmp_dir, self.locks_dir):
            d.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(account: str, container: str, blob: str, etag: str | None) -> str:
        text = "\n".join((account, container, blob, etag or ""))
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    def lock(self, key: str) -> EntryLock:
        return EntryLock(self.locks_dir / f"{key}.lock")

    def entry_paths(self, key: str) -> tuple[Path, Path]:
        """Where entry `key`'s bytes and its metadata are published (whether or not they are)."""
        return self.entries_dir / f"{key}.bin", self.entries_dir / f"{key}.json"

    def lookup(self, key: str, identity: dict[str, Any]) -> CacheEntry | None:
        """The entry for `key` if it is complete and is what `identity` says (account, container,
        blob, etag, size); a truncated or foreign entry is removed. Touches the entry for LRU."""
        data_path, meta_path = self.entry_paths(key)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        ok = (
            isinstance(meta, dict)
            and meta.get("version") == META_VERSION
            and all(meta.get(k) == v for k, v in identity.items())
            and isinstance(meta.get("crc32c"), list)
        )
        try:
            ok = ok and data_path.stat().st_size == identity["size"]
        except OSError:
            ok = False
        entry = CacheEntry(key, data_path, meta_path, meta if isinstance(meta, dict) else {})
        if not ok:
            self.remove(entry)
            return None
        with contextlib.suppress(OSError):
            os.utime(meta_path)
        return entry

    def entries(self) -> list[CacheEntry]:
        out = []
        for meta_path in sorted(self.entries_dir.glob("*.json")):
            key = meta_path.stem
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = {}
            out.append(CacheEntry(key, self.entries_dir / f"{key}.bin", meta_path, meta))
        return out

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.entries_dir.glob("*.bin") if p.exists())

    def remove(self, entry: CacheEntry) -> None:
        # Metadata first: without it the data is not an entry any more.
        for p in (entry.meta_path, entry.data_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def make_room(self, incoming: int) -> bool:
        """Evict least recently used entries (not being written) until `incoming` bytes fit
        under max_bytes. Returns whether they fit."""
        if not self.max_bytes:
            return True
        if incoming > self.max_bytes:
            return False
        total = self.total_bytes() + self.reserved
        for entry in sorted(self.entries(), key=lambda e: e.last_used):
            if total + incoming <= self.max_bytes:
                break
            lock = self.lock(entry.key)
            try:
                if lock.try_acquire():
                    size = entry.data_path.stat().st_size if entry.data_path.exists() else 0
                    self.remove(entry)
                    total -= size
            finally:
                lock.release()
        return total + incoming <= self.max_bytes

    def verify(self, entry: CacheEntry) -> str | None:
        """Re-read an entry and check it against its metadata; None when good, else the problem."""
        try:
            info = _hash_file(entry.data_path, int(entry.meta.get("chunk_bytes", CHUNK_BYTES)))
        except OSError as e:
            return f"unreadable: {e}"
        if info["size"] != entry.meta.get("size"):
            return f"{info['size']} bytes, {entry.meta.get('size')} expected"
        if info["crc32c"] != entry.meta.get("crc32c"):
            return "CRC32C differs from the metadata"
        if entry.meta.get("sha256") and info["sha256"] != entry.meta["sha256"]:
            return "SHA-256 differs from the metadata"
        return None

    def prune(self, max_bytes: int | None = None, stale_seconds: float = 3600) -> list[str]:
        """Remove abandoned temporary files (their writer is gone) and evict to max_bytes (the
        cache's cap when None). Returns what was removed."""
        removed = []
        now = time.time()
        for tmp in self.tmp_dir.iterdir():
            key = tmp.name.split(".", 1)[0]
            lock = self.lock(key)
            try:
                if lock.try_acquire() or now - tmp.stat().st_mtime > stale_seconds:
                    tmp.unlink()
                    removed.append(str(tmp))
            except FileNotFoundError:
                pass
            finally:
                lock.release()
        cap = self.max_bytes if max_bytes is None else max_bytes
        if cap:
            before = {e.key for e in self.entries()}
            saved, self.max_bytes = self.max_bytes, cap
            self.make_room(0)
            self.max_bytes = saved
            removed += sorted(before - {e.key for e in self.entries()})
        return removed


def _hash_file(path: Path, chunk_bytes: int, with_sha256: bool = True) -> dict[str, Any]:
    """Size, CRC32C per chunk and (with_sha256) SHA-256 of a file, read once."""
    sha = _core.Sha256() if with_sha256 else None
    crcs = []
    size = 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(chunk_bytes)
        view = memoryview(buffer)
        while True:
            got = 0
            while got < chunk_bytes:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if not got:
                break
            crcs.append(_core.crc32c(view[:got]))
            if sha is not None:
                sha.update(view[:got])
            size += got
            if got < chunk_bytes:
                break
    return {"size": size, "crc32c": crcs, "sha256": sha.hexdigest() if sha is not None else None}


def _whole_crc(pieces: list[tuple[int, int, int]]) -> int:
    """CRC32C of a file from the CRCs of pieces that tile it: (offset, length, crc), any order."""
    crc = 0
    for _, length, piece in sorted(pieces):
        crc = _core.crc32c_combine(crc, piece, length)
    return crc


class EntryRefused(Exception):
    """A shard the cache will not take now (no room under the cap, the disk refuses the file);
    `why` says so for the report."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class EntryWrite:
    """One cache entry being written, by whoever holds its entry lock (the write-through writer
    of a load, or the fill after it): a file in tmp/ written at any offset, then published by
    publish() (fsync, read back and checked, data then metadata renamed into entries/), or
    removed by abandon(). Either releases the lock; nothing here is trusted before publication.
    """

    def __init__(
        self,
        cache: NvmeCache,
        key: str,
        identity: dict[str, Any],
        lock: EntryLock,
        expected_sha256: str | None = None,
        expected_crc32c: tuple[int, list[int]] | None = None,
    ) -> None:
        """Take the lock over (released on refusal) and make the temporary file, its whole size
        allocated now. expected_*: the manifest's SHA-256 and (chunk bytes, CRC32C per chunk).
        Raises EntryRefused."""
        self.cache = cache
        self.key = key
        self.identity = identity
        self.size = int(identity["size"])
        self.lock = lock
        self.expected_sha256 = expected_sha256
        self.expected_crc32c = expected_crc32c
        self.written = 0
        self.finished = False  # published or abandoned
        self._pieces: list[tuple[int, int, int]] = []  # (offset, length, CRC32C) received
        self._fd = -1
        self.tmp_path = cache.tmp_dir / f"{key}.{os.getpid()}.{threading.get_ident()}.part"
        if not cache.make_room(self.size):
            lock.release()
            raise EntryRefused(f"{self.size} bytes exceed cache_max_bytes {cache.max_bytes}")
        try:
            fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.posix_fallocate(fd, 0, self.size)  # no space: find out now, not mid-shard
            except OSError:
                os.close(fd)
                raise
        except OSError as e:
            with contextlib.suppress(OSError):
                self.tmp_path.unlink()
            lock.release()
            raise EntryRefused(f"cannot write to the cache: {e.strerror}") from None
        self._fd = fd
        with _reserved_lock:
            cache.reserved += self.size

    @property
    def complete(self) -> bool:
        return self.written == self.size

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write bytes [offset, offset + len(data)) of the shard; raises OSError."""
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
        self._pieces.append((offset, len(view), _core.crc32c(view)))
        self.written += len(view)

    def publish(self) -> str | None:
        """Check what is on disk and publish it as the entry; None when published, else why not
        (the file is then removed). Releases the lock either way."""
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            # What is on disk, read back, against what was received (CRC32C pieces combined) and
            # the manifest: its chunk CRCs when they use the cache's chunking, else its SHA-256.
            expected = self.expected_crc32c
            crcs_comparable = expected is not None and expected[0] == CHUNK_BYTES
            need_sha = bool(self.expected_sha256) and not crcs_comparable
            info = _hash_file(self.tmp_path, CHUNK_BYTES, with_sha256=need_sha)
            on_disk = _whole_crc(
                [
                    (i * CHUNK_BYTES, min(CHUNK_BYTES, info["size"] - i * CHUNK_BYTES), c)
                    for i, c in enumerate(info["crc32c"])
                ]
            )
            if info["size"] != self.size or on_disk != _whole_crc(self._pieces):
                return self.abandon("the bytes read back differ from the bytes received")
            if (crcs_comparable and expected is not None and info["crc32c"] != expected[1]) or (
                need_sha and info["sha256"] != self.expected_sha256
            ):
                return self.abandon("the bytes written differ from the manifest")
            meta = dict(
                self.identity,
                version=META_VERSION,
                chunk_bytes=CHUNK_BYTES,
                crc32c=info["crc32c"],
                created=time.time(),
            )
            if info["sha256"]:
                meta["sha256"] = info["sha256"]
            data_path, meta_path = self.cache.entry_paths(self.key)
            meta_tmp = self.tmp_path.with_suffix(".json")
            meta_tmp.write_text(json.dumps(meta))
            with open(meta_tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp_path, data_path)
            os.replace(meta_tmp, meta_path)  # published: the metadata goes last
            dir_fd = os.open(self.cache.entries_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            return self.abandon(f"publishing failed: {e.strerror}")
        self._finish()
        return None

    def abandon(self, why: str) -> str:
        """Remove what was written and release the lock; returns `why`."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(OSError):
            self.tmp_path.unlink()
        with contextlib.suppress(OSError):
            self.tmp_path.with_suffix(".json").unlink()
        self._finish()
        return why

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            with _reserved_lock:
                self.cache.reserved -= self.size
            self.lock.release()


_reserved_lock = threading.Lock()  # NvmeCache.reserved is shared by a load's writer and the fill


@dataclass
class _Pending:
    index: int
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
        self._names: dict[int, str] = {}
        self._budget = queue_bytes
        self._queued = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, int, bytes] | None] = queue.Queue()
        self._complete: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="blob2gpu-cache-writer", daemon=True)
        self._publisher = threading.Thread(
            target=self._run_publisher, name="blob2gpu-cache-publisher", daemon=True
        )
        self._thread.start()
        self._publisher.start()

    def begin(
        self,
        index: int,
        name: str,
        key: str,
        identity: dict[str, Any],
        lock: EntryLock,
        expected_sha256: str | None,
        expected_crc32c: tuple[int, list[int]] | None = None,
    ) -> None:
        """Start writing shard `index` (the caller holds its entry lock, now ours).
        expected_*: the manifest's SHA-256 and (chunk bytes, CRC32C per chunk) of the file."""
        self._names[index] = name
        try:
            entry = EntryWrite(self.cache, key, identity, lock, expected_sha256, expected_crc32c)
        except EntryRefused as e:
            self.stats.skipped[name] = e.why
            return
        self._pending[index] = _Pending(index, entry)

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
        self._queue.put((index, offset, bytes(view)))

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
                self.stats.written.append(self._names[p.index])
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
        self.stats.skipped.setdefault(self._names[p.index], why)

    def close(self) -> WriterStats:
        """Finish queued writes, give up shards not complete, release every lock."""
        self._queue.put(None)
        self._thread.join()
        self._publisher.join()
        for p in self._pending.values():
            if not p.entry.finished:
                self._abandon(p, "the load ended before the shard was complete")
        return self.stats
