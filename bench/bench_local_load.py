#!/usr/bin/env python3
"""Local-file load benchmark: a sharded bf16 safetensors checkpoint, page cache warm, loaded to CPU.

Usage:
    python bench/bench_local_load.py [--total-gb 2] [--shards 8] [--repeats 3] [--json out.json]

Contestants (each in its own fresh interpreter, so imports, RSS and crashes stay isolated):
    safetensors          safetensors.torch.load_file per shard (default mmap backend): the baseline
    safetensors-pread    the same with backend="pread" (informational)
    runai                runai-model-streamer SafetensorsStreamer, device="cpu"
    fastsafetensors      SafeTensorsFileLoader(pg=None, device="cpu", nogds=True)
    blob2gpu-load        blob2gpu.load(dir, device="cpu", framework="torch")
    blob2gpu-loader      one blob2gpu.Loader() reused across the loads of a process, on cpu
    blob2gpu-load-mmap   blob2gpu.load(..., mmap_local_files=True): zero-copy, like safetensors
    blob2gpu-cuda-fake   blob2gpu.open(dir, device="cuda", framework="dlpack") over the fake
                         CUDA driver of tests/fake_cuda (host memory); load only, no touch

Every CPU contestant is timed up to the point where every byte of every tensor has been read by the
same checksum (the wrapping int64 sum of each tensor's bytes), so lazy (mmap) loaders pay for their
page faults like everyone else. The checksum is checked against the one computed at generation time,
so a loader that returns wrong bytes fails instead of winning.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import GB, SETTLE_S
from harness.accounting import (
    Stopwatch,
    current_rss_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    wait_for_idle,
)
from harness.checkpoints import (
    llama_checkpoint,
    read_spec,
    shard_files,
    spec_summary,
    warm_page_cache,
)
from harness.checksums import checksum_all
from harness.fake_cuda import use_fake_driver
from harness.isolation import (
    Unavailable,
    emit,
    emit_unavailable,
    import_or_unavailable,
    run_in_fresh_process,
    worker_command,
)
from harness.machine import blob2gpu_versions, machine_info, package_version, prefault
from harness.rounds import Rounds, add_round_arguments, chosen_contestants, fold
from harness.tables import (
    format_row,
    median_of,
    print_header,
    print_status_row,
    ratio,
    verdict,
    write_run_json,
)

BASELINE = "safetensors"
CONTESTANTS = (
    "safetensors",
    "safetensors-pread",
    "runai",
    "fastsafetensors",
    "blob2gpu-load",
    "blob2gpu-loader",
    "blob2gpu-load-mmap",
    "blob2gpu-cuda-fake",
)
BLOB2GPU_CPU = ("blob2gpu-load", "blob2gpu-loader", "blob2gpu-load-mmap")
# (contestant to beat, minimum ratio blob2gpu cpu must reach against it)
TARGETS = (("safetensors", 1.0), ("runai", 2.0), ("fastsafetensors", 2.0))


# --------------------------------------------------------------------------------------------------
# The contestants, each built untimed in its own fresh interpreter
# --------------------------------------------------------------------------------------------------


@dataclass
class Contestant:
    """Built untimed; load() is timed and returns (tensors, extra, release)."""

    load: Callable[[], tuple[Mapping[str, Any], dict[str, Any], Callable[[], None]]]
    touch: bool = True
    teardown: Callable[[], None] = lambda: None
    versions: dict[str, str] = field(default_factory=dict)


def make_safetensors(ckpt: Path, backend: str) -> Contestant:
    import_or_unavailable("safetensors")
    from safetensors.torch import load_file

    files = shard_files(ckpt)

    def load() -> tuple[Mapping[str, Any], dict[str, Any], Callable[[], None]]:
        out: dict[str, Any] = {}
        for f in files:
            out.update(load_file(f, device="cpu", backend=backend))
        return out, {}, lambda: None

    return Contestant(load, versions={"safetensors": package_version("safetensors")})


def make_runai(ckpt: Path) -> Contestant:
    rms = import_or_unavailable("runai_model_streamer")
    files = shard_files(ckpt)

    def load() -> tuple[Mapping[str, Any], dict[str, Any], Callable[[], None]]:
        streamer = rms.SafetensorsStreamer()
        streamer.__enter__()
        # owned=True (the default in this version): yielded tensors stay valid while held.
        streamer.stream_files(files, device="cpu")
        out = dict(streamer.get_tensors())
        return out, {}, lambda: streamer.__exit__(None, None, None)

    versions = {"runai-model-streamer": package_version("runai-model-streamer")}
    return Contestant(load, versions=versions)


def make_fastsafetensors(ckpt: Path) -> Contestant:
    fst = import_or_unavailable("fastsafetensors")
    files = shard_files(ckpt)

    def load() -> tuple[Mapping[str, Any], dict[str, Any], Callable[[], None]]:
        # pg=None is fastsafetensors' single-process group; nogds=True selects the pread +
        # bounce-buffer copier, the only one that runs without GPUDirect Storage.
        loader = fst.SafeTensorsFileLoader(None, "cpu", nogds=True)
        loader.add_filenames({0: files})
        fb = loader.copy_files_to_device()
        out = {k: fb.get_tensor(k) for k in loader.get_keys()}

        def release() -> None:
            fb.close()
            loader.close()

        return out, {}, release

    return Contestant(load, versions={"fastsafetensors": package_version("fastsafetensors")})


def make_blob2gpu_load(ckpt: Path) -> Contestant:
    b2g = import_or_unavailable("blob2gpu")

    def load() -> tuple[Mapping[str, Any], dict[str, Any], Callable[[], None]]:
        out = b2g.load(str(ckpt), device="cpu", framework="torch")
        return out, {}, lambda: None

    return Contestant(load, versions=blob2gpu_versions(b2g))


def make_blob2gpu_load_mmap(ckpt: Path) -> Contestant:
    b2g = import_or_unavailable("blob2gpu")

    def load() -> tuple[Mapping[str, Any], dict[str, Any], Callable[[], None]]:
        out = b2g.load(str(ckpt), device="cpu", framework="torch", mmap_local_files=True)
        return out, {}, lambda: None

    return Contestant(load, versions=blob2gpu_versions(b2g))


def make_blob2gpu_loader(ckpt: Path) -> Contestant:
    b2g = import_or_unavailable("blob2gpu")
    loader = b2g.Loader()
    loader.__enter__()

    def load() -> tuple[Mapping[str, Any], dict[str, Any], Callable[[], None]]:
        out = loader.load(str(ckpt), device="cpu", framework="torch")
        return out, {}, lambda: None

    return Contestant(
        load,
        teardown=lambda: loader.__exit__(None, None, None),
        versions=blob2gpu_versions(b2g),
    )


def make_blob2gpu_cuda_fake(ckpt: Path) -> Contestant:
    use_fake_driver()
    b2g = import_or_unavailable("blob2gpu")

    def load() -> tuple[Mapping[str, Any], dict[str, Any], Callable[[], None]]:
        with b2g.open(str(ckpt), device="cuda", framework="dlpack") as ckpt_handle:
            out = dict(ckpt_handle)
            report = ckpt_handle.report
            extra = {"report": report.to_dict() if hasattr(report, "to_dict") else repr(report)}
        # Device memory is gone with the checkpoint; only the count is kept for the check.
        return {"__count__": len(out)}, extra, lambda: None

    return Contestant(
        load,
        touch=False,
        versions={**blob2gpu_versions(b2g), "fake_driver": os.environ["BLOB2GPU_CUDA_DRIVER"]},
    )


FACTORIES: dict[str, Callable[[Path], Contestant]] = {
    "safetensors": lambda p: make_safetensors(p, "mmap"),
    "safetensors-pread": lambda p: make_safetensors(p, "pread"),
    "runai": make_runai,
    "fastsafetensors": make_fastsafetensors,
    "blob2gpu-load": make_blob2gpu_load,
    "blob2gpu-load-mmap": make_blob2gpu_load_mmap,
    "blob2gpu-loader": make_blob2gpu_loader,
    "blob2gpu-cuda-fake": make_blob2gpu_cuda_fake,
}


# --------------------------------------------------------------------------------------------------
# Worker side: one contestant, several loads, in a fresh interpreter
# --------------------------------------------------------------------------------------------------


def timed_load(contestant: Contestant) -> tuple[dict[str, Any], Callable[[], None]]:
    """Loads once and reads every byte (unless the contestant has no host tensors); returns the
    sample and the release of what the load holds."""
    gc.collect()
    watch = Stopwatch(kernel_threads=True)
    t0 = watch.start()
    tensors, extra, release = contestant.load()
    t_load = time.perf_counter()
    checksum = checksum_all(tensors) if contestant.touch else None
    spent = watch.stop()
    sample = {
        "wall_s": spent.wall_s,
        "load_s": t_load - t0,
        "cpu_s": spent.cpu_s,
        "tensors": len(tensors) if contestant.touch else tensors["__count__"],
        "checksum": checksum,
        "rss_after_load_mb": current_rss_bytes() / 2**20,
        # Diagnostics for noisy samples: CPU burnt by other users' processes (a shared
        # box compiling next door), kernel threads, a busy host (steal), page faults.
        "foreign_cpu_s": spent.foreign_cpu_s,
        "kernel_threads_cpu_s": spent.kernel_threads_s,
        "machine_steal_s": spent.machine_steal_s,
        "minor_faults": spent.minor_faults,
        "involuntary_switches": spent.involuntary_switches,
        "extra": extra,
    }
    del tensors
    return sample, release


def run_worker(name: str, ckpt: Path, loads: int, prefault_bytes: int) -> int:
    """Loads the checkpoint `loads` times in this fresh process; prints one result line."""
    spec = read_spec(ckpt)
    try:
        import torch  # every contestant hands out torch (or dlpack) tensors; import untimed

        contestant = FACTORIES[name](ckpt)
    except Unavailable as exc:
        return emit_unavailable(exc)
    prefault(prefault_bytes)
    rss_after_setup = current_rss_bytes()
    reset_peak_rss()  # so the untimed prefault does not count as the load's peak

    samples: list[dict[str, Any]] = []
    peak_rss_first_load = 0.0
    for i in range(loads):
        sample, release = timed_load(contestant)
        samples.append(sample)
        if i == 0:
            peak_rss_first_load = peak_rss_bytes() / 2**20
        release()
        gc.collect()
    contestant.teardown()

    bad = [s for s in samples if s["tensors"] != spec["tensors"]]
    bad += [s for s in samples if s["checksum"] is not None and s["checksum"] != spec["checksum"]]
    reason = ""
    if bad:
        reason = (
            f"wrong tensors: got {bad[0]['tensors']} tensors with checksum {bad[0]['checksum']}, "
            f"expected {spec['tensors']} with {spec['checksum']}"
        )
    emit(
        {
            "status": "wrong" if bad else "ok",
            "reason": reason,
            "samples": samples,
            "versions": {"torch": torch.__version__, **contestant.versions},
            "rss_after_setup_mb": rss_after_setup / 2**20,
            "peak_rss_first_load_mb": peak_rss_first_load,
            "peak_rss_mb": peak_rss_bytes() / 2**20,
        }
    )
    return 0


# --------------------------------------------------------------------------------------------------
# Parent side: rounds of processes and the table
# --------------------------------------------------------------------------------------------------


def summarize(processes: list[dict[str, Any]], data_bytes: int) -> dict[str, Any]:
    """Returns one contestant's row: its status and the medians of its kept processes."""
    out, ok = fold(processes)
    if not ok:
        return out
    gb = data_bytes / GB
    cold = [p["samples"][0] for p in ok]
    warm = [s for p in ok for s in p["samples"][1:]]
    out["median"] = {
        "gb_per_s": gb / statistics.median(s["wall_s"] for s in cold),
        "wall_s": statistics.median(s["wall_s"] for s in cold),
        "load_only_gb_per_s": gb / statistics.median(s["load_s"] for s in cold),
        "cpu_s": statistics.median(s["cpu_s"] for s in cold),
        "cpu_s_per_gb": statistics.median(s["cpu_s"] for s in cold) / gb,
        "warm_gb_per_s": gb / statistics.median(s["wall_s"] for s in warm) if warm else None,
    }
    out["peak_rss_mb"] = max(p["peak_rss_first_load_mb"] for p in ok)
    out["import_rss_mb"] = statistics.median(p["rss_after_setup_mb"] for p in ok)
    out["versions"] = ok[0]["versions"]
    out["last_extra"] = ok[-1]["samples"][-1].get("extra") or {}
    return out


def print_table(
    results: dict[str, dict[str, Any]], spec: dict[str, Any], repeats: int, memory: str
) -> None:
    """Prints one row per contestant (GB/s, the ratio to the baseline, CPU, RSS, warm)."""
    base = median_of(results, BASELINE)
    headers = ["contestant", "GB/s", "vs safetensors", "CPU s/GB", "peak RSS MB"]
    headers += ["load-only GB/s", "warm GB/s"]
    widths = [20, 7, 14, 9, 11, 14, 9]
    print()
    print(
        f"checkpoint: {spec['data_bytes'] / GB:.2f} GB of bf16 tensors, {spec['tensors']} tensors, "
        f"{spec['shards']} shards; page cache warm; memory {memory}; median of {repeats} processes"
    )
    print(
        "GB/s: first load in a fresh process, every byte read; warm: a reload in the same process"
    )
    print_header(headers, widths)
    import_rss = []
    for name, r in results.items():
        med = r.get("median")
        if not med:
            print_status_row(name, r, widths[0])
            continue
        import_rss.append(r["import_rss_mb"])
        shown = ratio(med["gb_per_s"], base)
        warm = f"{med['warm_gb_per_s']:.2f}" if med["warm_gb_per_s"] else "-"
        note = "  (load only, fake device)" if name == "blob2gpu-cuda-fake" else ""
        if r.get("reason"):
            note += f"  ({r['reason']})"
        cols = [name, f"{med['gb_per_s']:.2f}", f"{shown:.2f}x" if shown else "n/a"]
        cols += [f"{med['cpu_s_per_gb']:.2f}", f"{r['peak_rss_mb']:.0f}"]
        cols += [f"{med['load_only_gb_per_s']:.2f}", warm]
        print(format_row(cols, widths) + note)
    if import_rss:
        print(
            f"(peak RSS includes ~{statistics.median(import_rss):.0f} MB of interpreter + imports)"
        )
    print_fake_driver(results.get("blob2gpu-cuda-fake", {}))


def print_fake_driver(fake: dict[str, Any]) -> None:
    """Prints the fake-driver row's slots in flight per load and its violation lines."""
    reports = [
        s.get("extra", {}).get("report")
        for p in fake.get("processes", [])
        for s in p.get("samples") or []
    ]
    slots = [r.get("peak_slots_in_flight") for r in reports if isinstance(r, dict)]
    if reports:
        shown = sorted({str(x) for x in slots}) if slots else ["not reported"]
        print(f"blob2gpu-cuda-fake peak_slots_in_flight per load: {', '.join(shown)}")
    violations = sum(p.get("fake_cuda_violations", 0) for p in fake.get("processes", []))
    if violations:
        print(
            f"blob2gpu-cuda-fake: {violations} fake driver violation line(s) on stderr (see --json)"
        )


def print_targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Prints each blob2gpu cpu row against each target; returns the verdicts."""
    verdicts: list[dict[str, Any]] = []
    print("\ntargets:")
    for b2g in BLOB2GPU_CPU:
        for other, need in TARGETS:
            r = ratio(median_of(results, b2g), median_of(results, other))
            v = verdict(None if r is None else r >= need)
            shown = f"{r:.2f}x" if r is not None else "-"
            print(f"  {b2g} >= {need:.1f}x {other}: {v} ({shown})")
            verdicts.append(
                {"contestant": b2g, "vs": other, "need": need, "ratio": r, "verdict": v}
            )
    return verdicts


def run_contestants(args: argparse.Namespace, names: list[str], ckpt: Path) -> dict[str, Any]:
    """Runs the rounds of fresh processes; returns every contestant's processes by name."""
    spec = read_spec(ckpt)
    files = shard_files(ckpt)
    prefault_bytes = int(spec["file_bytes"] * 1.25) if args.memory == "prefaulted" else 0
    cmd_tail = ["--ckpt", str(ckpt), "--loads-per-process", str(args.loads_per_process)]
    cmd_tail += ["--prefault-bytes", str(prefault_bytes)]

    def attempt(name: str) -> dict[str, Any]:
        if args.memory == "settled":
            time.sleep(SETTLE_S)
        busy = wait_for_idle(args.wait_idle, 0.1)
        warm_page_cache(files)  # cheap when cached; undoes any eviction by the last run
        cmd = worker_command(str(Path(__file__).resolve()), name, *cmd_tail)
        p, stderr = run_in_fresh_process(cmd, args.timeout)
        if "process" in p:
            p["fake_cuda_violations"] = sum(1 for ln in stderr if "[fake_cuda] violation" in ln)
        p["busy_fraction_before"] = busy
        return p

    def progress(prefix: str, p: dict[str, Any]) -> None:
        gbps = spec["data_bytes"] / GB / p["samples"][0]["wall_s"]
        print(f"{prefix}{gbps:.2f} GB/s{'  (contended)' if p['contended'] else ''}", flush=True)

    rounds = Rounds(attempt, lambda p: p["samples"][0], progress, args.repeats, args.retries)
    return rounds.run(names)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Returns the parser and the parsed command line."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--total-gb", type=float, default=2.0, help="checkpoint size in GB (default 2)")
    ap.add_argument("--shards", type=int, default=8, help="number of shards (default 8)")
    ap.add_argument(
        "--repeats", type=int, default=3, help="fresh processes per contestant (default 3)"
    )
    ap.add_argument(
        "--loads-per-process",
        type=int,
        default=2,
        help="loads per process: the first is the reported cold one, the rest 'warm' (default 2)",
    )
    ap.add_argument("--json", type=Path, help="write every number to this file")
    ap.add_argument("--only", help="comma-separated contestants to run (default: all)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per process (default 600)")
    add_round_arguments(ap)
    ap.add_argument(
        "--memory",
        choices=("settled", "prefaulted"),
        default="settled",
        help="settled (default): before each process wait until the VM has handed the memory the"
        " last one freed back to its host, so run order does not matter; prefaulted: each process"
        " first touches and frees 1.25x the checkpoint size (host-backed pages for the load)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prefault-bytes", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    return ap, ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.ckpt, args.loads_per_process, args.prefault_bytes)

    names = chosen_contestants(ap, args.only, list(CONTESTANTS), CONTESTANTS)

    ckpt = llama_checkpoint(args.total_gb, args.shards)
    spec = read_spec(ckpt)
    print(
        f"warming page cache: {warm_page_cache(shard_files(ckpt)):.2f} s for "
        f"{spec['file_bytes'] / GB:.2f} GB",
        flush=True,
    )
    processes = run_contestants(args, names, ckpt)
    results = {n: summarize(processes[n], spec["data_bytes"]) for n in names}
    print_table(results, spec, args.repeats, args.memory)
    verdicts = print_targets(results)
    if args.json:
        write_run_json(
            args.json,
            args,
            checkpoint={"path": str(ckpt), **spec_summary(spec)},
            machine=machine_info(),
            results=results,
            targets=verdicts,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
