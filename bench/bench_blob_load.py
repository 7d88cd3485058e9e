#!/usr/bin/env python3
"""Azure Blob load benchmark: a sharded bf16 checkpoint in an in-memory Azurite, loaded over HTTP
(or HTTPS with --https).

Usage:
    python bench/bench_blob_load.py [--total-gb 2] [--shards 8] [--repeats 3] [--json out.json]
                                    [--pin] [--https]

The run starts its own Azurite (tests/support/azurite.py, npm package under .azurite/), uploads the
checkpoint (generated once, cached under bench/.data/) and, in the same run, measures:

    ceiling             8 parallel curl processes, ranged GETs (32 MiB, x-ms-range, SAS) of the same
                        bytes to /dev/null: what this server can serve (where curl is missing:
                        bench/range_get.c, or bench/range_get.js on node; --ceiling-client)
    ceiling-shm         the same curl run writing each range to a file in /dev/shm (informational):
                        the server's ceiling when the bytes must also land in fresh RAM, as a
                        cpu-target load's must
    sdk-naive           azure-storage-blob defaults: download_blob().readall() per shard, then
                        safetensors.torch.load(bytes)
    sdk-tuned           download_blob(max_concurrency=8), max_chunk_get_size=32 MiB, readinto() a
                        preallocated bytearray, then safetensors.torch.load(bytes(buf))
    blob2gpu-cpu        blob2gpu.open("az://CONTAINER/PREFIX", device="cpu", framework="torch")
    blob2gpu-cuda-fake  the same with device="cuda", framework="dlpack" over the fake CUDA driver of
                        tests/fake_cuda (the real CUDA code path on host memory)
    blob2gpu-cuda       with --gpu, instead of cuda-fake: the real driver and GPU (its CUDA
                        context made before the load, as a serving process has it)

Each contestant runs in a fresh interpreter. A load is timed from before the client is built to the
last tensor in memory; then (untimed) every tensor's checksum is compared with the one computed at
generation time, so a loader that returns wrong bytes is reported `wrong` instead of winning.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from harness import GB, MiB
from harness.accounting import (
    Stopwatch,
    current_rss_bytes,
    group_cpu_and_rss,
    peak_rss_bytes,
    pin_threads,
    reset_peak_rss,
    wait_for_idle,
)
from harness.checkpoints import INDEX_NAME, llama_checkpoint, mismatches, read_spec, spec_summary
from harness.checksums import tensor_checksum
from harness.fake_cuda import use_fake_driver
from harness.isolation import (
    Unavailable,
    emit,
    emit_unavailable,
    import_or_unavailable,
    run_in_fresh_process,
    worker_command,
)
from harness.machine import (
    blob2gpu_versions,
    fresh_memory_cost,
    machine_info,
    node_version,
    package_version,
)
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

CONTAINER = "bench"
CONTESTANTS = (
    "ceiling",
    "ceiling-shm",
    "sdk-naive",
    "sdk-tuned",
    "blob2gpu-cpu",
    "blob2gpu-cuda-fake",
    "blob2gpu-cuda",
)
CEILINGS = ("ceiling", "ceiling-shm")
BLOB2GPU = ("blob2gpu-cpu", "blob2gpu-cuda-fake", "blob2gpu-cuda")
# (reference contestant, minimum ratio of blob2gpu's GB/s to it)
THROUGHPUT_TARGETS = (("ceiling", 0.8), ("sdk-naive", 4.0))
RSS_SLACK_MB = 150  # cuda-fake: host memory may exceed the staging ring by this much
DEFAULT_RING_BYTES = 8 * 32 * MiB  # staging_slots x staging_slot_bytes defaults


# --------------------------------------------------------------------------------------------------
# The contestants, each built untimed in its own fresh interpreter
# --------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """Where the checkpoint lives in Azurite, as every contestant is told."""

    connection_string: str
    endpoint: str
    container: str
    prefix: str
    sas: str
    files: dict[str, int]  # shard file name -> bytes
    ca_bundle: str = ""  # with --https: the server's self-signed certificate, trusted by all


@dataclass
class Contestant:
    """Built untimed. load() is timed and returns (tensors by name, extra numbers). checksum(t)
    reads one returned tensor untimed; None means the contestant returns no tensors (ceiling)."""

    load: Callable[[], tuple[Mapping[str, Any], dict[str, Any]]]
    checksum: Callable[[Any], int] | None = tensor_checksum
    versions: dict[str, str] = field(default_factory=dict)
    after_load: Callable[[], dict[str, Any]] = dict  # untimed numbers read right after the load


def _import_sdk() -> None:
    """The SDK and its transport, imported untimed for every contestant that uses them."""
    for module in ("azure.core.pipeline.transport", "azure.storage.blob", "requests"):
        import_or_unavailable(module, "azure-storage-blob")


def ceiling_client(choice: str, https: bool, build_dir: Path) -> tuple[str, str, list[str]]:
    """The ceiling's client, (kind, what to call it, command prefix): curl; where it is missing
    (a GPU host with no network to install it) and choice is 'auto', bench/range_get.c built
    into build_dir with the system C compiler (plain HTTP only), else node running
    bench/range_get.js (node on PATH or beside the Azurite launcher, as in the device bundle)."""
    curl = shutil.which("curl")
    if choice in ("auto", "curl") and curl is not None:
        return "curl", f"curl {_curl_version(curl)}", [curl, "-s", "-S", "-K"]
    if choice == "curl":
        raise Unavailable("curl not installed (apt-get update && apt-get install -y curl)")
    cc = shutil.which("cc") or shutil.which("gcc")
    if choice in ("auto", "c") and cc is not None and not https:
        built = build_dir / "range_get"
        source = Path(__file__).resolve().parent / "range_get.c"
        subprocess.run([cc, "-O2", "-o", str(built), str(source)], check=True)
        return "c", "bench/range_get.c", [str(built)]
    if choice == "c":
        raise Unavailable("range_get.c needs a C compiler and plain HTTP")
    launcher = os.environ.get("AZURITE_BLOB")
    beside = Path(launcher).resolve().parent / "node" if launcher else None
    node = shutil.which("node") or (str(beside) if beside and beside.exists() else None)
    if node is None:
        raise Unavailable("no client for the ceiling: neither curl, a C compiler nor node")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    script = Path(__file__).resolve().parent / "range_get.js"
    return "node", f"bench/range_get.js on node {version}", [node, str(script)]


def _client_argv(
    kind: str, command: list[str], path: Path, requests: list[tuple[str, int, int, str]], t: Target
) -> list[str]:
    """Writes one ceiling process's requests (url, first byte, last byte, output) to `path` in its
    client's format; returns that process's command line."""
    if kind == "curl":
        path.write_text(_curl_config(requests, t.ca_bundle))
        return [*command, str(path)]
    if kind == "c":
        path.write_text(
            "".join(f"{urlparse(u).path}?{t.sas} {a} {b} {out}\n" for u, a, b, out in requests)
        )
        endpoint = urlparse(t.endpoint)
        return [*command, str(endpoint.hostname), str(endpoint.port), str(path)]
    path.write_text(
        json.dumps(
            [
                {
                    "url": u,
                    "headers": {"x-ms-range": f"bytes={a}-{b}", "x-ms-version": "2021-08-06"},
                    "ca": t.ca_bundle,
                    "output": out,
                }
                for u, a, b, out in requests
            ]
        )
    )
    return [*command, str(path)]


def make_ceiling(
    t: Target, parallel: int, range_bytes: int, to_shm: bool, client: str = "auto"
) -> Contestant:
    """`parallel` client processes, each fetching its share of the ranges one after another on
    one connection, to /dev/null (or to files in /dev/shm with to_shm)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-blob-ceiling-"))
    kind, name, command = ceiling_client(client, t.endpoint.startswith("https:"), workdir)
    ranges = [
        (shard, a, min(size, a + range_bytes) - 1)
        for shard, size in t.files.items()
        for a in range(0, size, range_bytes)
    ]
    # No process for an empty share (fewer ranges than processes: a small checkpoint).
    groups = [g for g in (ranges[i::parallel] for i in range(parallel)) if g]
    shm = Path(tempfile.mkdtemp(prefix="bench-blob-", dir="/dev/shm")) if to_shm else None
    argvs = []
    for i, group in enumerate(groups):
        requests = [
            (
                f"{t.endpoint}/{t.container}/{t.prefix}/{shard}?{t.sas}",
                a,
                b,
                str(shm / f"{i}-{j}") if shm else "/dev/null",
            )
            for j, (shard, a, b) in enumerate(group)
        ]
        suffix = {"curl": "cfg", "c": "txt"}.get(kind, "json")
        argvs.append(_client_argv(kind, command, workdir / f"requests-{i}.{suffix}", requests, t))
    expected = sum(b - a + 1 for _, a, b in ranges)

    def load() -> tuple[Mapping[str, Any], dict[str, Any]]:
        procs = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for argv in argvs
        ]
        outs = [p.communicate() for p in procs]
        statuses: dict[str, int] = {}
        got = 0
        for out, _err in outs:
            for line in out.splitlines():
                code, size = line.split()
                statuses[code] = statuses.get(code, 0) + 1
                got += int(float(size))
        errors = [e.strip() for _, e in outs if e.strip()] + [
            f"{name} exit {p.returncode}" for p in procs if p.returncode
        ]
        return {}, {
            "requests": len(ranges),
            "bytes": got,
            "expected_bytes": expected,
            "statuses": statuses,
            "errors": errors[:5],
        }

    def cleanup() -> dict[str, Any]:
        # Untimed: freeing is not the load. The request lists hold the SAS: never leave them.
        shutil.rmtree(workdir, ignore_errors=True)
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)
        return {}

    return Contestant(load, checksum=None, versions={"ceiling_client": name}, after_load=cleanup)


def _curl_config(requests: list[tuple[str, int, int, str]], ca_bundle: str) -> str:
    lines = []
    for j, (url, a, b, out) in enumerate(requests):
        if j:
            lines.append("next")
        lines += [
            f'url = "{url}"',
            f'header = "x-ms-range: bytes={a}-{b}"',
            'header = "x-ms-version: 2021-08-06"',
            *([f'cacert = "{ca_bundle}"'] if ca_bundle else []),
            f'output = "{out}"',
            'write-out = "%{http_code} %{size_download}\\n"',
        ]
    return "\n".join(lines) + "\n"


def _curl_version(curl: str) -> str:
    out = subprocess.run([curl, "--version"], capture_output=True, text=True, check=False).stdout
    return out.split()[1] if out else "?"


class _BufferWriter(io.RawIOBase):
    """A seekable writable stream over a preallocated bytearray, for download_blob().readinto()
    (its parallel path seeks to each chunk's offset under a lock, then writes)."""

    def __init__(self, buf: bytearray) -> None:
        self._view = memoryview(buf)
        self._pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = base + offset
        return self._pos

    def write(self, data: Any) -> int:
        n = len(data)
        self._view[self._pos : self._pos + n] = data
        self._pos += n
        return n


def make_sdk(t: Target, tuned: bool, concurrency: int, chunk_bytes: int) -> Contestant:
    _import_sdk()
    try:
        from safetensors.torch import load as st_load
    except ImportError as exc:
        raise Unavailable(f"safetensors not importable ({exc})") from exc
    from azure.storage.blob import BlobServiceClient

    def load() -> tuple[Mapping[str, Any], dict[str, Any]]:
        kwargs = {"max_chunk_get_size": chunk_bytes} if tuned else {}
        service = BlobServiceClient.from_connection_string(t.connection_string, **kwargs)
        container = service.get_container_client(t.container)
        index = json.loads(container.download_blob(f"{t.prefix}/{INDEX_NAME}").readall())
        out: dict[str, Any] = {}
        for fname in sorted(set(index["weight_map"].values())):
            name = f"{t.prefix}/{fname}"
            if tuned:
                downloader = container.download_blob(name, max_concurrency=concurrency)
                buf = bytearray(downloader.size)
                downloader.readinto(_BufferWriter(buf))
                data = bytes(buf)  # safetensors.torch.load takes bytes, not a bytearray
                del buf
            else:
                data = container.download_blob(name).readall()
            out.update(st_load(data))
            del data
        return out, {}

    versions = {
        "azure-storage-blob": package_version("azure-storage-blob"),
        "safetensors": package_version("safetensors"),
    }
    return Contestant(load, versions=versions)


def _report_extra(report: Any) -> dict[str, Any]:
    d = report.to_dict()
    keys = (
        "requests",
        "retries",
        "bytes",
        "seconds",
        "throughput_gbps",
        "peak_slots_in_flight",
        "slot_waits",
        "staging_slots",
        "staging_slot_bytes",
        "pinned",
        "pinned_fallback",
        "host_populate_seconds",
        "phases",
    )
    out = {k: d.get(k) for k in keys}
    out["shard_fetch_latency_s"] = [s.get("fetch_latency") for s in d.get("shards", [])]
    return out


def make_blob2gpu(t: Target, target: str) -> Contestant:
    """target: 'cpu', 'cuda-fake' or 'cuda' (a real GPU)."""
    _import_sdk()
    fake = None
    if target == "cuda":
        try:
            import torch

            torch.empty(1, device="cuda")  # the primary context, before the baseline RSS
        except Exception as exc:  # no GPU, or a CPU build of torch
            raise Unavailable(f"no CUDA device for blob2gpu-cuda ({exc})") from exc
    if target == "cuda-fake":
        fake = use_fake_driver()
        fake.set_vram_budget(max(8 << 30, 2 * sum(t.files.values())))
    blob2gpu = import_or_unavailable("blob2gpu")
    uri = f"az://{t.container}/{t.prefix}"
    device, framework = ("cpu", "torch") if target == "cpu" else ("cuda", "dlpack")

    def load() -> tuple[Mapping[str, Any], dict[str, Any]]:
        with blob2gpu.open(uri, device=device, framework=framework) as ck:
            out = ck.to_dict()
            report = ck.report
        return out, _report_extra(report)

    def after_load() -> dict[str, Any]:
        if fake is None:
            return {}
        return {
            "fake_peak_device_bytes": fake.peak_device_bytes(),
            "fake_violations": fake.violations(),
            "fake_max_pending_h2d": fake.max_pending_h2d_copies(),
            "fake_emulation_cpu_s": fake.emulation_cpu_seconds(),
        }

    def device_checksum(view: Any) -> int:
        import torch

        host = view.to_host()  # DtoH through the driver: reads what the copies wrote
        return tensor_checksum(torch.from_dlpack(host))

    versions = blob2gpu_versions(blob2gpu)
    if fake is not None:
        versions["fake_driver"] = os.environ["BLOB2GPU_CUDA_DRIVER"]
    return Contestant(
        load,
        checksum=tensor_checksum if target == "cpu" else device_checksum,
        versions=versions,
        after_load=after_load,
    )


def make_contestant(name: str, t: Target, args: argparse.Namespace) -> Contestant:
    """Returns the contestant `name`, built untimed; raises Unavailable."""
    if name in CEILINGS:
        return make_ceiling(
            t, args.curl_parallel, args.chunk_mib * MiB, name == "ceiling-shm", args.ceiling_client
        )
    if name in ("sdk-naive", "sdk-tuned"):
        return make_sdk(t, name == "sdk-tuned", args.sdk_concurrency, args.chunk_mib * MiB)
    return make_blob2gpu(t, name.removeprefix("blob2gpu-"))


# --------------------------------------------------------------------------------------------------
# Worker side: one contestant, one load, in a fresh interpreter
# --------------------------------------------------------------------------------------------------


def timed_load(
    contestant: Contestant, azurite_pid: int
) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """Loads once; returns (the tensors, the sample: time, CPU of the loader, its children and
    Azurite, RSS over the baseline before the load). Raises what the load raises."""
    gc.collect()
    baseline_rss = current_rss_bytes()
    hwm_reset = reset_peak_rss()
    if not hwm_reset:
        baseline_rss = max(baseline_rss, peak_rss_bytes())
    watch = Stopwatch(pgid=azurite_pid)
    watch.start()
    tensors, extra = contestant.load()
    spent = watch.stop()
    peak = peak_rss_bytes()
    extra.update(contestant.after_load())
    sample = {
        "wall_s": spent.wall_s,
        "cpu_s": spent.cpu_s + spent.children_cpu_s,  # children: the curl processes of `ceiling`
        "cpu_user_s": spent.user_s + spent.children_user_s,
        "cpu_sys_s": spent.sys_s + spent.children_sys_s,
        "minor_faults": spent.minor_faults + spent.children_minor_faults,
        "cpu_self_s": spent.cpu_s,
        "cpu_children_s": spent.children_cpu_s,
        "azurite_cpu_s": spent.group_cpu_s,
        "azurite_rss_mb": spent.group_rss_bytes / MiB,
        "machine_busy_s": spent.machine_busy_s,
        # CPU other processes (other engineers' builds, tests) burnt while this load ran.
        "foreign_cpu_s": spent.foreign_cpu_s,
        "baseline_rss_mb": baseline_rss / MiB,
        "peak_rss_over_baseline_mb": (peak - baseline_rss) / MiB,
        "peak_rss_method": "VmHWM reset before the load" if hwm_reset else "ru_maxrss",
        "tensors": len(tensors),
        "extra": extra,
    }
    return tensors, sample


def run_worker(name: str, t: Target, spec: dict[str, Any], args: argparse.Namespace) -> int:
    """Loads the checkpoint once in this fresh process; prints one result line."""
    try:
        import torch

        torch.set_num_threads(1)  # untimed checksums only; keeps torch's spinning threads away
        contestant = make_contestant(name, t, args)
    except Unavailable as exc:
        return emit_unavailable(exc)
    try:
        tensors, sample = timed_load(contestant, args.azurite_pid)
    except Exception as exc:
        contestant.after_load()  # releases what it holds (the curl rows' SAS-bearing configs)
        emit({"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:500]})
        return 1
    extra = sample["extra"]
    if contestant.checksum is None:
        ok = not extra.get("errors") and extra.get("bytes") == extra.get("expected_bytes")
        ok = ok and set(extra.get("statuses", {})) == {"206"}
        reason = "" if ok else f"curl: {extra}"
    else:
        tv = time.perf_counter()
        reason = mismatches(spec, tensors, contestant.checksum)
        sample["verify_s"] = time.perf_counter() - tv
    del tensors
    emit(
        {
            "status": "wrong" if reason else "ok",
            "reason": reason,
            "sample": sample,
            "versions": {"torch": torch.__version__, **contestant.versions},
        }
    )
    return 0


# --------------------------------------------------------------------------------------------------
# Parent side: Azurite, rounds of processes, the table
# --------------------------------------------------------------------------------------------------


def summarize(processes: list[dict[str, Any]], file_bytes: int) -> dict[str, Any]:
    """Returns one contestant's row: its status and the medians of its kept processes."""
    out, kept = fold(processes)
    if not kept:
        return out
    samples = [p["sample"] for p in kept]
    gb = file_bytes / GB
    med = statistics.median

    def m(key: str) -> float:
        return med(s[key] for s in samples)

    wall = m("wall_s")
    out.update(
        versions=kept[0]["versions"],
        median={
            "gb_per_s": gb / wall,
            "wall_s": wall,
            "cpu_s_per_gb": m("cpu_s") / gb,
            "cpu_user_s_per_gb": m("cpu_user_s") / gb,
            "cpu_sys_s_per_gb": m("cpu_sys_s") / gb,
            "minor_faults": m("minor_faults"),
            "azurite_cpu_s_per_gb": m("azurite_cpu_s") / gb,
            "azurite_cores": med(s["azurite_cpu_s"] / s["wall_s"] for s in samples),
            "loader_cores": med(s["cpu_s"] / s["wall_s"] for s in samples),
            "foreign_cpu_s": m("foreign_cpu_s"),
            "peak_rss_over_baseline_mb": m("peak_rss_over_baseline_mb"),
            "baseline_rss_mb": m("baseline_rss_mb"),
        },
        max_peak_rss_over_baseline_mb=max(s["peak_rss_over_baseline_mb"] for s in samples),
        extra=[s["extra"] for s in samples],
    )
    if "fake_peak_device_bytes" in samples[0]["extra"]:
        out["median"]["peak_rss_minus_fake_vram_mb"] = med(
            s["peak_rss_over_baseline_mb"] - s["extra"]["fake_peak_device_bytes"] / MiB
            for s in samples
        )
        out["median"]["fake_emulation_cpu_s_per_gb"] = (
            med(s["extra"]["fake_emulation_cpu_s"] for s in samples) / gb
        )
    if samples[0]["extra"].get("host_populate_seconds") is not None:
        out["median"]["host_populate_cpu_s_per_gb"] = (
            med(s["extra"]["host_populate_seconds"] for s in samples) / gb
        )
    return out


def print_host_work(
    medians: Mapping[str, Mapping[str, float]], cores: int, memory: Mapping[str, Any]
) -> None:
    """CPU the loaders spend on work the ceiling does not do, and the CPU-bound model without it.

    blob2gpu-cpu makes new memory resident for every byte it lands (the kernel zeroing fresh pages:
    the report's host_populate_seconds); curl writing to /dev/null does not. The fake driver makes
    its 'device' memory resident and performs the copies on the CPU, which a GPU does in hardware
    (fake_cuda_emulation_cpu_seconds). Both are printed, with what the model gives without them as
    a fraction of the ceiling's model: an estimate, not a measurement. `memory` is what new
    memory costs this machine (harness.machine.fresh_memory_cost), which says how much of that
    work is the machine's rather than the loader's.
    """
    if "first_touch_cpu_s_per_gb" in memory:
        print(
            "this machine, making new memory resident: "
            f"{memory['first_touch_cpu_s_per_gb']:.2f} CPU s/GB on first touch, "
            f"{memory['retouch_cpu_s_per_gb']:.2f} for pages just freed"
            + (
                " (the kernel reports free pages to its host: page_reporting)"
                if memory.get("page_reporting")
                else ""
            )
        )
    # (row, median key of the work, what the work is, label of the estimate without it)
    kinds = (
        (
            "blob2gpu-cpu",
            "host_populate_cpu_s_per_gb",
            "making new memory resident (report.host_populate_seconds)",
            "blob2gpu-cpu less making memory resident",
        ),
        (
            "blob2gpu-cuda-fake",
            "fake_emulation_cpu_s_per_gb",
            "the fake driver's emulation of a GPU (resident device memory, copies)",
            "blob2gpu-cuda less the fake's work",
        ),
    )
    estimates = []
    for row, key, what, label in kinds:
        m = medians.get(row)
        if m is None or key not in m:
            continue
        print(f"{row}: {what}: {m[key]:.2f} CPU s/GB of its {m['cpu_s_per_gb']:.2f}")
        estimates.append((label, m, m[key]))
    ceiling = medians.get("ceiling")
    if not estimates or ceiling is None:
        return
    model_ceiling = cores / (ceiling["cpu_s_per_gb"] + ceiling["azurite_cpu_s_per_gb"])
    parts = []
    for label, m, extra in estimates:
        model = cores / (max(0.0, m["cpu_s_per_gb"] - extra) + m["azurite_cpu_s_per_gb"])
        parts.append(f"{label} {model:.2f} GB/s ({model / model_ceiling:.2f}x)")
    print("CPU-bound model without that work (x the ceiling's model): " + ", ".join(parts))


def print_rows(
    results: dict[str, dict[str, Any]], spec: dict[str, Any], args: argparse.Namespace
) -> None:
    """Prints the run's conditions and one row per contestant."""
    ceiling, naive = median_of(results, "ceiling"), median_of(results, "sdk-naive")
    headers = ["contestant", "GB/s", "x ceiling", "x sdk-naive", "CPU s/GB", "peak RSS MB"]
    headers += ["azurite cores", "requests/retries"]
    widths = [19, 6, 9, 11, 8, 11, 13, 16]
    print()
    print(
        f"checkpoint: {spec['file_bytes'] / GB:.2f} GB ({spec['tensors']} bf16 tensors, "
        f"{spec['shards']} shards) in an in-memory Azurite on 127.0.0.1 over "
        f"{'HTTPS' if args.https else 'HTTP'}; median of "
        f"{args.repeats} fresh processes; "
        + (
            f"Azurite pinned to one CPU, contestants to CPUs {args.loader_cpus}"
            if args.loader_cpus
            else f"{os.cpu_count()} cores shared by Azurite and the loader"
        )
    )
    client = results.get("ceiling", {}).get("versions", {}).get("ceiling_client")
    if client:
        print(f"ceiling client: {client}")
    print_header(headers, widths)
    for name, r in results.items():
        med = r.get("median")
        if not med:
            print_status_row(name, r, widths[0])
            continue
        g = med["gb_per_s"]
        rss = "-" if name in CEILINGS else f"{med['peak_rss_over_baseline_mb']:.0f}"
        if "peak_rss_minus_fake_vram_mb" in med:
            rss = f"{med['peak_rss_minus_fake_vram_mb']:.0f}*"
        extra = r["extra"][-1]
        reqs = f"{extra.get('requests', '-')}/{extra.get('retries', '-')}"
        if name.startswith("sdk"):
            reqs = "-"
        x_ceiling, x_naive = ratio(g, ceiling), ratio(g, naive)
        cols = [
            name,
            f"{g:.2f}",
            f"{x_ceiling:.2f}x" if x_ceiling else "-",
            f"{x_naive:.1f}x" if x_naive else "-",
            f"{med['cpu_s_per_gb']:.2f}",
            rss,
            f"{med['azurite_cores']:.2f}",
            reqs,
        ]
        print(format_row(cols, widths) + (f"  ({r['reason']})" if r.get("reason") else ""))
    print(
        "peak RSS MB: process high-water mark minus its RSS right before the load (imports done)."
    )


def print_fake_driver(fake: dict[str, Any]) -> None:
    """Prints how much of the fake-driver row's RSS is its 'device' memory, and its counters."""
    if not fake.get("median"):
        return
    raw = fake["median"]["peak_rss_over_baseline_mb"]
    vram = statistics.median(e["fake_peak_device_bytes"] for e in fake["extra"]) / MiB
    print(
        f"* blob2gpu-cuda-fake: {raw:.0f} MB over baseline, of which {vram:.0f} MB is the fake "
        "driver's 'device' memory (host RAM); the column shows the rest"
    )
    slots = sorted({str(e.get("peak_slots_in_flight")) for e in fake["extra"]})
    viol = sum(e.get("fake_violations", 0) for e in fake["extra"])
    pending = max(e.get("fake_max_pending_h2d", 0) for e in fake["extra"])
    print(
        f"  peak_slots_in_flight: {', '.join(slots)}; fake driver violations: {viol}; "
        f"max pending H2D copies: {pending}"
    )


def print_cpu(
    results: dict[str, dict[str, Any]], args: argparse.Namespace, memory: Mapping[str, Any]
) -> None:
    """Prints Azurite's and the loaders' CPU per row and the CPU-bound model of GB/s."""
    cols = [(n, r["median"]) for n, r in results.items() if r.get("median")]
    if not cols:
        return
    print("Azurite CPU s/GB: " + ", ".join(f"{n} {m['azurite_cpu_s_per_gb']:.2f}" for n, m in cols))
    print(
        "loader cores (process CPU / wall): "
        + ", ".join(f"{n} {m['loader_cores']:.2f}" for n, m in cols)
    )
    print(
        "loader CPU s/GB user + sys: "
        + ", ".join(
            f"{n} {m['cpu_user_s_per_gb']:.2f} + {m['cpu_sys_s_per_gb']:.2f}" for n, m in cols
        )
    )
    # Loader and Azurite share the cores: when both are CPU-bound, GB/s ~ cores / (CPU s/GB).
    cores = os.cpu_count() or 1
    if args.loader_cpus:  # pinned: each side is capped by its own cores
        n = len(args.loader_cpus.split(","))
        print(
            f"CPU-bound model, min(1 / Azurite, {n} / loader CPU s/GB): "
            + ", ".join(
                f"{name} {min(1 / m['azurite_cpu_s_per_gb'], n / m['cpu_s_per_gb']):.2f} GB/s"
                for name, m in cols
            )
        )
        return
    print(
        f"CPU-bound model, {cores} cores / (loader + Azurite CPU s/GB): "
        + ", ".join(
            f"{n} {cores / (m['cpu_s_per_gb'] + m['azurite_cpu_s_per_gb']):.2f} GB/s"
            for n, m in cols
        )
    )
    print_host_work(dict(cols), cores, memory)


def print_targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Prints blob2gpu's throughput and host-memory targets; returns the verdicts."""
    verdicts: list[dict[str, Any]] = []
    print("\ntargets:")

    def show(what: str, value: float | None, need: float, ok: bool | None) -> None:
        v = verdict(ok)
        shown = "-"
        if value is not None:  # three places where two would show a miss as the target
            shown = f"{value:.3f}" if round(value, 2) == need else f"{value:.2f}"
        print(f"  {what}: {v} ({shown})")
        verdicts.append({"target": what, "value": value, "need": need, "verdict": v})

    for b2g in (b for b in BLOB2GPU if b in results):
        for other, need in THROUGHPUT_TARGETS:
            r = ratio(median_of(results, b2g), median_of(results, other))
            show(f"{b2g} >= {need:g}x {other}", r, need, None if r is None else r >= need)
    # Host memory of a GPU load: the fake's 'device' memory is host RAM and is left out.
    for row, key, what in (
        ("blob2gpu-cuda-fake", "peak_rss_minus_fake_vram_mb", " (less fake VRAM)"),
        ("blob2gpu-cuda", "peak_rss_over_baseline_mb", ""),
    ):
        r = results.get(row, {})
        if not r.get("median"):
            continue
        e = r["extra"][-1]
        ring = (e.get("staging_slots") or 0) * (e.get("staging_slot_bytes") or 0)
        ring = ring or DEFAULT_RING_BYTES
        need = ring / MiB + RSS_SLACK_MB
        have = r["median"][key]
        show(
            f"{row} peak RSS over baseline{what} <= ring {ring / MiB:.0f} MB + {RSS_SLACK_MB} MB",
            have,
            need,
            have <= need,
        )
    return verdicts


def run_contestants(
    args: argparse.Namespace, names: list[str], ckpt: Path, target_file: Path, azurite_pid: int
) -> dict[str, list[dict[str, Any]]]:
    """Runs the rounds of fresh processes; returns every contestant's processes by name."""
    file_bytes = read_spec(ckpt)["file_bytes"]
    cmd_tail = ["--ckpt", str(ckpt), "--target-file", str(target_file)]
    cmd_tail += ["--azurite-pid", str(azurite_pid), "--curl-parallel", str(args.curl_parallel)]
    cmd_tail += ["--chunk-mib", str(args.chunk_mib), "--sdk-concurrency", str(args.sdk_concurrency)]
    cmd_tail += ["--ceiling-client", args.ceiling_client]
    if args.loader_cpus:
        cmd_tail += ["--loader-cpus", args.loader_cpus]

    def attempt(name: str) -> dict[str, Any]:
        busy = wait_for_idle(args.wait_idle, 0.15)
        cmd = worker_command(str(Path(__file__).resolve()), name, *cmd_tail)
        p, _ = run_in_fresh_process(cmd, args.timeout)
        p["busy_fraction_before"] = busy
        return p

    def progress(prefix: str, p: dict[str, Any]) -> None:
        s = p["sample"]
        print(
            f"{prefix}{file_bytes / GB / s['wall_s']:.2f} GB/s"
            f" ({s['wall_s']:.2f} s, loader CPU {s['cpu_s']:.1f} s, azurite CPU "
            f"{s['azurite_cpu_s']:.1f} s, others {s['foreign_cpu_s']:.1f} s)",
            flush=True,
        )

    rounds = Rounds(attempt, lambda p: p["sample"], progress, args.repeats, args.retries)
    return rounds.run(names)


def serve_and_run(
    args: argparse.Namespace, ap: argparse.ArgumentParser, names: list[str], ckpt: Path
) -> dict[str, list[dict[str, Any]]]:
    """Starts Azurite, uploads the checkpoint, runs the contestants against it; returns every
    contestant's processes by name."""
    from harness import azurite

    spec = read_spec(ckpt)
    workdir = Path(tempfile.mkdtemp(prefix="bench-blob-"))
    az, ca_bundle = azurite.start(workdir if args.https else None)
    try:
        up = azurite.upload(az, CONTAINER, ckpt, ckpt.name)
        if args.pin:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < 2:
                ap.error("--pin needs at least 2 CPUs")
            pin_threads(az.pid, {cpus[0]})
            args.loader_cpus = ",".join(str(c) for c in cpus[1:])
            print(f"pinned: Azurite on CPU {cpus[0]}, contestants on CPUs {args.loader_cpus}")
        _, az_rss = group_cpu_and_rss(az.pid)
        print(
            f"azurite on port {az.port} (pid {az.pid}); uploaded "
            f"{spec['file_bytes'] / GB:.2f} GB in {up:.1f} s; azurite RSS {az_rss / MiB:.0f} MB",
            flush=True,
        )
        target = Target(
            connection_string=az.connection_string(),
            endpoint=az.endpoint(),
            container=CONTAINER,
            prefix=ckpt.name,
            sas=azurite.container_sas(CONTAINER),
            files=spec["files"],
            ca_bundle=ca_bundle,
        )
        # Secrets stay out of argv (visible in ps): the worker reads them from a private file.
        target_file = workdir / "target.json"
        target_file.write_text(json.dumps(target.__dict__))
        target_file.chmod(0o600)
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = target.connection_string
        return run_contestants(args, names, ckpt, target_file, az.pid)
    finally:
        az.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Returns the parser and the parsed command line."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--total-gb", type=float, default=2.0, help="checkpoint size in GB (default 2)")
    ap.add_argument("--shards", type=int, default=8, help="number of shards (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="processes per contestant (default 3)")
    ap.add_argument("--json", type=Path, help="write every number to this file")
    ap.add_argument("--only", help="comma-separated contestants (default: all)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per process (default 900)")
    add_round_arguments(ap)
    ap.add_argument("--curl-parallel", type=int, default=8, help="curl processes (default 8)")
    ap.add_argument(
        "--ceiling-client",
        choices=("auto", "curl", "c", "node"),
        default="auto",
        help="the ceiling's client (default auto: curl, or where curl is missing"
        " bench/range_get.c over HTTP, else bench/range_get.js on node)",
    )
    ap.add_argument(
        "--chunk-mib",
        type=int,
        default=32,
        help="range size of curl and sdk-tuned's max_chunk_get_size, MiB (default 32)",
    )
    ap.add_argument(
        "--sdk-concurrency", type=int, default=8, help="sdk-tuned max_concurrency (default 8)"
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="run Azurite on the first CPU and the contestants on the others, so a loader's CPU"
        " use cannot slow the server down (the ceiling is then one core of Azurite)",
    )
    ap.add_argument(
        "--https",
        action="store_true",
        help="serve over HTTPS (a self-signed certificate every contestant trusts), as Azure"
        " does: TLS decryption is then part of every row's CPU",
    )
    ap.add_argument(
        "--gpu",
        action="store_true",
        help="load onto the real GPU (blob2gpu-cuda) instead of the fake driver (on a GPU host)",
    )
    ap.add_argument("--loader-cpus", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--target-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--azurite-pid", type=int, default=0, help=argparse.SUPPRESS)
    return ap, ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    if args.loader_cpus:  # before any import starts a thread: they all inherit it
        os.sched_setaffinity(0, {int(c) for c in args.loader_cpus.split(",")})
    if args.worker:
        t = Target(**json.loads(args.target_file.read_text()))
        return run_worker(args.worker, t, read_spec(args.ckpt), args)

    # A real GPU's row replaces the fake driver's; without --gpu there is none.
    default = [
        n for n in CONTESTANTS if n != ("blob2gpu-cuda-fake" if args.gpu else "blob2gpu-cuda")
    ]
    names = chosen_contestants(ap, args.only, default, CONTESTANTS)

    ckpt = llama_checkpoint(args.total_gb, args.shards)
    spec = read_spec(ckpt)
    t_start = time.perf_counter()
    processes = serve_and_run(args, ap, names, ckpt)
    results = {n: summarize(processes[n], spec["file_bytes"]) for n in names}
    memory = fresh_memory_cost()  # after the contestants, which it must not disturb
    print_rows(results, spec, args)
    print_fake_driver(results.get("blob2gpu-cuda-fake", {}))
    print_cpu(results, args, memory)
    verdicts = print_targets(results)
    print(f"\nwhole run: {time.perf_counter() - t_start:.0f} s (Azurite start and upload included)")
    if args.json:
        write_run_json(
            args.json,
            args,
            checkpoint={"path": str(ckpt), **spec_summary(spec)},
            machine=machine_info(node=node_version(), fresh_memory=memory),
            results=results,
            targets=verdicts,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
