"""Facts about the machine a run records: package versions, Python, CPUs and memory, and what
making new memory resident costs here (which decides how a cpu-target load compares with a
download to /dev/null on a VM)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from harness import SETTLE_S


def package_version(dist: str) -> str:
    """Returns an installed distribution's version, or '?'."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def blob2gpu_versions(b2g: Any) -> dict[str, str]:
    """Returns blob2gpu's version plus its core's mtime: the package may be reinstalled while a
    long run goes on."""
    core = getattr(b2g, "_core", None)
    built = ""
    if core is not None and getattr(core, "__file__", None):
        built = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(os.stat(core.__file__).st_mtime))
    return {"blob2gpu": package_version("blob2gpu"), "blob2gpu_core_built": built}


def node_version() -> str:
    """Returns the version of the Node.js on PATH (Azurite's), or '?'."""
    if not shutil.which("node"):
        return "?"
    out = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def machine_info(**extra: Any) -> dict[str, Any]:
    """Returns Python, platform, CPUs and memory of this machine, plus `extra` facts."""
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            mem = fh.readline().split(":")[1].strip()
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "mem_total": mem,
        **extra,
    }


def prefault(nbytes: int) -> None:
    """Touches and frees nbytes of anonymous memory, so the load that follows gets pages the host
    already backs. On a VM with free page reporting (Firecracker, ...) memory freed two seconds
    ago is back with the host, and touching it again costs several times more."""
    if nbytes <= 0:
        return
    import torch

    buf = torch.empty(nbytes, dtype=torch.uint8)
    buf[::4096] = 1
    del buf


# A child that makes `mib` MiB of anonymous memory resident twice (MADV_POPULATE_WRITE, huge pages
# where the kernel gives them): the first mapping takes pages this guest may have handed back to its
# host, the second takes the pages the first just freed. Prints CPU seconds per GB for each.
_FRESH_MEMORY_CHILD = r"""
import ctypes, mmap, resource, sys
libc = ctypes.CDLL(None, use_errno=True)
n = int(sys.argv[1]) << 20
def populate():
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    buf = ctypes.c_char.from_buffer(m)
    before = resource.getrusage(resource.RUSAGE_SELF)
    if libc.madvise(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(n), 23) != 0:
        for page in range(0, n, 4096):  # no MADV_POPULATE_WRITE (Linux < 5.14): touch each page
            m[page] = 0
    after = resource.getrusage(resource.RUSAGE_SELF)
    del buf
    m.close()
    return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / (n / 1e9)
print(populate(), populate())
"""


def fresh_memory_cost(mib: int = 512, settle_s: float = SETTLE_S) -> dict[str, Any]:
    """Returns what making new memory resident costs this machine, in CPU seconds per GB
    (`first_touch_cpu_s_per_gb`, `retouch_cpu_s_per_gb`; absent where the probe could not run)
    and whether the kernel reports free pages to its host (`page_reporting`).

    A cpu-target load lands every byte in memory its process never touched; a download to
    /dev/null does not. In a VM whose kernel reports free pages to its host (virtio-balloon free
    page reporting: `page_reporting` on the kernel command line), a page the guest freed earlier
    is given back and the next first touch faults it in from the host again, which can cost
    several times the kernel's own zeroing. `first_touch` is a fresh mapping, `retouch` a second
    one right after the first was unmapped (its pages most likely still backed). The probe first
    waits `settle_s`, so that memory other processes just freed has been reported too."""
    time.sleep(settle_s)
    facts: dict[str, Any] = {}
    try:
        with open("/proc/cmdline") as fh:
            facts["page_reporting"] = "page_reporting" in fh.read()
    except OSError:
        pass
    try:
        out = subprocess.run(
            [sys.executable, "-c", _FRESH_MEMORY_CHILD, str(mib)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        facts["first_touch_cpu_s_per_gb"] = float(out[0])
        facts["retouch_cpu_s_per_gb"] = float(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    return facts
