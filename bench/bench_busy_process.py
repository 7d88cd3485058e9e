#!/usr/bin/env python3
"""A load in a busy process: how much slower blob2gpu loads when one other thread of the process
runs plain Python (a loop of arithmetic, what any busy interpreter does) than when the process is
idle. A loader lives inside someone else's process (a serving engine, a training job); its bytes
must not wait for that process's interpreter.

Usage:
    python bench/bench_busy_process.py [--total-gb 1] [--shards 8] [--repeats 3]
                                       [--rows local,http,https,cache] [--json out.json]
                                       [--setting native_http=false] [--no-control]

The checkpoint is the Llama-shaped bf16 one of bench_local_load.py (generated once, cached under
bench/.data/). Rows:

    local   blob2gpu.open(directory, device="cpu"): the core's io threads (mmap, page cache warm)
    http    the same checkpoint from an in-memory Azurite over HTTP (az://, connection string)
    https   from a second Azurite served over TLS with a private CA (tests/support/tls.py; the
            worker trusts it through REQUESTS_CA_BUNDLE)
    cache   the http row's checkpoint from the node's NVMe cache (local_nvme_cache_enabled), warmed
            before the rounds (`blob2gpu cache warm`): every shard a hit, its record read and
            checked, its bytes read from the cache directory (page cache warm), Blob asked only
            for the listing

Each load runs in a fresh interpreter: `blob2gpu.open(uri, device="cpu", framework="torch")` and
`to_dict()`, timed from the call to the last tensor in hand (imports before the clock, the
Blob rows' azure-storage-blob and the metrics' prometheus_client too: a process pays them once,
not per load), once with
the process otherwise idle and once beside a thread spinning `while True: x += 1`; every tensor is
then checked against the generated checksums (untimed). Rounds are round-robin (each round runs
every row, idle then busy), so drift on this shared machine hits all rows alike; the table shows
medians over the rounds. busy / idle is the ratio of the medians; the goal is at most 1.3x.
CPU s is the load's process CPU less the busy thread's own.

The control (on by default, --no-control to skip it): the same load beside the same loop run in
another process. It takes a core just as the busy thread does but shares no GIL, so on a box
where the server, the loader and the spinner compete for few cores, busy / control is the part
of the slowdown the interpreter causes, and control / idle the part CPU contention does (a
client with no GIL at all, curl, slows about as much: bench_native_range.py).

`--setting NAME=VALUE` (repeatable) passes a blob2gpu setting to every load (as BLOB2GPU_NAME in
the worker's environment), e.g. native_http=false for the Python feeder's reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import GB, SETTLE_S
from harness.accounting import Stopwatch, wait_for_idle
from harness.busy import BusyThread
from harness.checkpoints import llama_checkpoint, mismatches, read_spec, warm_page_cache
from harness.checksums import tensor_checksum
from harness.isolation import emit, run_in_fresh_process, worker_command
from harness.machine import blob2gpu_versions, machine_info

CONTAINER = "busy"
ROWS = ("local", "http", "https", "cache")
MODES = ("idle", "busy", "control")  # the process idle, a busy thread in it, a busy process beside
GOAL = 1.3  # busy / idle at most


# -- the worker: one load in a fresh interpreter ------------------------------------------------
def run_worker(args: argparse.Namespace) -> int:
    import blob2gpu
    import torch  # noqa: F401  (imported before the clock, as a serving process has it)

    if args.worker != "local":  # as bench_blob_load.py: the SDK (listing) imported untimed
        import azure.core.pipeline.transport
        import azure.storage.blob  # noqa: F401
    from blob2gpu.operations import metrics

    metrics.available()  # prometheus_client (the load's metrics), imported untimed too

    spec = read_spec(Path(args.spec_dir))
    busy = BusyThread() if args.busy else None
    if busy is not None:
        busy.__enter__()
        time.sleep(0.2)  # the thread is spinning before the load starts
    spinner = None
    if args.beside:  # the same loop in another process: a core taken, no GIL shared
        loop = "x = 0\nwhile True:\n    x += 1\n"
        spinner = subprocess.Popen([sys.executable, "-c", loop])
        time.sleep(0.2)
    watch = Stopwatch(pgid=args.server_pid)  # the server's CPU is not other users'
    busy_cpu = 0.0
    try:
        busy_cpu -= busy.cpu_s() if busy is not None else 0.0
        watch.start()
        with blob2gpu.open(args.uri, device="cpu", framework="torch") as ck:
            tensors = ck.to_dict()
            report = ck.report
        spent = watch.stop()
        busy_cpu += busy.cpu_s() if busy is not None else 0.0
    finally:
        if busy is not None:
            busy.__exit__()
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    wrong = mismatches(spec, tensors, tensor_checksum)
    if wrong:
        emit({"status": "wrong", "reason": wrong})
        return 1
    emit(
        {
            "status": "ok",
            "wall_s": spent.wall_s,
            "cpu_s": max(0.0, spent.cpu_s - busy_cpu),
            "busy_cpu_s": busy_cpu,
            "foreign_cpu_s": spent.foreign_cpu_s,
            "busy_loops": busy.loops if busy is not None else 0,
            "requests": getattr(report, "requests", None),
            "host_populate_s": getattr(report, "host_populate_seconds", None),
            "versions": blob2gpu_versions(blob2gpu),
        }
    )
    return 0


# -- the parent: servers, rounds, the table -----------------------------------------------------
def serve(ckpt: Path, workdir: Path, rows: list[str]) -> tuple[dict[str, dict[str, str]], list]:
    """Start what the rows read from; returns ({row: the worker's uri and environment}, the
    servers to stop)."""
    from harness import azurite

    targets: dict[str, dict[str, str]] = {}
    servers: list[Any] = []
    if "local" in rows:
        targets["local"] = {"uri": str(ckpt)}
    for row in ("http", "https"):
        if row not in rows and not (row == "http" and "cache" in rows):
            continue
        tls_dir = None
        if row == "https":
            tls_dir = workdir / "tls"
            tls_dir.mkdir()
        server, ca_bundle = azurite.start(tls_dir)
        servers.append(server)
        seconds = azurite.upload(server, CONTAINER, ckpt, ckpt.name)
        print(f"{row}: Azurite on port {server.port}, uploaded in {seconds:.1f} s", flush=True)
        env = {"AZURE_STORAGE_CONNECTION_STRING": server.connection_string()}
        if ca_bundle:
            env["REQUESTS_CA_BUNDLE"] = ca_bundle
        targets[row] = {"uri": f"az://{CONTAINER}/{ckpt.name}", "pid": str(server.pid), **env}
    if "cache" in rows:
        cached = {
            **targets["http"],
            "BLOB2GPU_LOCAL_NVME_CACHE_ENABLED": "true",
            "BLOB2GPU_CACHE_DIR": str(workdir / "cache"),
        }
        warm = [sys.executable, "-m", "blob2gpu", "cache", "warm", cached["uri"]]
        started = time.monotonic()
        subprocess.run(warm, env={**os.environ, **cached}, check=True, capture_output=True)
        print(f"cache: warmed in {time.monotonic() - started:.1f} s", flush=True)
        targets["cache"] = cached
        if "http" not in rows:
            del targets["http"]
    return targets, servers


def run_rounds(
    args: argparse.Namespace, ckpt: Path, targets: dict[str, dict[str, str]]
) -> list[dict[str, Any]]:
    runs = []
    settings = {f"BLOB2GPU_{k.upper()}": v for k, v in args.setting}
    base_env = {k: v for k, v in os.environ.items() if k != "REQUESTS_CA_BUNDLE"}
    for r in range(args.repeats):
        for row in args.rows:
            for mode in MODES if args.control else MODES[:2]:
                busy = mode == "busy"
                target = dict(targets[row])
                uri, pid = target.pop("uri"), target.pop("pid", "0")
                env = {**base_env, **target, **settings}
                if row == "local":
                    warm_page_cache(sorted(str(p) for p in ckpt.glob("*.safetensors")))
                if row == "cache":
                    entries = Path(env["BLOB2GPU_CACHE_DIR"]) / "entries"
                    warm_page_cache(sorted(str(p) for p in entries.glob("*.bin")))
                time.sleep(args.settle)  # freed memory reported back to the host first
                idle = wait_for_idle(args.wait_idle, 0.25)
                cmd = worker_command(
                    __file__,
                    row,
                    f"--uri={uri}",
                    f"--spec-dir={ckpt}",
                    f"--server-pid={pid}",
                    *(["--busy"] * busy),
                    *(["--beside"] * (mode == "control")),
                )
                result, stderr = run_in_fresh_process(cmd, args.timeout, env=env)
                run = {
                    "round": r + 1,
                    "row": row,
                    "busy": busy,
                    "mode": mode,
                    "idle_before": idle,
                    **result,
                }
                runs.append(run)
                if result.get("status") == "ok":
                    print(
                        f"[{r + 1}/{args.repeats}] {row:5} {mode:7}: {result['wall_s']:6.2f} s, "
                        f"CPU {result['cpu_s']:5.2f} s, others {result['foreign_cpu_s']:.2f} "
                        f"CPU s (machine {idle:.0%} busy before)",
                        flush=True,
                    )
                else:
                    print(
                        f"[{r + 1}/{args.repeats}] {row} {mode}: {result.get('status')}: "
                        f"{result.get('reason', '')}",
                        flush=True,
                    )
                    print("   " + "\n   ".join(stderr[-5:]), flush=True)
    return runs


ROW_NAMES = {
    "local": "local directory (core io threads, mmap)",
    "http": "Azurite over HTTP",
    "https": "Azurite over HTTPS",
    "cache": "NVMe cache hit (Blob listing over HTTP)",
}


def table(runs: list[dict[str, Any]], rows: list[str]) -> list[dict[str, Any]]:
    """Prints the Markdown table; returns its rows."""
    control = any(x.get("mode") == "control" for x in runs)
    print()
    head = "| load (to the CPU) | idle process | one busy Python thread | busy / idle "
    if control:
        head += "| busy process beside it (control) | busy / control "
    print(head + "| runs idle / busy" + (" / control" if control else "") + " (s) |")
    print("|---" * (5 + 2 * control) + "|")
    out = []
    for row in rows:
        cells: dict[str, list[float]] = {}
        for mode in MODES if control else MODES[:2]:
            cells[mode] = [
                x["wall_s"]
                for x in runs
                if x["row"] == row
                and x.get("mode", "busy" if x["busy"] else "idle") == mode
                and x.get("status") == "ok"
            ]
        if not all(cells.values()):
            print(f"| {ROW_NAMES[row]} |" + " - |" * (3 + 2 * control) + " failed |")
            continue
        medians = {mode: statistics.median(v) for mode, v in cells.items()}
        idle, busy = medians["idle"], medians["busy"]
        runs_text = " / ".join(" ".join(f"{v:.2f}" for v in cells[m]) for m in cells)
        ratio = busy / idle
        line = f"| {ROW_NAMES[row]} | {idle:.2f} s | {busy:.2f} s | {ratio:.1f}x "
        result = {"row": row, "idle_s": idle, "busy_s": busy, "busy_over_idle": ratio}
        if control:
            beside = medians["control"]
            line += f"| {beside:.2f} s | {busy / beside:.2f}x "
            result.update(control_s=beside, busy_over_control=busy / beside)
        print(line + f"| {runs_text} |")
        out.append(result)
    met = [r["row"] for r in out if r["busy_over_idle"] <= GOAL]
    print(f"\ngoal busy / idle <= {GOAL}x: met by {', '.join(met) or 'none'}")
    if control:
        met = [r["row"] for r in out if r["busy_over_control"] <= GOAL]
        print(f"busy / control <= {GOAL}x (the interpreter's part): {', '.join(met) or 'none'}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--total-gb", type=float, default=1.0)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--setting", action="append", default=[], help="NAME=VALUE for every load")
    ap.add_argument("--wait-idle", type=float, default=20.0, help="seconds to wait for idle")
    ap.add_argument("--settle", type=float, default=SETTLE_S, help="seconds before each load")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per load")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", choices=ROWS)  # internal: run one load
    ap.add_argument("--uri")
    ap.add_argument("--spec-dir")
    ap.add_argument("--server-pid", type=int, default=0)
    ap.add_argument("--busy", action="store_true")
    ap.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the control (each load beside a busy process)",
    )
    ap.add_argument("--beside", action="store_true")  # internal: spin another process
    args = ap.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    if any(r not in ROWS for r in args.rows):
        ap.error(f"--rows: choose from {', '.join(ROWS)}")
    pairs = []
    for item in args.setting:
        name, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--setting {item}: NAME=VALUE")
        pairs.append((name.strip(), value.strip()))
    args.setting = pairs
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    ckpt = llama_checkpoint(args.total_gb, args.shards)
    spec = read_spec(ckpt)
    print(
        f"checkpoint {ckpt.name}: {spec['file_bytes'] / GB:.2f} GB, {spec['tensors']} tensors; "
        f"settings {dict(args.setting) or 'defaults'}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-busy-"))
    targets, servers = serve(ckpt, workdir, args.rows)
    try:
        runs = run_rounds(args, ckpt, targets)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    rows = table(runs, args.rows)
    if args.json:
        info = machine_info(settings=dict(args.setting))
        args.json.write_text(json.dumps({"machine": info, "rows": rows, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
