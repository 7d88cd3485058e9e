#!/usr/bin/env python3
"""GPU load benchmark (run by bench/gpu_check.sh on a machine with a GPU).

Same run, same page-cached sharded bf16 checkpoint, every contestant ends with every tensor in GPU
memory and the device synchronized:
    h2d-ceiling       one pinned host buffer of the whole checkpoint copied to the GPU (torch,
                      non_blocking); no file reads: the PCIe/C2C ceiling for reference
    safetensors       safetensors.torch.load_file(shard, device="cuda:0") per shard: the baseline
    blob2gpu          blob2gpu.load(dir, device="cuda:0", framework="torch")
    blob2gpu-loader   a blob2gpu.Loader reused (ring already pinned), loader.load(...)
Prints GB/s, the ratio against safetensors, the fraction of the pinned peak (h2d-ceiling's
GB/s: the issue's goal is blob2gpu at >= 90% of it), the process CPU seconds each run took (all
threads: a waiting thread that spins instead of sleeping shows up here, not in GB/s), and the
blob2gpu report's peak slots in flight, whether its ring was pinned, the pipeline's shape as
sized from this host and the NUMA node it was placed on.

Where torch has no CUDA but blob2gpu's driver has a device (the fake driver of tests/fake_cuda,
which bench/gpu_check.sh's rehearsal stands in for libcuda), only the blob2gpu rows run, with
framework='dlpack' and every tensor waited for: torch cannot use that device. There the peak
is the fake's modelled link when FAKE_CUDA_LINK_GBPS sets one (tests/fake_cuda/README.md), else
there is none.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from harness import GB
from harness.checkpoints import llama_checkpoint, shard_files, warm_page_cache


def run_h2d_ceiling(directory: Path, total: int) -> float:
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(total, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    t = time.perf_counter()
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def run_safetensors(directory: Path) -> float:
    from safetensors.torch import load_file

    t = time.perf_counter()
    out = {}
    for f in shard_files(directory):
        out.update(load_file(f, device="cuda:0"))
    torch.cuda.synchronize()
    return time.perf_counter() - t


def run_blob2gpu(directory: Path, loader=None, framework: str = "torch") -> tuple[float, dict]:
    import blob2gpu

    opener = blob2gpu.open if loader is None else loader.open
    t = time.perf_counter()
    with opener(str(directory), device="cuda:0", framework=framework) as checkpoint:
        tensors = checkpoint.to_dict()
        if framework == "dlpack":  # a device torch cannot synchronize: wait for each tensor
            for view in tensors.values():
                view.wait_ready()
        report = checkpoint.report
    if framework == "torch":
        torch.cuda.synchronize()
    return time.perf_counter() - t, report.to_dict()


def blob2gpu_device() -> str | None:
    """The name of the first GPU of blob2gpu's driver, or None where it has none."""
    from blob2gpu import _core

    info = _core.driver_info()
    devices = (info.get("devices") or []) if info.get("available") else []
    return str(devices[0]["name"]) if devices else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total-gb", type=float, default=4.0)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch_cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(0) if torch_cuda else blob2gpu_device()
    if device_name is None:
        print("no CUDA device visible to torch or blob2gpu: nothing to benchmark", file=sys.stderr)
        return 3
    framework = "torch" if torch_cuda else "dlpack"
    if not torch_cuda:
        print(f"torch {torch.__version__} has no CUDA: blob2gpu's rows only, framework='dlpack'")
    import blob2gpu

    directory = llama_checkpoint(args.total_gb, args.shards)  # cached under bench/.data/
    files = shard_files(directory)
    warm_page_cache(files)
    total = sum(Path(f).stat().st_size for f in files)
    if torch_cuda:
        torch.zeros(1, device="cuda:0")  # create the context outside the timings
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    peaks = []
    pinned = []
    shapes = []

    def timed(name: str, run):  # records wall and process CPU seconds; returns run's result
        start = time.process_time()
        out = run()
        cpu.setdefault(name, []).append(time.process_time() - start)
        results.setdefault(name, []).append(out[0] if isinstance(out, tuple) else out)
        return out

    loader = blob2gpu.Loader()
    run_blob2gpu(directory, loader, framework)  # pins the ring once
    for _ in range(args.repeats):
        if torch_cuda:
            timed("h2d-ceiling", lambda: run_h2d_ceiling(directory, total))
            timed("safetensors", lambda: run_safetensors(directory))
        _, report = timed("blob2gpu", lambda: run_blob2gpu(directory, None, framework))
        peaks.append(report["peak_slots_in_flight"])
        pinned.append("pinned" if report["pinned"] else "pageable (fallback)")
        node = report.get("numa_node", -1)
        shapes.append(
            f"{report['io_threads']} io threads, {report['staging_slots']} x "
            f"{report['staging_slot_bytes'] >> 20} MiB slots, NUMA node "
            f"{node if node >= 0 else 'none'}"
        )
        timed("blob2gpu-loader", lambda: run_blob2gpu(directory, loader, framework))
        if torch_cuda:
            torch.cuda.empty_cache()
    loader.close()
    base = total / statistics.median(results["safetensors"]) / GB if torch_cuda else None
    # The pinned peak: one whole-checkpoint copy from pinned memory (or the fake's modelled link).
    modelled = float(os.environ.get("FAKE_CUDA_LINK_GBPS") or 0) * 1e9 / GB
    peak_label = "h2d-ceiling"
    if torch_cuda:
        peak = total / statistics.median(results["h2d-ceiling"]) / GB
    else:
        peak, peak_label = (modelled, "the fake's modelled link") if modelled > 0 else (0.0, "")
    rows = []
    print(
        f"\n{total / GB:.2f} GB, {args.shards} shards, page cache warm, "
        f"{device_name}, median of {args.repeats}"
    )
    print(
        f"{'contestant':<18}{'GB/s':>8}{'x safetensors':>15}{'of pinned peak':>16}"
        f"{'CPU s':>8}{'wall s':>8}"
    )
    for name, samples in results.items():
        wall = statistics.median(samples)
        cpu_s = statistics.median(cpu[name])
        gbps = total / wall / GB
        ratio = gbps / base if base else None
        of_peak = gbps / peak if peak > 0 else None
        rows.append(
            {
                "contestant": name,
                "gbps": gbps,
                "ratio": ratio,
                "of_pinned_peak": of_peak,
                "cpu_s": cpu_s,
                "wall_s": wall,
            }
        )
        shown = f"{ratio:.2f}" if ratio is not None else "-"
        fraction = f"{of_peak:.0%}" if of_peak is not None else "-"
        print(f"{name:<18}{gbps:>8.2f}{shown:>15}{fraction:>16}{cpu_s:>8.2f}{wall:>8.2f}")
    if peak > 0:
        best = max(total / statistics.median(results[n]) / GB for n in results if "blob2gpu" in n)
        print(
            f"blob2gpu at {best / peak:.0%} of the pinned peak ({peak:.2f} GB/s, {peak_label}); "
            "goal >= 90%"
        )
    else:
        print("pinned peak: not measured (no CUDA in torch, no modelled link)")
    print(f"blob2gpu peak slots in flight: {max(peaks)}; staging ring: {pinned[-1]}")
    print(f"blob2gpu pipeline (sized from this host): {shapes[-1]}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": rows,
                    "pinned_peak_gbps": peak,
                    "peak_slots_in_flight": peaks,
                    "ring": pinned,
                    "pipeline": shapes[-1],
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
