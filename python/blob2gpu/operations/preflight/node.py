"""The node's own checks: the CUDA driver, the GPUs, and pinning the staging ring."""

from __future__ import annotations

import resource
import time

from blob2gpu import _core
from blob2gpu.errors import Blob2GpuError
from blob2gpu.loading.pipelines import sized_settings
from blob2gpu.operations.preflight.result import (
    FAIL,
    OK,
    WARN,
    Check,
    PreflightRun,
    gb,
    mib,
)


def cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


# Why there is no usable driver, by the core's DriverStatus: what the check says and what to do.
DRIVER_PROBLEMS = {
    _core.DriverStatus.NOT_FOUND: (
        "cannot load the CUDA driver '{path}': {detail}",
        "install the NVIDIA driver (libcuda.so.1) or set BLOB2GPU_CUDA_DRIVER; device cpu needs "
        "none",
    ),
    _core.DriverStatus.MISSING_ENTRY_POINT: (
        "the CUDA driver '{path}' lacks {detail}: older than CUDA 11.0",
        "update the NVIDIA driver (or point BLOB2GPU_CUDA_DRIVER at a newer one); device cpu "
        "needs none",
    ),
    _core.DriverStatus.INIT_FAILED: (
        "cuInit failed for the CUDA driver '{path}': {detail}",
        "no usable GPU, or the driver and kernel module disagree: check nvidia-smi on the node; "
        "device cpu needs none",
    ),
}


def check_driver(run: PreflightRun) -> None:
    t = time.perf_counter()
    run.driver = _core.driver_info()
    if not run.driver.get("available"):
        status = run.driver["status"]
        said, hint = DRIVER_PROBLEMS.get(status, ("{detail}", "check nvidia-smi on the node"))
        run.add(
            Check(
                "cuda_driver",
                run.gpu_missing_status,
                said.format(path=run.driver["path"], detail=run.driver["detail"]),
                hint,
                data={"status": status.name.lower()},
            ),
            t,
        )
        return
    devices = run.driver.get("devices", [])
    version = cuda_version(int(run.driver["version"]))
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


def check_gpus(run: PreflightRun) -> None:
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
                f"{gpu_name}, {gb(free)} free of {gb(total)}",
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


def check_pinned(run: PreflightRun) -> None:
    """Pins the whole staging ring once (cuMemHostAlloc, freed at once) on the target GPU: what a
    load's ring will ask of the driver. `ulimit -l` is reported, not judged: as far as is known
    NVIDIA's driver page-locks cuMemHostAlloc memory without RLIMIT_MEMLOCK (torch pins under
    Docker's 64 KiB default). To be verified on the first real GPU: bench/gpu_check.sh prints
    `ulimit -l` beside whether pinning the ring succeeded."""
    t = time.perf_counter()
    s = sized_settings(run.settings, f"cuda:{run.ordinal}")  # the ring a load there would pin
    ring = s.staging_slots * s.staging_slot_bytes
    ring_text = f"{mib(ring)} ring ({s.staging_slots} x {mib(s.staging_slot_bytes)})"
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    unlimited = soft == resource.RLIM_INFINITY
    memlock = "unlimited" if unlimited else mib(soft)
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
