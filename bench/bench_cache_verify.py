#!/usr/bin/env python3
"""Integrity and cache benchmark (the integrity issue's), same run, one checkpoint:

  cold-blob       blob2gpu from Azurite, NVMe cache on and empty (writes it as it streams)
  warm-cache      blob2gpu from Azurite, every shard a cache hit (read natively, CRC-verified)
                  into fresh memory, and mapped (the cpu default, CRC-verified too)
  safetensors     safetensors.torch.load_file of the same local files + a full read
  blob2gpu-local  blob2gpu from the local files with a manifest, verify=crc32c and none (read
                  into fresh memory), and mapped zero-copy (the cpu default) for safetensors' sake
and the verification cost: CRC32C and SHA-256 CPU seconds per GB in the core.

    python bench/bench_cache_verify.py [--total-mb 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness.accounting import process_cpu_seconds

SHARDS = 4
LOCAL_ROUNDS = 3  # the fast local loads, several times each, interleaved


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Returns (wall seconds, CPU seconds of this process, fn's result) of one call."""
    wall, cpu = time.perf_counter(), process_cpu_seconds()
    out = fn()
    return time.perf_counter() - wall, process_cpu_seconds() - cpu, out


def touch(tensors: dict[str, Any]) -> int:
    """Reads one byte a page of every tensor (the mapped rows would otherwise read nothing)."""
    return sum(int(t.reshape(-1).view(torch.uint8)[::4096].sum()) for t in tensors.values())


def write_checkpoint(work: Path, total_mb: int) -> Path:
    """Returns the demo checkpoint written under `work`, with its manifest."""
    from blob2gpu.integrity.manifest import MANIFEST_NAME, manifest_for_directory
    from blob2gpu.tools.demo import write_demo_checkpoint

    ckpt = write_demo_checkpoint(work / "ckpt", total_mb=total_mb, shards=SHARDS)
    (ckpt / MANIFEST_NAME).write_text(manifest_for_directory(ckpt).to_json())
    return ckpt


def contestants(
    ckpt: Path, cache: Path, hits: dict[str, list[float | None]]
) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """Returns one round's loads, in order: the Blob ones (cold, then warm from the cache), then
    the local ones, LOCAL_ROUNDS times."""
    import blob2gpu
    from safetensors.torch import load_file

    common = {
        "framework": "torch",
        "local_nvme_cache_enabled": True,
        "cache_dir": str(cache),
        "mmap_local_files": False,
    }

    def blob_load(name: str, **extra: Any) -> dict[str, Any]:
        with blob2gpu.open("az://models/m", **{**common, **extra}) as checkpoint:
            tensors = checkpoint.to_dict()
            hits.setdefault(name, []).append(checkpoint.report.cache_hit_rate)
        return tensors

    local_variants = [
        (
            f"blob2gpu-local {v}",
            lambda v=v: blob2gpu.load(str(ckpt), verify=v, mmap_local_files=False),
        )
        for v in ("crc32c", "sha256", "none")
    ]
    return [
        ("cold-blob", lambda: blob_load("cold-blob")),
        ("warm-cache", lambda: blob_load("warm-cache")),
        ("warm-cache mmap", lambda: blob_load("warm-cache mmap", mmap_local_files=True)),
        (
            "safetensors",
            lambda: {
                k: v
                for f in sorted(ckpt.glob("*.safetensors"))
                for k, v in load_file(str(f)).items()
            },
        ),
        *local_variants,
        ("blob2gpu-local mmap", lambda: blob2gpu.load(str(ckpt), verify="none")),
        *local_variants * (LOCAL_ROUNDS - 1),
    ]


def hash_costs() -> dict[str, float]:
    """Returns the core's CPU seconds per GB for CRC32C, SHA-256 and MD5 over 256 MiB."""
    from blob2gpu import _core

    data = np.random.default_rng(0).integers(0, 255, 256 << 20, dtype=np.uint8)
    gb = data.nbytes / 1e9
    return {
        "crc32c": timed(lambda: _core.crc32c(data))[1] / gb,
        "sha256": timed(lambda: _core.Sha256(data).hexdigest())[1] / gb,
        "md5": timed(lambda: _core.md5(data))[1] / gb,
    }


def print_results(
    gb: float,
    repeats: int,
    rows: dict[str, list[tuple[float, float]]],
    hits: dict[str, list[float | None]],
    hashes: dict[str, float],
) -> None:
    """Prints GB/s and CPU s/GB per contestant, the hashes' cost and verification's overhead."""
    print(
        f"\n{gb:.2f} GB, {SHARDS} shards, median of {repeats} (local loads: "
        f"{LOCAL_ROUNDS * repeats}), Azurite in memory, page cache warm"
    )
    print("cache hit rate: " + ", ".join(f"{k} {v}" for k, v in hits.items()))
    print(f"{'contestant':<24}{'GB/s':>8}{'CPU s/GB':>10}")
    for name, samples in rows.items():
        wall = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples)
        print(f"{name:<24}{gb / wall:>8.2f}{cpu / gb:>10.2f}")
    verified = statistics.median(s[0] for s in rows["blob2gpu-local crc32c"])
    sha = statistics.median(s[0] for s in rows["blob2gpu-local sha256"])
    plain = statistics.median(s[0] for s in rows["blob2gpu-local none"])
    print(
        f"verification in the core: CRC32C {hashes['crc32c']:.3f}, SHA-256 "
        f"{hashes['sha256']:.3f}, MD5 (Content-MD5) {hashes['md5']:.3f} CPU s/GB"
    )
    print(
        f"load time vs verify=none: crc32c {100 * (verified - plain) / plain:+.1f}% (target "
        f"< 10%), sha256 {100 * (sha - plain) / plain:+.1f}%"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from harness import azurite

    work = Path(tempfile.mkdtemp(prefix="b2g-cache-bench-"))
    ckpt = write_checkpoint(work, args.total_mb)
    gb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e9
    rows: dict[str, list[tuple[float, float]]] = {}
    hits: dict[str, list[float | None]] = {}
    az, _ = azurite.start()
    with az:
        az.upload_directory("models", ckpt, "m")
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = az.connection_string()
        for _ in range(args.repeats):
            cache = work / f"cache-{time.time_ns()}"
            for name, fn in contestants(ckpt, cache, hits):
                wall, cpu, tensors = timed(lambda fn=fn: (lambda t: (touch(t), t)[1])(fn()))
                rows.setdefault(name, []).append((wall, cpu))
                del tensors
    print_results(gb, args.repeats, rows, hits, hash_costs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
