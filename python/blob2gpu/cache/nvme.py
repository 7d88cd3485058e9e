"""The NVMe cache tier: Blob shards kept on local disk, keyed by account, container, blob and
etag, so a node that restarts loads at disk speed while Blob stays the source of truth.

Layout under cache_dir (cache/directory.py opens and checks it):
  entries/<key>.bin   a shard's bytes          entries/<key>.json  its record (published last)
  tmp/                files being written       locks/<key>.lock    one writer per entry per node
An entry is published only after its bytes were written, fsync'ed, read back and checked (against
the manifest when there is one), by renaming the data and then the record into entries/. A process
killed mid-write leaves only a file in tmp/, which nothing trusts.

Nothing in the directory is trusted: a record (cache/record.py) says which blob version an entry
holds and what was written, never what the bytes must be; a load checks a hit against Blob's
authority (cache/checks.py). An entry whose record is malformed, whose data is not a regular file
of the listed size, or that is unreadable, is a miss and is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blob2gpu import _core
from blob2gpu.cache.checks import CHUNK_BYTES, BlobChecks, hash_file
from blob2gpu.cache.directory import (
    ENTRIES,
    LOCKS,
    TMP,
    CacheDirectory,
    NotRegularFile,
    default_cache_dir,
)
from blob2gpu.cache.record import (
    MAX_RECORD_BYTES,
    EntryRecord,
    MalformedRecord,
    parse_record,
)

__all__ = [
    "CHUNK_BYTES",
    "CacheEntry",
    "EntryLock",
    "EntryRefused",
    "EntryWrite",
    "NvmeCache",
    "default_cache_dir",
]

# Records read at one call of the core: a load's lookups cost a return of the GIL per batch, and
# a batch holds at most 4 x MAX_RECORD_BYTES (64 MiB) of what others on the node may have written.
RECORD_BATCH = 4


@dataclass
class CacheEntry:
    """An entry as the directory has it: its key, where its bytes and record are, the record's
    fields (`meta`, empty when malformed) and, when it is not a usable entry, `problem`."""

    key: str
    data_path: Path
    meta_path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    record: EntryRecord | None = None
    problem: str | None = None  # a malformed or unreadable record

    @property
    def size(self) -> int:
        return self.record.size if self.record is not None else 0

    @property
    def last_used(self) -> float:
        try:
            return self.meta_path.lstat().st_mtime
        except OSError:
            return 0.0


class EntryLock:
    """An exclusive per-entry file lock: the process holding it is the one writing the entry.
    The lock file is opened without O_CREAT when it exists, never through a symlink; raises
    OSError (a symlink or FIFO in its place: ELOOP, NotRegularFile)."""

    def __init__(self, directory: CacheDirectory, key: str) -> None:
        self._fd = directory.open_or_create(LOCKS, f"{key}.lock")
        self.held = False

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        return True

    def acquire(self, timeout: float) -> bool:
        """Wait for the lock, at most `timeout` seconds; returns whether it is held. Polled, not
        a blocking flock: a holder that never lets go (a hung process, or anyone who can open
        the file) must not stall a load for ever."""
        deadline, pause = time.monotonic() + timeout, 0.01
        while not self.try_acquire():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.5)
        return True

    def release(self) -> None:
        if self._fd >= 0:
            if self.held:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
            self.held = False


class NvmeCache:
    """The cache directory. `max_bytes` 0 means no cap. Raises ConfigError for a directory another
    user could write (CacheDirectory), OSError when it cannot be made."""

    def __init__(self, directory: str | os.PathLike[str] | None, max_bytes: int = 0) -> None:
        self.root = Path(directory) if directory else default_cache_dir()
        self.max_bytes = max_bytes
        self.dir = CacheDirectory(self.root)
        self.entries_dir = self.dir.path(ENTRIES)
        self.tmp_dir = self.dir.path(TMP)
        self.reserved = 0  # bytes of entries this process is writing (not yet in entries/)

    @property
    def shared(self) -> bool:
        """Whether other users may add files to the directory (see CacheDirectory)."""
        return self.dir.shared

    def close(self) -> None:
        """Release the directory's descriptors."""
        self.dir.close()

    @staticmethod
    def key(account: str, container: str, blob: str, etag: str | None) -> str:
        text = "\n".join((account, container, blob, etag or ""))
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    @staticmethod
    def key_of(identity: Mapping[str, object]) -> str:
        """The key of the entry holding `identity` (its account, container, blob and etag)."""
        account, container, blob, etag = (
            str(identity[k] or "") for k in ("account", "container", "blob", "etag")
        )
        return NvmeCache.key(account, container, blob, etag)

    def lock(self, key: str) -> EntryLock:
        return EntryLock(self.dir, key)

    def read_records(self, keys: list[str]) -> dict[str, bytes | OSError]:
        """The records of entries `keys` as lookup() takes them (`read`): their bytes, or why
        they could not be read; RECORD_BATCH of them at a call."""
        records: dict[str, bytes | OSError] = {}
        for start in range(0, len(keys), RECORD_BATCH):
            batch = keys[start : start + RECORD_BATCH]
            names = [f"{key}.json" for key in batch]
            reads = self.dir.read_bounded_many(ENTRIES, names, MAX_RECORD_BYTES)
            records.update(zip(batch, reads, strict=True))
        return records

    def _entry(self, key: str, read: bytes | OSError | None = None) -> CacheEntry:
        """Entry `key` with its record read (bounded, never through a symlink; `read`: as
        read_records() read it) and parsed; a record that is missing, unreadable or malformed
        leaves `problem` set."""
        entry = CacheEntry(key, self.entries_dir / f"{key}.bin", self.entries_dir / f"{key}.json")
        try:
            if read is None:
                read = self.dir.read_bounded(ENTRIES, f"{key}.json", MAX_RECORD_BYTES)
            if isinstance(read, OSError):
                raise read
            record = parse_record(read)
        except FileNotFoundError:
            entry.problem = "no record"
        except MalformedRecord as e:
            entry.problem = f"malformed record: {e.why}"
        except OSError as e:
            entry.problem = f"unreadable record: {_reason(e)}"
        else:
            entry.record, entry.meta = record, record.as_dict()
        return entry

    def lookup(
        self, key: str, identity: dict[str, Any], read: bytes | OSError | None = None
    ) -> CacheEntry | None:
        """The entry for `key` if its record is well formed and says it holds what `identity` says
        (account, container, blob, etag, size), and its data is a regular file of that size; any
        other entry under `key` (truncated, foreign, malformed, a symlink or FIFO) is removed.
        Touches the entry for LRU. Whether its bytes are right is for its reader to check.
        read: its record as read_records() just read it (else read now)."""
        entry = self._entry(key, read)
        ok = entry.record is not None and entry.record.identity() == identity
        if ok:
            try:
                st = self.dir.lstat(ENTRIES, f"{key}.bin")
                ok = stat.S_ISREG(st.st_mode) and st.st_size == identity["size"]
            except OSError:
                ok = False
        if not ok:
            if self._exists(entry):
                self.remove(entry)
            return None
        self.dir.touch(ENTRIES, f"{key}.json")
        return entry

    def open_hits(
        self, wanted: dict[str, tuple[dict[str, Any], bytes | OSError | None]]
    ) -> dict[str, tuple[CacheEntry, _core.OpenedFile]]:
        """lookup() and open_data() at once, for each key in `wanted` (its identity, and its
        record as read_records() read it, or None to read it now): the entries whose record says
        they hold what their identity says, with their data opened (never through a symlink, a
        regular file of the recorded size, checked once through the descriptor; the caller
        closes it) and touched for LRU, every data file in one call of the core. Keys without a
        hit are left out, and whatever entry is under such a key is removed, unless its record
        was read ahead, which may be stale by now."""
        entries = {key: self._entry(key, read) for key, (_, read) in wanted.items()}
        matching = [
            key
            for key, entry in entries.items()
            if entry.record is not None and entry.record.identity() == wanted[key][0]
        ]
        opened = self.dir.open_regular_many(
            ENTRIES,
            [f"{key}.bin" for key in matching],
            [entries[key].size for key in matching],
            touch=[f"{key}.json" for key in matching],
        )
        hits = {
            key: (entries[key], file)
            for key, file in zip(matching, opened, strict=True)
            if not isinstance(file, OSError)
        }
        for key, entry in entries.items():
            # A record read ahead may be stale by now (another process published since): what is
            # there is removed only when read now; else the write-through, which looks up again
            # under the entry's lock, removes or replaces it.
            if key not in hits and wanted[key][1] is None and self._exists(entry):
                self.remove(entry)
        return hits

    def _exists(self, entry: CacheEntry) -> bool:
        for name in (f"{entry.key}.json", f"{entry.key}.bin"):
            with contextlib.suppress(OSError):
                self.dir.lstat(ENTRIES, name)
                return True
        return False

    def open_data(self, entry: CacheEntry) -> int:
        """A descriptor of the entry's data, opened never through a symlink, checked to be a
        regular file of the recorded size; the caller closes it. Raises OSError."""
        return self.dir.open_regular(ENTRIES, f"{entry.key}.bin", size=entry.size)

    def entries(self) -> list[CacheEntry]:
        """Every entry the directory has, by record name (those whose record is malformed, or
        whose data has no record, with `problem` set), sorted by key."""
        keys = set()
        for name in self.dir.names(ENTRIES):
            stem, dot, suffix = name.rpartition(".")
            if dot and suffix in ("json", "bin"):
                keys.add(stem)
        return [self._entry(key) for key in sorted(keys)]

    def total_bytes(self) -> int:
        return sum(self._data_bytes(n) for n in self.dir.names(ENTRIES) if n.endswith(".bin"))

    def _data_bytes(self, name: str) -> int:
        """The size of `name` in entries/ when it is a regular file, else 0."""
        with contextlib.suppress(OSError):
            st = self.dir.lstat(ENTRIES, name)
            return st.st_size if stat.S_ISREG(st.st_mode) else 0
        return 0

    def remove(self, entry: CacheEntry) -> None:
        """Remove the entry (its record first: without it the data is not an entry any more). A
        name this process may not remove (another user's, in a sticky directory) stays."""
        for name in (f"{entry.key}.json", f"{entry.key}.bin"):
            try:
                self.dir.unlink(ENTRIES, name)
            except IsADirectoryError:  # a directory planted in an entry's place, if empty
                with contextlib.suppress(OSError):
                    os.rmdir(name, dir_fd=self.dir.fd(ENTRIES))
            except OSError:
                pass

    def remove_data(self, entry: CacheEntry) -> None:
        """Remove the entry's data and keep its record, which `cache verify --repair` then reports
        (and fetches again); a lookup treats such an entry as a miss."""
        with contextlib.suppress(OSError):
            self.dir.unlink(ENTRIES, f"{entry.key}.bin")

    def make_room(self, incoming: int) -> bool:
        """Evict least recently used entries (not being written) until `incoming` bytes fit
        under max_bytes (0: no cap). Returns whether they fit."""
        return not self.max_bytes or self._evict_to(self.max_bytes, incoming)

    def _evict_to(self, limit: int, incoming: int = 0) -> bool:
        """Evict least recently used entries (not being written) until `incoming` bytes fit
        under `limit`. Returns whether they fit."""
        if incoming > limit:
            return False
        total = self.total_bytes() + self.reserved
        for entry in sorted(self.entries(), key=lambda e: e.last_used):
            if total + incoming <= limit:
                break
            try:
                lock = self.lock(entry.key)
            except OSError:
                continue
            try:
                if lock.try_acquire():
                    size = self._data_bytes(f"{entry.key}.bin")
                    self.remove(entry)
                    total -= size
            finally:
                lock.release()
        return total + incoming <= limit

    def verify(self, entry: CacheEntry) -> str | None:
        """Re-read an entry and check it against its record (damage on the disk: the record is
        what was written, not what Blob holds); None when good, else the problem."""
        if entry.record is None:
            return entry.problem or "no record"
        try:
            fd = self.open_data(entry)
        except FileNotFoundError:
            return "no data (removed as damaged, or never written)"
        except NotRegularFile:
            return "its data is not a regular file"
        except OSError as e:
            return f"unreadable: {_reason(e)}"
        try:
            digest = hash_file(fd, entry.record.chunk_bytes, sha256=bool(entry.record.sha256))
        except OSError as e:
            return f"unreadable: {_reason(e)}"
        finally:
            os.close(fd)
        if digest.size != entry.record.size:
            return f"{digest.size} bytes, {entry.record.size} expected"
        if digest.crc32c != entry.record.crc32c:
            return "CRC32C differs from the record"
        if entry.record.sha256 and digest.sha256 != entry.record.sha256:
            return "SHA-256 differs from the record"
        return None

    def prune(self, max_bytes: int | None = None, stale_seconds: float = 3600) -> list[str]:
        """Remove abandoned temporary files (their writer is gone) and evict down to max_bytes
        (0: every entry not being written; None: the cache's cap, if it has one). Returns what
        was removed."""
        removed = []
        now = time.time()
        for name in self.dir.names(TMP):
            key = name.split(".", 1)[0]
            try:
                lock = self.lock(key)
            except OSError:
                continue
            try:
                st = self.dir.lstat(TMP, name)
                if lock.try_acquire() or now - st.st_mtime > stale_seconds:
                    self.dir.unlink(TMP, name)
                    removed.append(str(self.tmp_dir / name))
            except OSError:
                pass
            finally:
                lock.release()
        cap = self.max_bytes if max_bytes is None else max_bytes
        if cap or max_bytes is not None:
            before = {e.key for e in self.entries()}
            self._evict_to(cap)
            removed += sorted(before - {e.key for e in self.entries()})
        return removed


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


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


_reserved_lock = threading.Lock()  # NvmeCache.reserved is shared by a load's writer and the fill


class EntryWrite:
    """One cache entry being written, by whoever holds its entry lock (the write-through writer
    of a load, or the fill after it): a file in tmp/ of an unpredictable name, made with O_EXCL,
    written at any offset, then published by publish() (fsync, read back through the same
    descriptor and checked, data then record renamed into entries/), or removed by abandon().
    Either releases the lock; nothing here is trusted before publication.
    """

    def __init__(
        self,
        cache: NvmeCache,
        key: str,
        identity: dict[str, Any],
        lock: EntryLock,
        checks: BlobChecks | None = None,
    ) -> None:
        """Take the lock over (released on refusal) and make the temporary file, its whole size
        allocated now. checks: what Blob says the bytes are (the manifest's checksums, or the
        Content-MD5), compared before publishing. Raises EntryRefused."""
        self.cache = cache
        self.key = key
        self.identity = identity
        self.size = int(identity["size"])
        self.lock = lock
        self.checks = checks or BlobChecks()
        self.written = 0
        self.finished = False  # published or abandoned
        self._pieces: list[tuple[int, int, int]] = []  # (offset, length, CRC32C) received
        self._fd = -1
        self._tmp_names: list[str] = []
        if not cache.make_room(self.size):
            lock.release()
            raise EntryRefused(f"{self.size} bytes exceed cache_max_bytes {cache.max_bytes}")
        try:
            name, fd = cache.dir.create_temporary(key, ".part")
            self._tmp_names.append(name)
            try:
                os.posix_fallocate(fd, 0, self.size)  # no space: find out now, not mid-shard
            except OSError:
                os.close(fd)
                raise
        except OSError as e:
            self._unlink_temporaries()
            lock.release()
            raise EntryRefused(f"cannot write to the cache: {_reason(e)}") from None
        self._fd = fd
        with _reserved_lock:
            cache.reserved += self.size

    @property
    def complete(self) -> bool:
        return self.written == self.size

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
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
            # What is on disk, read back through the descriptor written (no name is opened
            # again), against what was received (CRC32C pieces combined) and Blob's checks: the
            # manifest's chunk CRCs when they use the record's chunking, else its SHA-256 or the
            # Content-MD5.
            checks = self.checks
            expected = checks.chunk_crc32c
            crcs_comparable = expected is not None and expected[0] == CHUNK_BYTES
            need_sha = bool(checks.sha256) and not crcs_comparable
            need_md5 = checks.authority == "content-md5"
            digest = hash_file(self._fd, CHUNK_BYTES, sha256=need_sha, md5=need_md5)
            os.close(self._fd)
            self._fd = -1
            on_disk = _whole_crc(
                [
                    (i * CHUNK_BYTES, min(CHUNK_BYTES, digest.size - i * CHUNK_BYTES), c)
                    for i, c in enumerate(digest.crc32c)
                ]
            )
            if digest.size != self.size or on_disk != _whole_crc(self._pieces):
                return self.abandon("the bytes read back differ from the bytes received")
            if (
                (crcs_comparable and expected is not None and digest.crc32c != tuple(expected[1]))
                or (need_sha and digest.sha256 != checks.sha256)
                or (need_md5 and digest.md5 != checks.content_md5)
            ):
                return self.abandon("the bytes written differ from what Blob says they are")
            record = EntryRecord(
                account=self.identity["account"],
                container=self.identity["container"],
                blob=self.identity["blob"],
                etag=self.identity["etag"],
                size=self.size,
                chunk_bytes=CHUNK_BYTES,
                crc32c=digest.crc32c,
                sha256=digest.sha256,
                created=time.time(),
            )
            directory = self.cache.dir
            meta_name, meta_fd = directory.create_temporary(self.key, ".json.part")
            self._tmp_names.append(meta_name)
            try:
                view = memoryview(record.to_json().encode())
                while view:
                    view = view[os.write(meta_fd, view) :]
                os.fsync(meta_fd)
            finally:
                os.close(meta_fd)
            directory.publish(self._tmp_names[0], f"{self.key}.bin")
            directory.publish(meta_name, f"{self.key}.json")  # published: the record goes last
            self._tmp_names.clear()
            directory.sync(ENTRIES)
        except OSError as e:
            return self.abandon(f"publishing failed: {_reason(e)}")
        self._finish()
        return None

    def abandon(self, why: str) -> str:
        """Remove what was written and release the lock; returns `why`."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._unlink_temporaries()
        self._finish()
        return why

    def _unlink_temporaries(self) -> None:
        for name in self._tmp_names:
            with contextlib.suppress(OSError):
                self.cache.dir.unlink(TMP, name)
        self._tmp_names.clear()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            with _reserved_lock:
                self.cache.reserved -= self.size
            self.lock.release()
