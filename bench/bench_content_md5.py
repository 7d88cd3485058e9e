#!/usr/bin/env python3
"""Content-MD5 verification throughput: local shards (as the NVMe cache serves them to a load of a
Blob checkpoint without a manifest) loaded through the core with and without each shard's
Content-MD5, on the cpu target and on cuda (the real driver, or the fake driver of tests/fake_cuda
with --fake, where the fake's copies cost host CPU too).

    python bench/bench_content_md5.py [--shards 8] [--shard-mb 256] [--repeats 3] [--fake]

Prints, per target, GB/s with Content-MD5 and without it, the CPUs the load kept busy (process
CPU time over wall time: where the CPUs are shared, this says what the load could use), the most
shards hashed at once (a core that counts it), and the single-thread MD5 rate of hashlib on this
CPU for reference: MD5 is sequential within a blob, so a load that hashes one shard
at a time runs at about that rate whatever the link; one that hashes shards side by side runs at
up to (CPUs x that rate). The pipeline's settings are the defaults (sized from this host).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import struct
import sys
import time
from pathlib import Path

from harness import DATA_DIR, GB, MiB


def make_shards(directory: Path, count: int, shard_bytes: int) -> list[Path]:
    """`count` safetensors files of one U8 tensor of `shard_bytes` each (random bytes), kept."""
    directory.mkdir(parents=True, exist_ok=True)
    pool = os.urandom(8 * MiB)
    paths = []
    for i in range(count):
        path = directory / f"shard-{i:03d}-{shard_bytes}.safetensors"
        if not path.exists():
            header = json.dumps(
                {"w": {"dtype": "U8", "shape": [shard_bytes], "data_offsets": [0, shard_bytes]}}
            ).encode()
            header += b" " * (-len(header) % 8)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(header)) + header)
                left = shard_bytes
                while left:
                    chunk = pool[: min(left, len(pool))]
                    f.write(bytes([i & 0xFF]) + chunk[1:])  # a different first byte per shard
                    left -= len(chunk)
            tmp.rename(path)
        paths.append(path)
    return paths


def md5_of(path: Path) -> bytes:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(16 * MiB):
            digest.update(block)
    return digest.digest()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_once(pipeline, sources) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of the process and the most shards hashed at once (-1: a core
    that does not say) of one load."""
    t, c = time.perf_counter(), cpu_seconds()
    session = pipeline.start_local(sources)
    while session.next_shard() is not None:
        pass
    session.wait_landed()
    elapsed, cpu = time.perf_counter() - t, cpu_seconds() - c
    peak = getattr(session.stats(), "peak_md5_shards", -1)
    session.close()
    return elapsed, cpu, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fake", action="store_true", help="cuda on tests/fake_cuda's driver")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.fake:
        from harness.fake_cuda import use_fake_driver

        use_fake_driver()
    from blob2gpu import _core
    from blob2gpu.settings import resolve

    try:
        from blob2gpu.loading.pipelines import pipeline_settings
    except ImportError:  # a blob2gpu before host sizing (a baseline run): its fixed defaults
        from blob2gpu.loading.request import PIPELINE_SETTINGS

        def pipeline_settings(settings, device):  # type: ignore[no-redef]
            return {name: getattr(settings, name) for name in PIPELINE_SETTINGS}

    paths = make_shards(DATA_DIR / "content-md5", args.shards, args.shard_mb * MiB)
    digests = [md5_of(p) for p in paths]  # also warms the page cache
    total = sum(p.stat().st_size for p in paths)
    block = paths[0].read_bytes()[: 256 * MiB]
    t = time.perf_counter()
    hashlib.md5(block).digest()
    md5_rate = len(block) / (time.perf_counter() - t) / GB
    del block

    targets = ["cpu"]
    info = _core.driver_info()
    if info.get("available") and info.get("devices"):
        targets.append("cuda:0")
    rows = []
    print(
        f"{args.shards} shards x {args.shard_mb} MiB ({total / GB:.2f} GB), page cache warm, "
        f"{len(os.sched_getaffinity(0))} CPUs; hashlib MD5 on one thread: {md5_rate:.2f} GB/s"
    )
    print(
        f"{'target':<10}{'verify':<14}{'GB/s':>8}{'wall s':>8}{'CPUs busy':>10}{'hashing':>8}"
        "   pipeline"
    )
    for device in targets:
        sized = pipeline_settings(resolve(), device)
        pipeline = _core.LoadPipeline(device, **sized)
        for verify in ("none", "content-md5"):
            sources = [
                _core.ShardSource(
                    p.name,
                    size=p.stat().st_size,
                    path=str(p),
                    content_md5=d if verify == "content-md5" else None,
                )
                for p, d in zip(paths, digests, strict=True)
            ]
            load_once(pipeline, sources)  # first touch of the pipeline's memory
            runs = [load_once(pipeline, sources) for _ in range(args.repeats)]
            wall = statistics.median(r[0] for r in runs)
            busy = statistics.median(r[1] / r[0] for r in runs)  # CPUs the load kept busy
            peak = max(r[2] for r in runs)
            gbps = total / wall / GB
            rows.append(
                {
                    "target": device,
                    "verify": verify,
                    "gbps": gbps,
                    "wall_s": wall,
                    "cpus_busy": busy,
                    "peak_md5_shards": peak,
                }
            )
            shape = (
                f"{sized['io_threads']} io threads, {sized['staging_slots']} x "
                f"{sized['staging_slot_bytes'] >> 20} MiB"
            )
            hashing = "-" if peak < 0 else str(peak)
            print(
                f"{device:<10}{verify:<14}{gbps:>8.2f}{wall:>8.2f}{busy:>10.2f}{hashing:>8}   "
                f"{shape}"
            )
        pipeline.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"md5_gbps": md5_rate, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
