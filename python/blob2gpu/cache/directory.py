"""The cache directory on the node's disk, as a load may use it: whatever another process on the
node can write there is input, not state.

The directory is opened once per use, and its owner and mode are checked then: it must belong
to this process's user or root, and be writable by no one else unless it has the sticky bit (a
directory shared on purpose, like /tmp: others may add files but not replace or remove ours).
Every file under it is reached through a descriptor of its subdirectory (openat), never through
a symlink (O_NOFOLLOW) and never as anything but a regular file (opened O_NONBLOCK, so a FIFO
cannot block the open, then fstat-checked). Files this process creates get unpredictable names
and O_EXCL, so nothing planted in advance is written through. Reads of a file another process
could have written are bounded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from blob2gpu import _core
from blob2gpu.errors import ConfigError

ENTRIES, TMP, LOCKS = "entries", "tmp", "locks"
SUBDIRECTORIES = (ENTRIES, TMP, LOCKS)
DIRECTORY_MODE = 0o755  # for the directories this process makes in a directory of its own
FILE_MODE = 0o644  # other users may read entries, never write them

_NO_FOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


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
            "cache directory has no default",
            hint="set cache_dir (BLOB2GPU_CACHE_DIR) or XDG_CACHE_HOME",
        ) from None
    return home / ".cache" / "blob2gpu"


class NotRegularFile(OSError):
    """A name in the cache directory that is not a regular file (a directory, FIFO, device or
    socket); a symlink is refused by the open itself (ELOOP)."""


class TooLarge(OSError):
    """A file is longer than a bounded read takes."""


def check_directory(path: Path, st: os.stat_result) -> None:
    """Raises ConfigError, naming the fix, when the directory `path` (its stat `st`) could be
    written by a user other than this process's and root: owned by another user, or writable by
    group or others without the sticky bit."""
    uid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"the cache directory '{path}' is not a directory", hint="set cache_dir")
    if st.st_uid not in (uid, 0):
        raise ConfigError(
            f"the cache directory '{path}' belongs to uid {st.st_uid}, not to this process's user "
            f"(uid {uid}) or root, so that user could replace what a load reads from it",
            hint="use a directory of this user's (cache_dir, BLOB2GPU_CACHE_DIR) or give it to "
            f"this user (chown {uid} '{path}')",
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        who = "group and others" if st.st_mode & stat.S_IWGRP else "others"
        if not st.st_mode & stat.S_IWOTH:
            who = "its group"
        raise ConfigError(
            f"the cache directory '{path}' is writable by {who} without the sticky bit, so "
            f"another user could replace what a load reads from it: chmod go-w '{path}', or "
            f"chmod +t '{path}' for a directory shared between users on purpose (a hostPath)"
        )


def writable_by_others(mode: int) -> bool:
    """Whether a file or directory of st_mode `mode` may be written (for a directory: files
    added to it) by users other than its owner (group or other write)."""
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


class CacheDirectory:
    """The cache directory, opened: a descriptor for it and for each of entries/, tmp/ and locks/,
    checked (check_directory) when opened. `shared`: other users may add files to it (it is
    group- or world-writable, with the sticky bit), so what no authority from Blob vouches for
    must not be read from it. Close it (or let it be collected) to release the descriptors.

    Raises ConfigError for a directory another user could write (or a symlink in the place of a
    subdirectory), OSError when it cannot be made or opened."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fds: dict[str, int] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        root = self.root
        if not root.exists():
            root.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # ours, whatever the umask says
                os.chmod(root, DIRECTORY_MODE)
        # The root itself is the operator's path (it may be a link they made); what is under it
        # is reached through this descriptor only.
        fd = self._fds[""] = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        check_directory(root, st)
        self.shared = writable_by_others(st.st_mode)
        for name in SUBDIRECTORIES:
            try:
                os.mkdir(name, 0o700, dir_fd=fd)  # opened, then given its mode below
                made = True
            except FileExistsError:
                made = False
            path = root / name
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NO_FOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ConfigError(
                        f"'{path}' is not a directory (a symlink or a file is in its place)",
                        hint="remove it, the cache makes it again",
                    ) from None
                raise
            self._fds[name] = sub
            sub_st = os.fstat(sub)
            if made:  # as shared as the root (its mode, sticky bit included), else 0755
                mode = stat.S_IMODE(st.st_mode) if self.shared else DIRECTORY_MODE
                with contextlib.suppress(OSError):
                    os.chmod(sub, mode)
                sub_st = os.fstat(sub)
            check_directory(path, sub_st)
            self.shared = self.shared or writable_by_others(sub_st.st_mode)

    def fd(self, subdirectory: str) -> int:
        """The descriptor of entries/, tmp/ or locks/."""
        return self._fds[subdirectory]

    def path(self, subdirectory: str, name: str = "") -> Path:
        """Where a name lives, for messages and listings (never opened by this path)."""
        return self.root / subdirectory / name if name else self.root / subdirectory

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()

    # -- files --------------------------------------------------------------------------------
    def open_regular(self, subdirectory: str, name: str, size: int | None = None) -> int:
        """Open an existing regular file read-only, never through a symlink (ELOOP) and never a
        FIFO or device (NotRegularFile), of `size` bytes when given (else OSError EINVAL);
        returns its descriptor. Raises OSError."""
        (opened,) = self.open_regular_many(subdirectory, [name], [size])
        if isinstance(opened, OSError):
            raise opened
        return opened.fd

    def open_regular_many(
        self,
        subdirectory: str,
        names: list[str],
        sizes: list[int | None],
        touch: list[str] | None = None,
    ) -> list[_core.OpenedFile | OSError]:
        """open_regular() of each name: the core's OpenedFile (its descriptor for the caller to
        close, its owner and mode), or the OSError open_regular() would raise. A kept file's
        touch[i] (when given and not empty) is touched as touch() does. The core opens, checks
        and touches them all in one call: one return of the GIL, not three per file."""
        files = _core.open_regular_files(
            names,
            [-1 if size is None else size for size in sizes],
            touch=touch or [],
            dir_fd=self._fds[subdirectory],
        )
        return [self._opened(subdirectory, n, f) for n, f in zip(names, files, strict=True)]

    def _opened(
        self, subdirectory: str, name: str, file: _core.OpenedFile
    ) -> _core.OpenedFile | OSError:
        if file.fd >= 0:
            return file
        where = str(self.path(subdirectory, name))
        if file.error:
            return OSError(file.error, os.strerror(file.error), where)  # its subclass by errno
        if not file.regular:
            return NotRegularFile(errno.EINVAL, "not a regular file", where)
        return OSError(errno.EINVAL, "not of the recorded size", where)

    def open_or_create(self, subdirectory: str, name: str) -> int:
        """Open a regular file for reading, made (O_EXCL) when missing, never through a symlink;
        a file another user made is opened without O_CREAT (which protected_regular would refuse
        in a sticky directory). Returns its descriptor; raises OSError."""
        for _ in range(8):
            try:
                return self.open_regular(subdirectory, name)
            except FileNotFoundError:
                pass
            try:
                fd = os.open(
                    name,
                    os.O_RDONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW,
                    FILE_MODE,
                    dir_fd=self._fds[subdirectory],
                )
            except FileExistsError:
                continue  # made meanwhile by another process: open that one
            return fd
        where = str(self.path(subdirectory, name))
        raise OSError(errno.EAGAIN, "kept appearing and disappearing", where)

    def create_temporary(self, key: str, suffix: str) -> tuple[str, int]:
        """A new file in tmp/ named `key`.<random><suffix>, made with O_EXCL (nothing planted at a
        name can be written through, and no name can be guessed in advance) for reading and
        writing; returns (its name, its descriptor). Raises OSError."""
        name = f"{key}.{secrets.token_hex(8)}{suffix}"
        fd = os.open(
            name,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | _NO_FOLLOW,
            FILE_MODE,
            dir_fd=self._fds[TMP],
        )
        return name, fd

    def read_bounded(self, subdirectory: str, name: str, limit: int) -> bytes:
        """The whole of a regular file of at most `limit` bytes (TooLarge beyond). Raises
        OSError (FileNotFoundError, ELOOP for a symlink, NotRegularFile, TooLarge)."""
        (read,) = self.read_bounded_many(subdirectory, [name], limit)
        if isinstance(read, OSError):
            raise read
        return read

    def read_bounded_many(
        self, subdirectory: str, names: list[str], limit: int
    ) -> list[bytes | OSError]:
        """read_bounded() of each name: its bytes, or the OSError it would raise. The core opens,
        checks and reads them all in one call: one return of the GIL, not several per file."""
        files = _core.read_small_files(
            names, limit, follow_symlinks=False, dir_fd=self._fds[subdirectory]
        )
        return [self._bounded(subdirectory, n, limit, f) for n, f in zip(names, files, strict=True)]

    def _bounded(
        self, subdirectory: str, name: str, limit: int, file: _core.SmallFile
    ) -> bytes | OSError:
        where = str(self.path(subdirectory, name))
        if file.error:
            return OSError(file.error, os.strerror(file.error), where)  # its subclass by errno
        if not file.regular:
            return NotRegularFile(errno.EINVAL, "not a regular file", where)
        if file.over_limit:
            return TooLarge(errno.EFBIG, f"longer than {limit} bytes", where)
        return file.data

    def lstat(self, subdirectory: str, name: str) -> os.stat_result:
        """The name's own stat (a symlink is not followed). Raises OSError."""
        return os.stat(name, dir_fd=self._fds[subdirectory], follow_symlinks=False)

    def names(self, subdirectory: str) -> list[str]:
        """The names in a subdirectory, sorted."""
        return sorted(os.listdir(self._fds[subdirectory]))

    def unlink(self, subdirectory: str, name: str) -> None:
        """Remove a name (a symlink itself, never its target); a missing one is fine. Raises
        OSError (EPERM: another user's file in a sticky directory)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._fds[subdirectory])

    def touch(self, subdirectory: str, name: str) -> None:
        """Set a file's modification time to now (LRU), never a symlink's target."""
        with contextlib.suppress(OSError):  # another user's entry: its time stays
            os.utime(name, dir_fd=self._fds[subdirectory], follow_symlinks=False)

    def publish(self, tmp_name: str, entry_name: str) -> None:
        """Rename tmp/<tmp_name> over entries/<entry_name> (atomic). Raises OSError."""
        os.rename(tmp_name, entry_name, src_dir_fd=self._fds[TMP], dst_dir_fd=self._fds[ENTRIES])

    def sync(self, subdirectory: str) -> None:
        """fsync a subdirectory (its renames are durable)."""
        os.fsync(self._fds[subdirectory])
