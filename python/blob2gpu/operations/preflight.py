"""Node readiness before rollout (``blob2gpu preflight``): the CUDA driver, the GPUs, pinned
memory, the cache directory, the storage endpoint and its credentials, and whether the model fits.

Each check says ok / warn / fail / skip, a value and a hint. The run fails (exit 1) when any check
fails, so it fits a Kubernetes init container: a broken node is found before users are.
Nothing secret is printed: URIs and error texts pass through ``sources.redact``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blob2gpu import _core
from blob2gpu.errors import Blob2GpuError, InvalidArgument
from blob2gpu.loading.memory_fit import host_available_bytes
from blob2gpu.redaction import redact
from blob2gpu.settings import ResolvedSettings, resolve

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
CACHE_DIR_ENV = "BLOB2GPU_CACHE_DIR"
CACHE_PROBE_BYTES = 64 << 20  # written and fsynced once to measure the cache disk
SLOW_CACHE_MBPS = 200.0  # below this a local cache hardly beats a good network path
STORAGE_CONNECT_TIMEOUT = 5.0  # preflight must fail fast on a dead endpoint
MiB = 1 << 20


@dataclass
class Check:
    """One preflight check: its status, what was measured (`value`) and what to do (`hint`)."""

    name: str
    status: str
    value: str
    hint: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # the numbers behind `value`, for --json
    seconds: float = 0.0


@dataclass
class PreflightResult:
    """Every check of one preflight run; `ok` is False when any check failed."""

    device: str
    source: str | None  # redacted
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    @property
    def exit_code(self) -> int:
        """0 when nothing failed, 1 otherwise (an init container's verdict)."""
        return 0 if self.ok else 1

    def check(self, name: str) -> Check:
        """The check named `name`; raises KeyError when it did not run."""
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        counts = {s: sum(c.status == s for c in self.checks) for s in (OK, WARN, FAIL, SKIP)}
        return {
            "ok": self.ok,
            "device": self.device,
            "source": self.source,
            "counts": counts,
            "checks": [asdict(c) for c in self.checks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """One line per check (status, name, value, hint), and a verdict line."""
        name_w = max(len(c.name) for c in self.checks)
        value_w = min(max(len(c.value) for c in self.checks), 72)
        lines = [f"{'STATUS':<6}  {'CHECK':<{name_w}}  {'VALUE':<{value_w}}  HINT"]
        for c in self.checks:
            line = f"{c.status.upper():<6}  {c.name:<{name_w}}  {c.value:<{value_w}}  {c.hint}"
            lines.append(line.rstrip())
        counts = self.to_dict()["counts"]
        verdict = "ready" if self.ok else "NOT READY"
        lines.append(
            f"preflight: {verdict} ({counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail, "
            f"{counts[SKIP]} skip)"
        )
        return "\n".join(lines)


def _gb(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def default_cache_dir(settings: ResolvedSettings | None = None) -> Path:
    """The cache directory the loader would use: the `cache_dir` setting (keyword,
    $BLOB2GPU_CACHE_DIR or config file), else the cache tier's own default."""
    from blob2gpu.cache.nvme import default_cache_dir as cache_tier_default
    from blob2gpu.settings import resolve

    configured = (settings if settings is not None else resolve()).cache_dir
    return Path(configured) if configured else cache_tier_default()


class _Run:
    """The state one preflight run shares between its checks."""

    def __init__(self, device: str, settings: ResolvedSettings) -> None:
        self.device = device  # 'auto', 'cpu' or 'cuda:N'
        self.settings = settings
        self.checks: list[Check] = []
        self.driver: _core.DriverInfo = {"available": False}
        self.model_bytes: int | None = None
        self.model_bytes_from = ""

    @property
    def wants_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def ordinal(self) -> int:
        return int(self.device.split(":")[1]) if self.wants_gpu else 0

    @property
    def gpu_missing_status(self) -> str:
        """A GPU check that cannot run fails when a GPU was asked for, and is skipped otherwise."""
        return FAIL if self.wants_gpu else SKIP

    def add(self, check: Check, started: float) -> Check:
        check.seconds = round(time.perf_counter() - started, 4)
        check.value, check.hint = redact(check.value), redact(check.hint)
        self.checks.append(check)
        return check


# -- GPU ------------------------------------------------------------------------------------------
def _check_driver(run: _Run) -> None:
    t = time.perf_counter()
    run.driver = _core.driver_info()
    if not run.driver.get("available"):
        run.add(
            Check(
                "cuda_driver",
                run.gpu_missing_status,
                _driver_error(str(run.driver.get("error", "not loadable"))),
                "install the NVIDIA driver (libcuda.so.1) or set BLOB2GPU_CUDA_DRIVER; "
                "device cpu needs none",
            ),
            t,
        )
        return
    devices = run.driver.get("devices", [])
    version = _cuda_version(int(run.driver["version"]))
    no_gpu = "the driver sees no GPU: check the device plugin and CUDA_VISIBLE_DEVICES"
    run.add(
        Check(
            "cuda_driver",
            OK if devices else run.gpu_missing_status if run.wants_gpu else WARN,
            f"CUDA {version} driver, {len(devices)} GPU(s), {run.driver['path']}",
            "" if devices else no_gpu,
            data={"path": run.driver["path"], "version": version, "gpus": len(devices)},
        ),
        t,
    )


def _driver_error(message: str) -> str:
    """The core's message without its advice (the hint says it) and dlerror's repeated path."""
    message = message.split(" (is an NVIDIA")[0]
    if "': " in message:
        head, _, tail = message.partition("': ")
        path = head.rsplit("'", 1)[-1]
        message = f"{head}': {tail.removeprefix(path + ': ')}"
    return message


def _check_gpus(run: _Run) -> None:
    t = time.perf_counter()
    devices = run.driver.get("devices", []) if run.driver.get("available") else []
    if not devices:
        run.add(Check("gpu", run.gpu_missing_status, "no GPU visible", ""), t)
        return
    for d in devices:
        t = time.perf_counter()
        name = f"gpu:{d['index']}"
        try:
            free, total, gpu_name = _core.device_memory(int(d["index"]))
        except Blob2GpuError as e:
            status = FAIL if run.wants_gpu and d["index"] == run.ordinal else WARN
            run.add(Check(name, status, f"{d['name']}: {e}", "check nvidia-smi on the node"), t)
            continue
        run.add(
            Check(
                name,
                OK,
                f"{gpu_name}, {_gb(free)} free of {_gb(total)}",
                data={"name": gpu_name, "free_bytes": free, "total_bytes": total},
            ),
            t,
        )
    if run.wants_gpu and run.ordinal >= len(devices):
        run.add(
            Check(
                "gpu",
                FAIL,
                f"{run.device} asked for, {len(devices)} GPU(s) visible",
                "pick a visible device (cuda:0 ...) or check CUDA_VISIBLE_DEVICES",
            ),
            time.perf_counter(),
        )


def _check_pinned(run: _Run) -> None:
    """Pins the whole staging ring once (cuMemHostAlloc, freed at once) on the target GPU: what a
    load's ring will ask of the driver. `ulimit -l` is reported, not judged: as far as is known
    NVIDIA's driver page-locks cuMemHostAlloc memory without RLIMIT_MEMLOCK (torch pins under
    Docker's 64 KiB default). To be verified on the first real GPU: bench/gpu_check.sh prints
    `ulimit -l` beside whether pinning the ring succeeded."""
    t = time.perf_counter()
    s = run.settings
    ring = s.staging_slots * s.staging_slot_bytes
    ring_text = f"{_mib(ring)} ring ({s.staging_slots} x {_mib(s.staging_slot_bytes)})"
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    unlimited = soft == resource.RLIM_INFINITY
    memlock = "unlimited" if unlimited else _mib(soft)
    devices = run.driver.get("devices", []) if run.driver.get("available") else []
    if not devices or run.ordinal >= len(devices):
        run.add(
            Check(
                "pinned_memory",
                run.gpu_missing_status,
                f"not probed (no {run.device if devices else 'GPU'}); ulimit -l {memlock}",
                "",
                data={"ring_bytes": ring, "memlock_bytes": None if unlimited else soft},
            ),
            t,
        )
        return
    try:
        # False: the driver had no memory left to page-lock; other driver errors raise.
        pinned = bool(_core.pinned_probe(run.ordinal, ring))
    except Blob2GpuError as e:
        pinned, error = False, str(e)
    else:
        error = ""
    data = {"ring_bytes": ring, "pinned": pinned, "memlock_bytes": None if unlimited else soft}
    if pinned:
        status, hint = OK, ""
        value = f"{ring_text} pinned (cuMemHostAlloc of the whole ring); ulimit -l {memlock}"
    else:
        fallback = s.use_pinned_host_fallback and not error  # only out of memory falls back
        status = WARN if fallback or not run.wants_gpu else FAIL
        value = f"{ring_text} could not be pinned; ulimit -l {memlock}" + (
            f" ({error})" if error else " (cuMemHostAlloc: out of memory)"
        )
        if error:
            hint = "the driver refused with an error other than out of memory, so loads will fail"
        else:
            outcome = (
                "loads fall back to pageable memory (slower copies)"
                if fallback
                else "use_pinned_host_fallback is off, so loads will fail"
            )
            hint = (
                "the driver had no host memory left to page-lock: lower staging_slots / "
                f"staging_slot_bytes or leave more host memory free; {outcome}"
            )
    run.add(Check("pinned_memory", status, value, hint, data=data), t)


# -- cache directory ------------------------------------------------------------------------------
def _check_cache(run: _Run, cache_dir: Path, probe_bytes: int) -> None:
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
    run: _Run, path: Path, created: list[Path], probe_bytes: int, t: float
) -> None:
    state = "writable; created, then removed again" if created else "present, writable"
    probe = path / f".blob2gpu-preflight-{os.getpid()}"
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
    value = f"{_gb(usage.free)} free of {_gb(usage.total)}"
    if run.model_bytes is not None and usage.free < run.model_bytes:
        hint = f"the cache cannot hold the model ({_gb(run.model_bytes)}): use a larger disk"
        run.add(Check("cache_free_space", WARN, value, hint, data=data), t)
    else:
        run.add(Check("cache_free_space", OK, value, data=data), t)

    t = time.perf_counter()
    mbps = probe_bytes / seconds / 1e6 if seconds > 0 else float("inf")
    value = f"{mbps:,.0f} MB/s ({_mib(probe_bytes)} written and fsynced)"
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
            fd = os.open(probe, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            direct = hasattr(os, "O_DIRECT")
        except OSError:
            fd, direct = os.open(probe, os.O_RDONLY), False
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
                    fd, direct = os.open(probe, os.O_RDONLY), False
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
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
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


# -- storage and the checkpoint -------------------------------------------------------------------
def _check_source(run: _Run, source: str | None) -> None:
    if not source:
        t = time.perf_counter()
        run.add(Check("storage", SKIP, "no --source (or MODEL_SOURCE_URI) given"), t)
        return
    from blob2gpu.sources.azure.location import is_blob_uri

    if is_blob_uri(source):
        _check_blob(run, source)
    else:
        _check_local(run, source)


def _check_local(run: _Run, source: str) -> None:
    from blob2gpu.sources import resolve as resolve_local

    t = time.perf_counter()
    run.add(Check("storage", SKIP, "local source: no storage endpoint"), t)
    t = time.perf_counter()
    try:
        plan = resolve_local(source)
    except Blob2GpuError as e:
        run.add(Check("checkpoint", FAIL, str(e), "check the path and that the node mounts it"), t)
        return
    _checkpoint_found(run, plan, t)


def _checkpoint_found(run: _Run, plan: Any, t: float) -> None:
    if run.model_bytes is None:
        run.model_bytes, run.model_bytes_from = plan.total_bytes, "the checkpoint"
    index = "with index" if plan.weight_map is not None else "no index"
    found = f"{len(plan.shards)} shard(s), {_gb(plan.total_bytes)} ({index})"
    data = {"shards": len(plan.shards), "bytes": plan.total_bytes}
    archived = [s.name for s in plan.shards if s.archived]
    if archived:
        # The service serves no bytes of these for hours; only cached copies can still load.
        cached = run.settings.local_nvme_cache_enabled
        run.add(
            Check(
                "checkpoint",
                WARN if cached else FAIL,
                f"{found}, {len(archived)} in the Archive tier ({', '.join(archived[:3])}"
                f"{', ...' if len(archived) > 3 else ''})"
                + ("; they load only from the NVMe cache" if cached else ""),
                "rehydrate them to Hot or Cool (az storage blob set-tier --tier Hot "
                "--rehydrate-priority High) or copy the checkpoint to an online tier",
                data={**data, "archived": archived},
            ),
            t,
        )
        return
    run.add(Check("checkpoint", OK, found, data=data), t)


_NETWORK_REASONS = (
    ("unable to connect to proxy", "the proxy (HTTPS_PROXY / HTTP_PROXY) cannot be reached"),
    ("connection refused", "connection refused (nothing listens there)"),
    ("name or service not known", "the host name does not resolve (DNS)"),
    ("temporary failure in name resolution", "the host name does not resolve (DNS)"),
    ("nodename nor servname", "the host name does not resolve (DNS)"),
    ("timed out", "the connection timed out"),
    ("network is unreachable", "the network is unreachable"),
    ("no route to host", "no route to host"),
    ("certificate verify failed", "TLS certificate verification failed"),
    ("connection reset", "the connection was reset"),
)


def _network_reason(message: str) -> str:
    """A transport error's cause in a few words (the SDK's text runs to hundreds of characters)."""
    lowered = message.lower()
    for needle, reason in _NETWORK_REASONS:
        if needle in lowered:
            return reason
    return message[:160]


def _check_blob(run: _Run, uri: str) -> None:
    from blob2gpu.sources.azure.container import open_container

    t = time.perf_counter()
    fast = run.settings.with_overrides(
        {
            "connect_timeout_seconds": min(
                run.settings.connect_timeout_seconds, STORAGE_CONNECT_TIMEOUT
            ),
            "retry_max_attempts": min(run.settings.retry_max_attempts, 2),
        }
    )
    try:
        container = open_container(uri, fast, credential=None)
    except Blob2GpuError as e:
        run.add(Check("storage", FAIL, str(e), "fix the URI or install blob2gpu[azure]"), t)
        return
    with container:
        _probe_storage(run, container, t)


def _probe_storage(run: _Run, container: Any, t: float) -> None:
    """List one blob (reachable? credentials accepted?), then the checkpoint itself."""
    from blob2gpu.errors import AccessDenied, BlobNotFound, ProxyAuthenticationRefused
    from blob2gpu.sources.azure.failures import storage_error

    endpoint = container.location.account_url
    raw = ""  # the transport's own words: the mapped error keeps only their first 300 characters
    try:
        try:
            first = next(
                iter(
                    container.client.list_blobs(
                        name_starts_with=container.location.path or None, results_per_page=1
                    )
                ),
                None,
            )
        except Blob2GpuError:
            raise
        except Exception as e:  # the SDK's and the transport's errors, mapped to ours
            raw = redact(e)
            raise storage_error(e, container.location, None, "listing") from None
    except AccessDenied as e:
        refused = (
            "the proxy refused its credentials (HTTP 407)"
            if isinstance(e, ProxyAuthenticationRefused)
            else f"credentials refused ({container.credential_source})"
        )
        run.add(
            Check(
                "storage",
                FAIL,
                f"{endpoint}: {refused}",
                e.hint or str(e),
            ),
            t,
        )
        return
    except BlobNotFound as e:
        run.add(Check("storage", FAIL, str(e), "create the container or fix the URI"), t)
        return
    except Blob2GpuError as e:
        run.add(
            Check(
                "storage",
                FAIL,
                f"{endpoint} unreachable: {_network_reason(raw or str(e))}",
                "check DNS, firewall / NSG rules, the private endpoint and proxy settings",
            ),
            t,
        )
        return
    ms = (time.perf_counter() - t) * 1000
    data = {"endpoint": endpoint, "credential": container.credential_source, "ms": round(ms, 1)}
    if first is None:
        run.add(
            Check(
                "storage",
                WARN,
                f"{endpoint} reachable, credentials accepted, but nothing under the prefix",
                "check the URI's container and prefix",
                data=data,
            ),
            t,
        )
    else:
        run.add(
            Check(
                "storage",
                OK,
                f"{endpoint} reachable, listed in {ms:.0f} ms ({container.credential_source})",
                data=data,
            ),
            t,
        )
    t = time.perf_counter()
    try:
        plan = container.list_checkpoint().plan
    except Blob2GpuError as e:
        run.add(Check("checkpoint", FAIL, str(e), "fix the URI or publish the checkpoint"), t)
        return
    _checkpoint_found(run, plan, t)


def _check_fit(run: _Run) -> None:
    t = time.perf_counter()
    need_bytes = run.model_bytes
    if need_bytes is None:
        run.add(Check("model_fit", SKIP, "model size unknown (give --source or --model-bytes)"), t)
        return
    s = run.settings
    devices = run.driver.get("devices", []) if run.driver.get("available") else []
    gpu = run.device != "cpu" and run.ordinal < len(devices)
    if run.wants_gpu and not gpu:
        run.add(Check("model_fit", SKIP, f"no {run.device} to compare with"), t)
        return
    if gpu:
        target = f"cuda:{run.ordinal}"
        try:
            free, _total, _name = _core.device_memory(run.ordinal)
        except Blob2GpuError as e:
            run.add(Check("model_fit", FAIL, f"{target}: {e}", "check nvidia-smi"), t)
            return
        factor, where, knob = s.gpu_headroom_factor, f"free on {target}", "gpu_headroom_factor"
        remedy = "free GPU memory, use a larger GPU, quantize or shard the model"
    else:
        target = "cpu"
        free = host_available_bytes()
        factor, where, knob = s.host_headroom_factor, "host RAM available", "host_headroom_factor"
        remedy = "free host memory or use a larger node"
    need = need_bytes * factor
    data = {
        "model_bytes": need_bytes,
        "model_bytes_from": run.model_bytes_from,
        "headroom_factor": factor,
        "need_bytes": int(need),
        "free_bytes": free,
        "target": target,
    }
    value = (
        f"{_gb(need)} needed ({_gb(need_bytes)} from {run.model_bytes_from} x {factor:g}), "
        f"{_gb(free)} {where}"
    )
    if free < need:
        run.add(Check("model_fit", FAIL, value, f"{remedy}, or lower {knob}", data=data), t)
    else:
        run.add(Check("model_fit", OK, value, data=data), t)


def run_preflight(
    source: str | None = None,
    model_bytes: int | None = None,
    device: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    cache_probe_bytes: int = CACHE_PROBE_BYTES,
) -> PreflightResult:
    """Run every check and return the PreflightResult (its exit_code is 0 or 1).

    source: a Blob URI or local path (None: $MODEL_SOURCE_URI, else no storage check).
    model_bytes: the weights' size; else taken from the checkpoint at `source`.
    device: 'auto' (the first GPU when a driver loads, else cpu), 'cpu', 'cuda' or 'cuda:N'; with
    cuda a missing driver or GPU fails, otherwise the GPU checks are skipped.
    Raises ConfigError for a bad config file or setting, InvalidArgument for a bad device.
    """
    from blob2gpu.loading.request import SOURCE_URI_ENV, normalize_device

    settings = resolve(config_path=config)
    requested = device.strip().lower()
    if requested != "auto":
        requested = normalize_device(requested)
    if model_bytes is not None and model_bytes < 0:
        raise InvalidArgument(f"--model-bytes must be at least 0, not {model_bytes}")
    source = source or os.environ.get(SOURCE_URI_ENV) or None

    run = _Run(requested, settings)
    if model_bytes is not None:
        run.model_bytes, run.model_bytes_from = model_bytes, "--model-bytes"
    _check_driver(run)
    if run.device == "auto":  # the first GPU when the driver sees one, else the host
        run.device = "cuda:0" if run.driver.get("available") and run.driver["devices"] else "cpu"
    _check_gpus(run)
    _check_pinned(run)
    _check_source(run, source)
    _check_cache(
        run, Path(cache_dir) if cache_dir else default_cache_dir(settings), cache_probe_bytes
    )
    _check_fit(run)
    return PreflightResult(
        device=run.device, source=redact(source) if source else None, checks=run.checks
    )
