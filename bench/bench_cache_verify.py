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
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def timed(fn):
    wall, cpu = time.perf_counter(), cpu_seconds()
    out = fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu, out


def touch(tensors) -> int:
    return sum(int(t.reshape(-1).view(torch.uint8)[:: 4096].sum()) for t in tensors.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import blob2gpu
    from blob2gpu import _core
    from blob2gpu.integrity.manifest import MANIFEST_NAME, manifest_for_directory
    from blob2gpu.tools.demo import write_demo_checkpoint
    from safetensors.torch import load_file
    from support.azurite import Azurite

    work = Path(tempfile.mkdtemp(prefix="b2g-cache-bench-"))
    ckpt = write_demo_checkpoint(work / "ckpt", total_mb=args.total_mb, shards=4)
    (ckpt / MANIFEST_NAME).write_text(manifest_for_directory(ckpt).to_json())
    gb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e9
    rows: dict[str, list[tuple[float, float]]] = {}
    hits: dict[str, list[float | None]] = {}
    local_variants = [
        (f"blob2gpu-local {v}", lambda v=v: blob2gpu.load(str(ckpt), verify=v,
                                                          mmap_local_files=False))
        for v in ("crc32c", "sha256", "none")
    ]
    with Azurite() as az:
        az.upload_directory("models", ckpt, "m")
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = az.connection_string()
        for _ in range(args.repeats):
            cache = work / f"cache-{time.time_ns()}"
            common = {"framework": "torch", "local_nvme_cache_enabled": True,
                      "cache_dir": str(cache), "mmap_local_files": False}

            def blob_load(name, c=common, **extra):
                with blob2gpu.open("az://models/m", **{**c, **extra}) as checkpoint:
                    tensors = checkpoint.to_dict()
                    hits.setdefault(name, []).append(checkpoint.report.cache_hit_rate)
                return tensors

            local_rounds = 3  # the fast local loads, several times each, interleaved
            for name, fn in (
                ("cold-blob", lambda: blob_load("cold-blob")),
                ("warm-cache", lambda: blob_load("warm-cache")),
                ("warm-cache mmap", lambda: blob_load("warm-cache mmap", mmap_local_files=True)),
                ("safetensors", lambda: {k: v for f in sorted(ckpt.glob("*.safetensors"))
                                         for k, v in load_file(str(f)).items()}),
                *local_variants,
                ("blob2gpu-local mmap", lambda: blob2gpu.load(str(ckpt), verify="none")),
                *local_variants * (local_rounds - 1),
            ):
                wall, cpu, tensors = timed(lambda fn=fn: (lambda t: (touch(t), t)[1])(fn()))
                rows.setdefault(name, []).append((wall, cpu))
                del tensors
    data = np.random.default_rng(0).integers(0, 255, 256 << 20, dtype=np.uint8)
    _, crc_cpu, _ = timed(lambda: _core.crc32c(data))
    _, sha_cpu, _ = timed(lambda: _core.Sha256(data).hexdigest())
    _, md5_cpu, _ = timed(lambda: _core.md5(data))
    print(f"\n{gb:.2f} GB, 4 shards, median of {args.repeats} (local loads: {3 * args.repeats}), "
          "Azurite in memory, page cache warm")
    print("cache hit rate: " + ", ".join(f"{k} {v}" for k, v in hits.items()))
    print(f"{'contestant':<24}{'GB/s':>8}{'CPU s/GB':>10}")
    for name, samples in rows.items():
        wall = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples)
        print(f"{name:<24}{gb / wall:>8.2f}{cpu / gb:>10.2f}")
    verified = statistics.median(s[0] for s in rows["blob2gpu-local crc32c"])
    sha = statistics.median(s[0] for s in rows["blob2gpu-local sha256"])
    plain = statistics.median(s[0] for s in rows["blob2gpu-local none"])
    gb_hashed = data.nbytes / 1e9
    print(f"verification in the core: CRC32C {crc_cpu / gb_hashed:.3f}, SHA-256 "
          f"{sha_cpu / gb_hashed:.3f}, MD5 (Content-MD5) {md5_cpu / gb_hashed:.3f} CPU s/GB")
    print(f"load time vs verify=none: crc32c {100 * (verified - plain) / plain:+.1f}% (target "
          f"< 10%), sha256 {100 * (sha - plain) / plain:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
