"""What the load benchmarks share: the generated Llama-style model's shape and its split into
shards, the byte checksum that tells a contestant's right bytes from wrong ones, the worker
protocol's constants, and the machine facts each run records (versions, CPU busy time, waiting for
an idle machine, what new memory costs)."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DATA_DIR = BENCH_DIR / ".data"  # generated checkpoints, cached between runs

GB = 1e9  # throughput is reported in decimal GB/s
CHECKSUM_MASK = (1 << 64) - 1
RESULT_TAG = "@@BENCH_RESULT "  # a worker's result line on stdout
EXIT_UNAVAILABLE = 3  # a worker's exit status when its contestant cannot run here
CONTENDED_FRACTION = 0.2  # foreign CPU seconds per wall second above which a sample is retried
SEED = 20240611
SETTLE_S = 6.0  # > Linux's 2 s free page reporting delay, with margin


class Unavailable(Exception):
    """The contestant cannot run here (missing package, tool or prerequisite)."""


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder whose bf16 weights add up to about the requested size."""

    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    layers: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out


def numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def choose_shape(total_bytes: int, shards: int) -> ModelShape:
    """Largest hidden size that still gives at least two layers per shard."""
    vocab = 32000
    for hidden in (4096, 2048, 1024, 512, 256, 128):
        intermediate = max(256, round(hidden * 8 / 3 / 256) * 256)
        kv_dim = hidden // 8
        per_layer = 2 * (
            2 * hidden * hidden + 2 * kv_dim * hidden + 3 * intermediate * hidden + 2 * hidden
        )
        fixed = 2 * (2 * vocab * hidden + hidden)
        layers = (total_bytes - fixed) // per_layer
        if layers >= 2 * shards:
            return ModelShape(hidden, intermediate, kv_dim, vocab, int(layers))
    raise SystemExit(f"--total-gb too small for {shards} shards")


def split_into_shards(
    tensors: list[tuple[str, tuple[int, ...]]], shards: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive runs of tensors, each run about total/shards bytes (bf16)."""
    sizes = [2 * numel(s) for _, s in tensors]
    total = sum(sizes)
    out: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(shards)]
    cum = 0
    for (name, shape), size in zip(tensors, sizes, strict=True):
        out[min(shards - 1, int((cum + size / 2) * shards // total))].append((name, shape))
        cum += size
    if any(not s for s in out):
        raise SystemExit("internal error: an empty shard; use fewer --shards")
    return out


def package_version(dist: str) -> str:
    """An installed distribution's version, or '?'."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def blob2gpu_versions(b2g: Any) -> dict[str, str]:
    """Version plus the core's mtime: the package may be reinstalled while a long run goes on."""
    core = getattr(b2g, "_core", None)
    built = ""
    if core is not None and getattr(core, "__file__", None):
        built = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(os.stat(core.__file__).st_mtime))
    return {"blob2gpu": package_version("blob2gpu"), "blob2gpu_core_built": built}


def cpu_jiffies() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq) / hz, steal / hz


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores)."""
    return cpu_jiffies()[0]


def wait_for_idle(max_wait_s: float, busy_limit: float) -> float:
    """Wait (at most max_wait_s) until under busy_limit of all cores is busy over half a second;
    returns the last busy fraction. On a shared box a neighbour's build would decide rankings."""
    deadline = time.monotonic() + max_wait_s
    ncpu = os.cpu_count() or 1
    while True:
        b0 = machine_busy_seconds()
        time.sleep(0.5)
        frac = (machine_busy_seconds() - b0) / (0.5 * ncpu)
        if frac < busy_limit or time.monotonic() >= deadline:
            return frac


def bytes_checksum(u8: Any) -> int:
    """Wrapping int64 sum of a flat uint8 torch tensor's 8-byte words, plus its tail bytes."""
    import torch

    n = u8.numel()
    n8 = n - n % 8
    s = 0
    if n8:
        words = u8[:n8]
        try:
            w64 = words.view(torch.int64)
        except RuntimeError:  # storage offset not a multiple of 8: copy (still a full read)
            w64 = words.clone().view(torch.int64)
        s = int(w64.sum())
    if n > n8:
        s += int(u8[n8:].sum())
    return s & CHECKSUM_MASK


def tensor_checksum(t: Any) -> int:
    """bytes_checksum of a tensor's bytes in memory order (a full read of every byte)."""
    import torch

    return bytes_checksum(t.detach().contiguous().reshape(-1).view(torch.uint8))


def machine_info(**extra: Any) -> dict[str, Any]:
    """Python, platform, CPUs and memory of this machine, plus `extra` facts."""
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
    """What making new memory resident costs this machine, in CPU seconds per GB.

    A cpu-target load lands every byte in memory its process never touched; a download to
    /dev/null does not. In a VM whose kernel reports free pages to its host (virtio-balloon free
    page reporting: `page_reporting` on the kernel command line), a page the guest freed earlier
    is given back and the next first touch faults it in from the host again, which can cost
    several times the kernel's own zeroing. `first_touch` is a fresh mapping, `retouch` a second
    one right after the first was unmapped (its pages most likely still backed). The probe first
    waits `settle_s`, so that memory other processes just freed has been reported too."""
    import subprocess

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
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.split()
        facts["first_touch_cpu_s_per_gb"] = float(out[0])
        facts["retouch_cpu_s_per_gb"] = float(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    return facts
