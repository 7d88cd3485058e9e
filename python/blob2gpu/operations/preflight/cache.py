"""The cache directory's checks: its owner and mode (no other user can replace what a load reads
from it), writable, fast enough, and what its entries hold."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from blob2gpu.operations.preflight.result import (
    FAIL,
    OK,
    WARN,
    Check,
    MiB,
    PreflightRun,
    gb,
    mib,
)
from blob2gpu.settings import ResolvedSettings, resolve

CACHE_DIR_ENV = "BLOB2GPU_CACHE_DIR"


CACHE_PROBE_BYTES = 64 << 20  # written and fsynced once to measure the cache disk


SLOW_CACHE_MBPS = 200.0  # below this a local cache hardly beats a good network path


def default_cache_dir(settings: ResolvedSettings | None = None) -> Path:
    """The cache directory the loader would use: the `cache_dir` setting (keyword,
    $BLOB2GPU_CACHE_DIR or config file), else the cache tier's own default."""
    from blob2gpu.cache.nvme import default_cache_dir as cache_tier_default

    configured = (settings if settings is not None else resolve()).cache_dir
    return Path(configured) if configured else cache_tier_default()


def check_cache(run: PreflightRun, cache_dir: Path, probe_bytes: int) -> None:
    t = time.perf_counter()
    created: list[Path] = []
    path = cache_dir.expanduser()
    try:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        created = sorted(missing, key=lambda p: len(p.parts), reverse=True)  # deepest first
    except OSError as e:
        run.add(
            Check(
                "cache_dir",
                FAIL,
                f"{path}: cannot create ({e.strerror})",
                f"set --cache-dir or {CACHE_DIR_ENV} to a writable local (NVMe) path",
            ),
            t,
        )
        return
    try:
        _check_cache_contents(run, path, created, probe_bytes, t)
    finally:
        for p in created:  # leave no trace of directories this run made
            try:
                p.rmdir()
            except OSError:
                pass


def _check_cache_contents(
    run: PreflightRun, path: Path, created: list[Path], probe_bytes: int, t: float
) -> None:
    from blob2gpu.cache.directory import check_directory
    from blob2gpu.errors import ConfigError

    try:
        check_directory(path, os.stat(path))
    except ConfigError as e:
        run.add(Check("cache_dir", FAIL, f"{path}: another user could write it", str(e)), t)
        return
    except OSError as e:
        run.add(Check("cache_dir", FAIL, f"{path}: cannot stat ({e.strerror})"), t)
        return
    state = "writable; created, then removed again" if created else "present, writable"
    # An unpredictable name, made with O_EXCL and never through a symlink (_write_probe).
    probe = path / f".blob2gpu-preflight-{os.getpid()}-{secrets.token_hex(8)}"
    try:
        seconds = _write_probe(probe, probe_bytes)
        read = _read_probe(probe, probe_bytes)
    except OSError as e:
        run.add(
            Check(
                "cache_dir",
                FAIL,
                f"{path}: not writable ({e.strerror})",
                f"set --cache-dir or {CACHE_DIR_ENV} to a writable local (NVMe) path",
            ),
            t,
        )
        return
    run.add(Check("cache_dir", OK, f"{path} ({state})", data={"path": str(path)}), t)

    t = time.perf_counter()
    usage = shutil.disk_usage(path)
    data: dict[str, Any] = {"free_bytes": usage.free, "total_bytes": usage.total}
    value = f"{gb(usage.free)} free of {gb(usage.total)}"
    if run.model_bytes is not None and usage.free < run.model_bytes:
        hint = f"the cache cannot hold the model ({gb(run.model_bytes)}): use a larger disk"
        run.add(Check("cache_free_space", WARN, value, hint, data=data), t)
    else:
        run.add(Check("cache_free_space", OK, value, data=data), t)

    t = time.perf_counter()
    mbps = probe_bytes / seconds / 1e6 if seconds > 0 else float("inf")
    value = f"{mbps:,.0f} MB/s ({mib(probe_bytes)} written and fsynced)"
    data = {"mb_per_s": round(mbps, 1), "bytes": probe_bytes, "seconds": round(seconds, 4)}
    if mbps < SLOW_CACHE_MBPS:
        hint = "slow for a model cache: put the cache on local NVMe (Azure: the temp/NVMe disk)"
        run.add(Check("cache_write", WARN, value, hint, data=data), t)
    else:
        run.add(Check("cache_write", OK, value, data=data), t)

    t = time.perf_counter()
    direct, read_seconds = read
    mbps = probe_bytes / read_seconds / 1e6 if read_seconds > 0 else float("inf")
    how = "O_DIRECT, page cache bypassed" if direct else "buffered: the filesystem refuses O_DIRECT"
    data = {"mb_per_s": round(mbps, 1), "direct_io": direct}
    run.add(Check("cache_read", OK, f"{mbps:,.0f} MB/s ({how})", data=data), t)


def _read_probe(probe: Path, nbytes: int) -> tuple[bool, float]:
    """Read the probe back as cache hits are read (O_DIRECT where the filesystem allows it, see
    cache_direct_io), then delete it; returns (O_DIRECT worked, seconds)."""
    import mmap

    buffer = mmap.mmap(-1, 4 * MiB)  # page-aligned, as O_DIRECT wants
    try:
        try:
            fd = os.open(probe, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_DIRECT", 0))
            direct = hasattr(os, "O_DIRECT")
        except OSError:
            fd, direct = os.open(probe, os.O_RDONLY | os.O_NOFOLLOW), False
        started = time.perf_counter()
        try:
            done = 0
            while done < nbytes:
                try:
                    n = os.preadv(fd, [buffer], done)
                except OSError:
                    if not direct:
                        raise
                    os.close(fd)  # O_DIRECT opened but refused the read: buffered instead
                    fd, direct = os.open(probe, os.O_RDONLY | os.O_NOFOLLOW), False
                    continue
                if n <= 0:
                    break
                done += n
        finally:
            os.close(fd)
        return direct, time.perf_counter() - started
    finally:
        buffer.close()
        probe.unlink(missing_ok=True)


def _write_probe(probe: Path, nbytes: int) -> float:
    """Write `nbytes` to `probe` and fsync it; returns the seconds the write took. The caller
    reads it back (_read_probe), which deletes it; on a failed write it is deleted here."""
    block = os.urandom(min(nbytes, 4 * MiB))
    started = time.perf_counter()
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        probe.unlink(missing_ok=True)
        raise
    os.close(fd)
    return time.perf_counter() - started
