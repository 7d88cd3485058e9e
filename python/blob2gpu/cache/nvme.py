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

CHUNK_BYTES = 4 << 20
META_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blob2gpu"


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

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.entries_dir / f"{key}.bin", self.entries_dir / f"{key}.json"

    def lookup(self, key: str, identity: dict[str, Any]) -> CacheEntry | None:
        """The entry for `key` if it is complete and is what `identity` says (account, container,
        blob, etag, size); a truncated or foreign entry is removed. Touches the entry for LRU."""
        data_path, meta_path = self._paths(key)
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


@dataclass
class _Pending:
    index: int
    key: str
    identity: dict[str, Any]
    lock: EntryLock
    fd: int
    tmp_path: Path
    expected_sha256: str | None
    expected_crc32c: tuple[int, list[int]] | None = None  # the manifest's (chunk bytes, CRCs)
    written: int = 0
    done: bool = False
    pieces: list[tuple[int, int, int]] = field(default_factory=list)  # what was received


@dataclass
class WriterStats:
    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # shard name -> why it was not cached


class CacheWriter:
    """Writes shards to the cache in the background while they stream from Blob (write-through).

    The feeder offers each range before committing it; a bounded queue of copies decouples the
    disk from the load: when the disk falls behind or fills up, that shard is simply not cached.
    A complete shard is published (fsync, read back and hashed, renamed) by a second thread, so
    the writes of the other shards go on meanwhile.
    """

    def __init__(self, cache: NvmeCache, buffer_bytes: int = 256 << 20) -> None:
        self.cache = cache
        self.stats = WriterStats()
        self._pending: dict[int, _Pending] = {}
        self._names: dict[int, str] = {}
        self._budget = buffer_bytes
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
        size = identity["size"]
        if not self.cache.make_room(size):
            lock.release()
            self.stats.skipped[name] = f"{size} bytes exceed cache_max_bytes {self.cache.max_bytes}"
            return
        tmp_path = self.cache.tmp_dir / f"{key}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.posix_fallocate(fd, 0, size)  # no space: find out now, not mid-shard
            except OSError:
                os.close(fd)
                raise
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
            lock.release()
            self.stats.skipped[name] = f"cannot write to the cache: {e.strerror}"
            return
        self._pending[index] = _Pending(
            index, key, identity, lock, fd, tmp_path, expected_sha256, expected_crc32c
        )
        with self._lock:
            self.cache.reserved += size

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
            self._publish(p)

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
            if p.fd < 0:
                continue
            try:
                os.pwrite(p.fd, data, offset)
            except OSError as e:
                self._abandon(p, f"write failed: {e.strerror}")
                continue
            p.pieces.append((offset, len(data), _core.crc32c(data)))
            p.written += len(data)
            if p.written == p.identity["size"]:
                self._complete.put(p)

    def _publish(self, p: _Pending) -> None:
        name = self._names[p.index]
        try:
            os.fsync(p.fd)
            os.close(p.fd)
            p.fd = -1
            # What is on disk, read back, against what was received (CRC32C pieces combined) and
            # the manifest: its chunk CRCs when they use the cache's chunking, else its SHA-256.
            expected_crcs = p.expected_crc32c[1] if p.expected_crc32c is not None else None
            crcs_comparable = p.expected_crc32c is not None and p.expected_crc32c[0] == CHUNK_BYTES
            need_sha = bool(p.expected_sha256) and not crcs_comparable
            info = _hash_file(p.tmp_path, CHUNK_BYTES, with_sha256=need_sha)
            on_disk = _whole_crc(
                [
                    (i * CHUNK_BYTES, min(CHUNK_BYTES, info["size"] - i * CHUNK_BYTES), c)
                    for i, c in enumerate(info["crc32c"])
                ]
            )
            if info["size"] != p.identity["size"] or on_disk != _whole_crc(p.pieces):
                self._abandon(p, "the bytes read back differ from the bytes received")
                return
            if (crcs_comparable and info["crc32c"] != expected_crcs) or (
                need_sha and info["sha256"] != p.expected_sha256
            ):
                self._abandon(p, "the bytes written differ from the manifest")
                return
            meta = dict(
                p.identity,
                version=META_VERSION,
                chunk_bytes=CHUNK_BYTES,
                crc32c=info["crc32c"],
                created=time.time(),
            )
            if info["sha256"]:
                meta["sha256"] = info["sha256"]
            data_path, meta_path = self.cache._paths(p.key)
            meta_tmp = p.tmp_path.with_suffix(".json")
            meta_tmp.write_text(json.dumps(meta))
            with open(meta_tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(p.tmp_path, data_path)
            os.replace(meta_tmp, meta_path)  # published: the metadata goes last
            dir_fd = os.open(self.cache.entries_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            self.stats.written.append(name)
            with self._lock:
                self.cache.reserved -= p.identity["size"]
        except OSError as e:
            self._abandon(p, f"publishing failed: {e.strerror}")
            return
        finally:
            p.done = True
        p.lock.release()

    def _abandon(self, p: _Pending, why: str) -> None:
        if not p.done or p.fd >= 0:
            with self._lock:
                self.cache.reserved -= p.identity["size"]
        p.done = True
        if p.fd >= 0:
            os.close(p.fd)
            p.fd = -1
        with contextlib.suppress(OSError):
            p.tmp_path.unlink()
        with contextlib.suppress(OSError):
            p.tmp_path.with_suffix(".json").unlink()
        p.lock.release()
        self.stats.skipped.setdefault(self._names[p.index], why)

    def close(self) -> WriterStats:
        """Finish queued writes, give up shards not complete, release every lock."""
        self._queue.put(None)
        self._thread.join()
        self._publisher.join()
        for p in self._pending.values():
            if not p.done or p.fd >= 0:
                self._abandon(p, "the load ended before the shard was complete")
        return self.stats
