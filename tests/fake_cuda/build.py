"""Builds the fake CUDA driver and wraps its fake_cuda_* control API with ctypes.

Tests point the core at the library with ``BLOB2GPU_CUDA_DRIVER=<path>``; the core dlopen()s that
same path, so a ``FakeDriver`` made from it shares the one instance of the fake's state.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import pathlib
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

_HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = _HERE.parents[1]
SOURCE = _HERE / "fake_cuda_driver.cpp"
HEADER = REPO_ROOT / "csrc" / "shim" / "cuda_driver_api.h"
DEFAULT_BUILD_DIR = REPO_ROOT / "tests" / ".build"

# -z nodelete: stream workers live as long as the process, so the code must never be unmapped by
# a dlclose().
_FLAGS = ("-std=c++17", "-O2", "-g", "-shared", "-fPIC", "-pthread", "-Wl,-z,nodelete")


class FakeDriverBuildError(RuntimeError):
    """The C++ compiler could not build the fake driver (the message holds its output)."""


class FakeDriverError(RuntimeError):
    """A fake_cuda_* control call returned a CUresult other than CUDA_SUCCESS."""

    def __init__(self, call: str, code: int) -> None:
        super().__init__(f"{call} failed with CUresult {code}")
        self.code = code


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX") or "c++")


def _build_key(command: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(HEADER.read_bytes())
    digest.update("\0".join(command).encode())
    return digest.hexdigest()[:16]


def build_fake_driver(out_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Compile the fake driver unless an up-to-date build exists; return the shared library path.

    The file name holds a hash of the source, the header and the compiler command, so a cached
    build is reused until one of them changes. Safe to call from concurrent processes: each
    compiles to a private temporary name and renames it into place atomically.

    Raises FakeDriverBuildError if the compiler is missing or fails.
    """
    build_dir = pathlib.Path(out_dir) if out_dir is not None else DEFAULT_BUILD_DIR
    build_dir.mkdir(parents=True, exist_ok=True)
    base_command = [*_compiler(), *_FLAGS, f"-I{HEADER.parent}", str(SOURCE)]
    target = build_dir / f"libfake_cuda_driver-{_build_key(base_command)}.so"
    if target.exists():
        return target
    fd, tmp_name = tempfile.mkstemp(prefix=".libfake_cuda_driver-", suffix=".so", dir=build_dir)
    os.close(fd)
    try:
        try:
            result = subprocess.run(
                [*base_command, "-o", tmp_name], capture_output=True, text=True, check=False
            )
        except OSError as exc:
            raise FakeDriverBuildError(
                f"cannot run the C++ compiler {base_command[0]!r} (set $CXX): {exc}"
            ) from exc
        if result.returncode != 0:
            raise FakeDriverBuildError(
                f"building {SOURCE} failed (exit {result.returncode}):\n"
                f"{shlex.join(base_command)}\n{result.stderr}"
            )
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


# name: (restype, argtypes) for every control function, without the fake_cuda_ prefix.
_CONTROL_API: dict[str, tuple[type | None, tuple[type, ...]]] = {
    "reset_faults": (None, ()),
    "set_device_count": (None, (ctypes.c_int,)),
    "set_vram_budget": (None, (ctypes.c_uint64,)),
    "set_copy_delay_us": (None, (ctypes.c_uint64,)),
    "fail_host_alloc_after": (None, (ctypes.c_int64,)),
    "fail_device_alloc_after": (None, (ctypes.c_int64,)),
    "fail_copy_after": (None, (ctypes.c_int64,)),
    "set_init_delay_us": (None, (ctypes.c_uint64,)),
    "set_retain_delay_us": (None, (ctypes.c_uint64,)),
    "device_syncs": (ctypes.c_uint64, ()),
    "hold_stream": (ctypes.c_int, (ctypes.c_uint64, ctypes.c_int)),
    "set_sticky_faults": (None, (ctypes.c_int,)),
    "live_device_allocations": (ctypes.c_int64, ()),
    "live_device_bytes": (ctypes.c_uint64, ()),
    "peak_device_bytes": (ctypes.c_uint64, ()),
    "reset_peak": (None, ()),
    "live_host_allocations": (ctypes.c_int64, ()),
    "live_host_bytes": (ctypes.c_uint64, ()),
    "live_streams": (ctypes.c_int64, ()),
    "live_events": (ctypes.c_int64, ()),
    "h2d_copies": (ctypes.c_uint64, ()),
    "h2d_bytes": (ctypes.c_uint64, ()),
    "pageable_h2d_copies": (ctypes.c_uint64, ()),
    "max_pending_h2d_copies": (ctypes.c_int64, ()),
    "emulation_cpu_seconds": (ctypes.c_double, ()),
    "reset_counters": (None, ()),
    "violations": (ctypes.c_int64, ()),
    "last_violation": (ctypes.c_char_p, ()),
    "read_device": (ctypes.c_int, (ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)),
    "set_host_alloc_error": (None, (ctypes.c_int,)),
    "set_deinitialized": (None, (ctypes.c_int,)),
    "set_fail_in_forked_child": (None, (ctypes.c_int,)),
    "context_activations": (ctypes.c_int64, ()),
    "primary_context_refcount": (ctypes.c_int64, (ctypes.c_int,)),
    "set_link_gbps": (None, (ctypes.c_double,)),
    "link_gbps": (ctypes.c_double, ()),
    "link_stats": (ctypes.c_int, (ctypes.c_int, ctypes.POINTER(ctypes.c_int64))),
    "set_host_numa_attribute": (None, (ctypes.c_int,)),
    "set_host_numa_id": (ctypes.c_int, (ctypes.c_int, ctypes.c_int)),
}


@dataclasses.dataclass(frozen=True)
class LinkStats:
    """A device's modelled host-to-device link (FakeDriver.set_link_gbps) since reset_counters():
    the time it was busy and the span from the first modelled copy's start to the last one's end.
    """

    busy_ns: int
    span_ns: int
    copies: int

    @property
    def busy_fraction(self) -> float:
        """Busy time over the span: 1.0 when a copy was always waiting for the link."""
        return self.busy_ns / self.span_ns if self.span_ns > 0 else 0.0


class FakeDriver:
    """The fake driver's control API (the fake_cuda_* functions) as Python methods."""

    def __init__(self, path: os.PathLike[str] | str) -> None:
        self.path = pathlib.Path(path)
        self._lib = ctypes.CDLL(str(self.path))
        self._fn: dict[str, Callable[..., Any]] = {}
        for name, (restype, argtypes) in _CONTROL_API.items():
            fn = getattr(self._lib, f"fake_cuda_{name}")
            fn.restype = restype
            fn.argtypes = argtypes
            self._fn[name] = fn

    # Fault switches and settings.
    def reset_faults(self) -> None:
        """Turn off the fault switches, sticky faults, the copy delay and the init and retain
        delays; live state is kept."""
        self._fn["reset_faults"]()

    def set_device_count(self, n: int) -> None:
        """Number of devices cuDeviceGetCount reports (clamped to 0..16; 0 makes cuInit fail)."""
        self._fn["set_device_count"](n)

    def set_vram_budget(self, nbytes: int) -> None:
        """Per-device memory: cuDeviceTotalMem_v2, and the limit cuMemAlloc_v2 enforces."""
        self._fn["set_vram_budget"](nbytes)

    def set_copy_delay_us(self, us: int) -> None:
        """Time each stream worker sleeps before performing a copy."""
        self._fn["set_copy_delay_us"](us)

    def fail_host_alloc_after(self, n: int) -> None:
        """Let n more cuMemHostAlloc calls succeed, then fail the next one (out of memory).

        0 fails the very next call, -1 turns the switch off. It turns itself off after firing
        unless set_sticky_faults(True).
        """
        self._fn["fail_host_alloc_after"](n)

    def fail_device_alloc_after(self, n: int) -> None:
        """Let n more cuMemAlloc_v2 calls succeed, then fail the next one (out of memory).

        0 fails the very next call, -1 turns the switch off. It turns itself off after firing
        unless set_sticky_faults(True).
        """
        self._fn["fail_device_alloc_after"](n)

    def fail_copy_after(self, n: int) -> None:
        """Let n more cuMemcpyHtoDAsync_v2 calls be accepted, then refuse the next one
        (CUDA_ERROR_INVALID_VALUE). 0 refuses the very next call, -1 turns the switch off; it
        turns itself off after firing unless set_sticky_faults(True)."""
        self._fn["fail_copy_after"](n)

    def set_init_delay_us(self, us: int) -> None:
        """cuInit sleeps this long before doing anything (no lock held): a test can fork while
        another thread is inside the driver's loading. 0 (and reset_faults()): no delay."""
        self._fn["set_init_delay_us"](us)

    def set_retain_delay_us(self, us: int) -> None:
        """cuDevicePrimaryCtxRetain sleeps this long before doing anything (no lock held): a test
        can fork while another thread holds the core's context registry. 0 (and
        reset_faults()): no delay."""
        self._fn["set_retain_delay_us"](us)

    def set_host_alloc_error(self, code: int) -> None:
        """The CUresult the host-alloc switch fails cuMemHostAlloc with (default 2, out of memory;
        back to it on reset_faults())."""
        self._fn["set_host_alloc_error"](code)

    def set_deinitialized(self, on: bool) -> None:
        """Every driver call returns CUDA_ERROR_DEINITIALIZED (4), as while the driver shuts down
        at process exit; the control API keeps working."""
        self._fn["set_deinitialized"](1 if on else 0)

    def set_fail_in_forked_child(self, on: bool) -> None:
        """In a child forked after this, every driver call returns CUDA_ERROR_NOT_INITIALIZED (3),
        as the real driver answers a fork of a process that had initialized CUDA."""
        self._fn["set_fail_in_forked_child"](1 if on else 0)

    def make_current(self, device: int) -> None:
        """Retain device's primary context and make it current on the calling thread, through the
        driver entry points, as a framework (torch.cuda.set_device, CuPy) does: cuInit first, so
        it works in a process where nothing has initialized the driver yet."""
        code = self._lib.cuInit(ctypes.c_uint(0))
        if code != 0:
            raise FakeDriverError("cuInit", code)
        ctx = ctypes.c_void_p()
        code = self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), ctypes.c_int(device))
        if code != 0:
            raise FakeDriverError(f"cuDevicePrimaryCtxRetain({device})", code)
        code = self._lib.cuCtxSetCurrent(ctx)
        if code != 0:
            raise FakeDriverError("cuCtxSetCurrent", code)

    def clear_current(self, device: int) -> None:
        """Undo make_current(device): no context current on the calling thread, the retain
        released."""
        self._lib.cuCtxSetCurrent(ctypes.c_void_p())
        code = self._lib.cuDevicePrimaryCtxRelease_v2(ctypes.c_int(device))
        if code != 0:
            raise FakeDriverError(f"cuDevicePrimaryCtxRelease_v2({device})", code)

    def set_sticky_faults(self, sticky: bool) -> None:
        """Make a fired fault switch fail every later call too, until reset_faults()."""
        self._fn["set_sticky_faults"](1 if sticky else 0)

    # Live resources.
    def live_device_allocations(self) -> int:
        """Return the number of cuMemAlloc_v2 allocations not yet freed."""
        return int(self._fn["live_device_allocations"]())

    def live_device_bytes(self) -> int:
        """Return the bytes of all live device allocations (all devices)."""
        return int(self._fn["live_device_bytes"]())

    def peak_device_bytes(self) -> int:
        """Return the highest live_device_bytes seen since start or reset_peak()."""
        return int(self._fn["peak_device_bytes"]())

    def reset_peak(self) -> None:
        """Set the peak to the current live_device_bytes."""
        self._fn["reset_peak"]()

    def live_host_allocations(self) -> int:
        """Return the number of cuMemHostAlloc blocks not yet freed."""
        return int(self._fn["live_host_allocations"]())

    def live_host_bytes(self) -> int:
        """Return the bytes of all live cuMemHostAlloc blocks."""
        return int(self._fn["live_host_bytes"]())

    def live_streams(self) -> int:
        """Return the number of cuStreamCreate streams not yet destroyed."""
        return int(self._fn["live_streams"]())

    def live_events(self) -> int:
        """Return the number of cuEventCreate events not yet destroyed."""
        return int(self._fn["live_events"]())

    # Contexts.
    def context_activations(self) -> int:
        """Return the primary context activations so far, all devices: retains that found the
        context inactive (its retain count going from 0 to 1). Not reset by reset_counters()."""
        return int(self._fn["context_activations"]())

    def primary_context_refcount(self, device: int) -> int:
        """Return the retain count of device's primary context (0: inactive)."""
        return int(self._fn["primary_context_refcount"](device))

    # Copy counters.
    def h2d_copies(self) -> int:
        """Return the number of host-to-device copies executed since reset_counters()."""
        return int(self._fn["h2d_copies"]())

    def h2d_bytes(self) -> int:
        """Return the bytes of host-to-device copies executed since reset_counters()."""
        return int(self._fn["h2d_bytes"]())

    def emulation_cpu_seconds(self) -> float:
        """CPU seconds the fake spent on what a GPU does in hardware since reset_counters():
        making device and page-locked memory resident (and filling device memory), moving copied
        bytes."""
        return float(self._fn["emulation_cpu_seconds"]())

    def pageable_h2d_copies(self) -> int:
        """Return how many executed host-to-device copies read pageable (not pinned) memory."""
        return int(self._fn["pageable_h2d_copies"]())

    def device_syncs(self) -> int:
        """Return the cuMemAlloc_v2 / cuMemFree_v2 calls made while copies were queued on their
        device since reset_counters(): each synchronizes the device on a GPU (a free waits for
        the device's queued work here too)."""
        return int(self._fn["device_syncs"]())

    def max_pending_h2d_copies(self) -> int:
        """Return the most host-to-device copies queued but not yet executed at one time."""
        return int(self._fn["max_pending_h2d_copies"]())

    def reset_counters(self) -> None:
        """Zero the copy counters, device syncs, max pending and the violation count (not live
        resources)."""
        self._fn["reset_counters"]()

    # The copy-bandwidth model.
    def set_link_gbps(self, gbps: float) -> None:
        """Model each device's host-to-device link at `gbps` GB/s (1e9 bytes a second): its
        copies share it one after another, each taking bytes / rate, and complete when their
        turn on the link ends. 0 turns the model off (copies take what the memcpy takes).
        FAKE_CUDA_LINK_GBPS sets it when the library loads."""
        self._fn["set_link_gbps"](gbps)

    def link_gbps(self) -> float:
        """Return the modelled link rate in GB/s (0: no model)."""
        return float(self._fn["link_gbps"]())

    def link_stats(self, device: int = 0) -> LinkStats:
        """Return what a device's modelled link did since reset_counters()."""
        out = (ctypes.c_int64 * 3)()
        code = self._fn["link_stats"](device, out)
        if code != 0:
            raise FakeDriverError(f"fake_cuda_link_stats({device})", code)
        return LinkStats(busy_ns=int(out[0]), span_ns=int(out[1]), copies=int(out[2]))

    # Where a device sits on the host.
    def set_host_numa_attribute(self, on: bool) -> None:
        """Whether cuDeviceGetAttribute answers CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID (off by default:
        a driver before CUDA 12.2 refuses it). Reset by reset_faults()."""
        self._fn["set_host_numa_attribute"](1 if on else 0)

    def set_host_numa_id(self, device: int, node: int) -> None:
        """The host NUMA node the attribute reports for `device` (-1: none, the default)."""
        code = self._fn["set_host_numa_id"](device, node)
        if code != 0:
            raise FakeDriverError(f"fake_cuda_set_host_numa_id({device})", code)

    # Misuse.
    def violations(self) -> int:
        """Return the number of misuses recorded since start or reset_counters()."""
        return int(self._fn["violations"]())

    def last_violation(self) -> str:
        """Return the message of the last recorded misuse, or "" if none."""
        raw = self._fn["last_violation"]()
        return raw.decode("utf-8", "replace") if raw else ""

    def hold_stream(self, stream: int, hold: bool) -> None:
        """Hold a created stream (its handle): its worker starts no queued operation until
        released with hold=False. Plays a consumer whose kernels are still queued.

        Raises FakeDriverError if the handle names no live created stream.
        """
        code = self._fn["hold_stream"](stream, 1 if hold else 0)
        if code != 0:
            raise FakeDriverError(f"fake_cuda_hold_stream({stream:#x})", code)

    def read_device(self, dptr: int, nbytes: int) -> bytes:
        """Return nbytes of device memory at dptr, read synchronously (no stream is waited on).

        Raises FakeDriverError if the range is not inside one live device allocation.
        """
        buf = ctypes.create_string_buffer(nbytes)
        code = self._fn["read_device"](dptr, buf, nbytes)
        if code != 0:
            raise FakeDriverError(f"fake_cuda_read_device({dptr:#x}, {nbytes})", code)
        return buf.raw


if __name__ == "__main__":
    # `python tests/fake_cuda/build.py`: build (or find) the library and print its path, for a
    # run that has no compiler itself (scripts/wheel_smoke.sh, cibuildwheel's test step).
    print(build_fake_driver())
