#!/usr/bin/env python3
"""Fleet simulation: a fleet of inference servers cold-starts at once against one storage account
that throttles, as Azure Blob Storage does (503 ServerBusy beyond its request rate or its egress).

Usage:
    python bench/bench_fleet.py [--nodes 8] [--per-node 2] [--total-mb 256] [--rate-cap 50]
                                [--no-cap] [--modes cold,cache,fanout] [--json out.json]
                                [--retry-max-attempts N] [--prefetch-concurrency N]
                                [--egress-mbps 400] [--egress-burst-mb N]

The run starts its own in-memory Azurite (tests/support/azurite.py) behind the tests' fault proxy
(tests/support/fault_proxy.py) with a request-rate cap: a token bucket over every request, burst
one second's worth; beyond it the proxy answers 503 ServerBusy without asking Azurite. With
`--egress-mbps` it also caps the account's egress (megabits per second over every connection, as
Azure states its limits, with a burst of `--egress-burst-mb`, one second's worth by default):
beyond it, 503 ServerBusy "Egress is over the account limit." with a Retry-After. It
publishes a generated checkpoint (random bytes as float16 tensors, `--shards` shards and an
index), then, for each mode, starts `--nodes` loader processes. Each one imports blob2gpu (and
torch for fan-out) and loads a one-tensor checkpoint, so that the imports blob2gpu makes on its
first load (azure-storage-blob, requests: ~1 s alone, several seconds when 8 processes share 2
cores) stay out of the numbers, says it is ready and waits. When all are ready they are released
together, and each times its cold start from that moment to the last tensor in memory
(`framework="dlpack"`, device cpu). Afterwards (untimed) each checksums its tensors; a load that
raised or returned wrong bytes is a failure.

Modes:
    cold    every process loads the checkpoint from Blob: storage serves one copy per process.
            Processes are grouped into nodes of `--per-node` all the same: each node's loads
            share a cache_dir (the cache off), where they share their throttling budget.
    cache   processes are grouped into nodes of `--per-node` sharing one NVMe cache directory
            (`local_nvme_cache_enabled=True`, a `cache_dir` per node). Wave 1 starts with empty
            caches: the processes of a node racing for a shard download it once. Wave 2 is the
            same fleet restarting (a rollout, a crash loop): every shard is a cache hit.
    fanout  processes are grouped into torch.distributed gloo groups of `--per-node` ranks that
            load with `distributed=True`: each rank fetches its part of the bytes and broadcasts
            it, so storage serves one copy per group. Its ranged GETs are `--chunk-mb` ranges
            under the same throttling control as an ordinary load's.

For each mode (and wave) the table gives: loads that succeeded / failed; p50 and p95 cold start
in seconds over the successful loads (p95 is the nearest rank: the slowest load when there are
fewer than 20); copies: bytes of ranged GETs that reached the loaders over the checkpoint's
bytes; the ranged GETs Azurite served; the requests the cap answered 503; the retries the loaders
counted (read from the retry policy of the container each load opened, so failed and distributed
loads, which have no LoadReport, count too); and worst: the most consecutive failures of one
request (a load fails when it reaches retry_max_attempts, 6 by default). With an egress cap,
bound: the seconds the cap implies for the bytes the account must serve (one copy of the
checkpoint per process cold, per node with the cache's first wave or fan-out, none in the
cache's second wave) at the capped rate, next to p50 and p95; throttled % is the throttled
requests over the ranged GETs served; settled: the median concurrency and range size the loads
settled at (their LoadReport; for fan-out, each rank's throttling control).

Defaults are sized for a 2-core machine (Azurite, the proxy and every loader share the cores):
8 processes, 256 MB in 4 shards, 1 MiB ranges, a 50 requests/s cap; a run takes about two
minutes. Azurite serves ~140 MB/s here, so 1 MiB ranges offer ~140 requests/s and the cap bites;
4 MiB ranges stay under it. On bigger machines raise --nodes and --total-mb and keep the
offered request rate above --rate-cap.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import MiB
from harness.checkpoints import crc_digest, random_checkpoint
from harness.tables import print_markdown, write_run_json

CONTAINER = "fleet"
PREFIX = "model"
WARMUP_PREFIX = "warmup"
READY = "@@FLEET_READY"
RESULT = "@@FLEET_RESULT "
MODES = ("cold", "cache", "fanout")


# --------------------------------------------------------------------------------------------------
# Child: one loader process
# --------------------------------------------------------------------------------------------------
def record_retries() -> tuple[list[Any], list[int]]:
    """Wraps blob2gpu's container opening and retry waits in this process; returns (the containers
    opened, whose retry policies count the retries; a one-element list holding the most
    consecutive failures any one request saw: how close it came to retry_max_attempts).

    Retries are read from the retry policy of the container the load opens, so a failed load (no
    LoadReport) and a distributed one (none either) still say how often they retried."""
    from blob2gpu.sources.azure import container as blob_client
    from blob2gpu.sources.azure import retry as blob_retry

    opened: list[Any] = []
    open_container = blob_client.open_container

    def counting_open(*args: Any, **kwargs: Any) -> Any:
        container = open_container(*args, **kwargs)
        opened.append(container)
        return container

    blob_client.open_container = counting_open
    worst = [0]
    wait_before_retry = blob_retry.RetryPolicy.wait_before_retry

    def recording_wait(self: Any, attempt: int, *args: Any) -> Any:
        worst[0] = max(worst[0], attempt)
        return wait_before_retry(self, attempt, *args)

    blob_retry.RetryPolicy.wait_before_retry = recording_wait  # type: ignore[method-assign]
    return opened, worst


def record_throttles() -> list[Any]:
    """Wraps blob2gpu's throttling control in this process; returns the controls made."""
    from blob2gpu.sources.azure import throttle

    made: list[Any] = []
    init = throttle.ThrottleControl.__init__

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    throttle.ThrottleControl.__init__ = recording_init  # type: ignore[method-assign]
    return made


def note_pace(out: dict[str, Any], stats: Any) -> None:
    """The pace a throttled load settled at (bytes/s, requests/s; None: not paced)."""
    out["pace_bytes_per_second"] = stats.pace_bytes_per_second
    out["pace_requests_per_second"] = stats.pace_requests_per_second
    out["decreases"] = stats.decreases


def load(config: dict[str, Any], out: dict[str, Any], started: float) -> dict[str, Any]:
    """Loads the checkpoint as `config` says, noting seconds (and requests) in `out`; returns the
    tensors. Raises what the load raises."""
    import blob2gpu

    uri = f"az://{CONTAINER}/{PREFIX}"
    settings = config["settings"]
    if config["mode"] == "fanout":
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{config['port']}",
            rank=config["rank"],
            world_size=config["world"],
        )
        controls = record_throttles()
        tensors = blob2gpu.load(uri, framework="dlpack", distributed=True, **settings)
        out["seconds"] = time.perf_counter() - started
        dist.destroy_process_group()
        if controls:  # a fan-out load has no LoadReport: its rank's throttling control tells
            stats = controls[-1].stats()
            out["throttled"] = stats.throttled
            out["concurrency_settled"] = stats.concurrency
            out["range_bytes_settled"] = stats.range_bytes
            note_pace(out, stats)
        return tensors
    controls = record_throttles()
    with blob2gpu.open(uri, framework="dlpack", **settings) as checkpoint:
        tensors = checkpoint.to_dict()
        report = checkpoint.report
    out["seconds"] = time.perf_counter() - started
    if controls:
        note_pace(out, controls[-1].stats())
    out["requests"] = report.requests
    out["throttled"] = report.throttled
    out["concurrency_settled"] = report.concurrency_settled
    out["range_bytes_settled"] = report.range_bytes_settled
    return tensors


def child(config: dict[str, Any]) -> int:
    """Load once when released (a line on stdin); print one RESULT line. Returns the exit code."""
    import blob2gpu

    if config["mode"] == "fanout":
        import torch.distributed  # noqa: F401  (imported before the release, like the rest)
    # A one-tensor load first: the Azure SDK, requests and the rest are imported lazily on the
    # first load (~1 s alone, several when 8 processes share 2 cores), the same in every mode.
    blob2gpu.load(f"az://{CONTAINER}/{WARMUP_PREFIX}", framework="dlpack")
    print(READY, flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    out: dict[str, Any] = {"ok": False, "retries": 0, "requests": None}
    opened, worst = record_retries()
    try:
        tensors = load(config, out, started)
        out["digest"] = crc_digest((name, t.to_bytes()) for name, t in tensors.items())
        out["ok"] = True
    except Exception as e:  # a failed load is a result, not a crash of the benchmark
        out["seconds"] = time.perf_counter() - started
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    out["retries"] = sum(c.retry.retries for c in opened)
    out["worst_failures"] = worst[0]
    print(RESULT + json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


# --------------------------------------------------------------------------------------------------
# Parent: storage, waves, table
# --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Wave:
    mode: str
    wave: int
    results: list[dict[str, Any]]
    wall_seconds: float  # release to the last process exit (checksums and teardown included)
    get_bytes: int
    range_gets: int
    requests: int
    throttled: int
    checkpoint_bytes: int
    expected_digest: int
    copies_needed: float = 0.0  # copies of the checkpoint the account must serve
    egress_bytes_per_second: float = 0.0  # the egress cap; 0: off
    notes: list[str] = field(default_factory=list)
    # Every ranged GET the proxy saw, served or refused: (seconds after the release, blob, bytes
    # asked, 200 or 503), for the JSON: when the throttled ones came.
    ranged: list[tuple[float, str, int, int]] = field(default_factory=list)

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r.get("ok") and r.get("digest") == self.expected_digest]

    def row(self) -> dict[str, Any]:
        seconds = sorted(r["seconds"] for r in self.ok)
        p95 = seconds[max(0, math.ceil(0.95 * len(seconds)) - 1)] if seconds else float("nan")
        row = {
            "mode": self.mode if self.wave == 1 else f"{self.mode} (wave {self.wave})",
            "ok/failed": f"{len(self.ok)}/{len(self.results) - len(self.ok)}",
            "p50 s": f"{statistics.median(seconds):.1f}" if seconds else "-",
            "p95 s": f"{p95:.1f}" if seconds else "-",
            "copies": f"{self.get_bytes / self.checkpoint_bytes:.2f}",
            "GETs": str(self.range_gets),
            "throttled": str(self.throttled),
            "retries": str(sum(r.get("retries") or 0 for r in self.results)),
            "worst": str(max((r.get("worst_failures") or 0 for r in self.results), default=0)),
        }
        if self.egress_bytes_per_second:
            bound = self.copies_needed * self.checkpoint_bytes / self.egress_bytes_per_second
            head = list(row.items())[:4]  # mode, ok/failed, p50, p95: the bound next to them
            row = {**dict(head), "bound s": f"{bound:.1f}", **row}
            row["throttled %"] = f"{100 * self.throttled / max(1, self.range_gets):.0f}"
        settled = [r for r in self.ok if r.get("concurrency_settled") is not None]
        row["settled"] = "-"  # loads that fetched nothing from Blob
        if settled:
            c = statistics.median(r["concurrency_settled"] for r in settled)
            b = statistics.median(r["range_bytes_settled"] for r in settled)
            row["settled"] = f"{c:g} x {b / MiB:g} MiB"
        return row


def start_loaders(configs: list[dict[str, Any]], env: dict[str, str]) -> list[subprocess.Popen]:
    """Returns one loader process per config, each past its imports and warm-up load; raises
    RuntimeError (the others killed) when one does not get there."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(c)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in configs
    ]
    for p in procs:
        assert p.stdout is not None and p.stderr is not None
        if READY not in p.stdout.readline():
            for other in procs:
                other.kill()
            p.wait()
            raise RuntimeError(f"a loader did not start: {p.stderr.read()[-2000:]}")
    return procs


def collect(
    procs: list[subprocess.Popen], started: float, timeout: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """Returns every loader's result (a failure where it printed none) and notes on kills."""
    results = []
    notes = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, started + timeout - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            notes.append(f"pid {p.pid} killed after {timeout:.0f} s")
        lines = [ln for ln in out.splitlines() if ln.startswith(RESULT)]
        if lines:
            results.append(json.loads(lines[-1][len(RESULT) :]))
        else:
            results.append({"ok": False, "seconds": 0.0, "error": err.strip()[-300:]})
    return results, notes


def run_wave(
    mode: str,
    wave: int,
    configs: list[dict[str, Any]],
    env: dict[str, str],
    proxy: Any,
    cap: float,
    checkpoint: tuple[int, int],
    timeout: float,
    egress: tuple[float, int] = (0.0, 0),
    copies_needed: float = 0.0,
) -> Wave:
    """Start one process per config, release them together once all are ready, collect results."""
    proxy.reset()  # no cap while the processes warm up
    procs = start_loaders(configs, env)
    proxy.reset()
    proxy.faults.max_requests_per_second = cap
    proxy.faults.egress_bytes_per_second, proxy.faults.egress_burst_bytes = egress
    started = time.perf_counter()
    released = time.monotonic()  # the proxy's clock
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results, notes = collect(procs, started, timeout)
    wall = time.perf_counter() - started
    c = proxy.counters
    return Wave(
        mode,
        wave,
        results,
        wall,
        c.range_bytes,
        c.range_gets,
        c.requests,
        c.throttled,
        checkpoint[0],
        checkpoint[1],
        copies_needed,
        egress[0],
        notes,
        [(round(t - released, 4), path, asked, status) for t, path, asked, status in c.ranged],
    )


def print_table(waves: list[Wave]) -> None:
    print_markdown([w.row() for w in waves])
    for w in waves:
        errors = [r["error"] for r in w.results if r.get("error")]
        wrong = sum(1 for r in w.results if r.get("ok") and r.get("digest") != w.expected_digest)
        if errors:  # they differ only in the shard and byte range: show one, without the body
            first = " ".join(errors[0].split(" (last:")[0].split())[:240]
            print(f"  {w.mode} wave {w.wave}: {len(errors)} failed, e.g. {first}")
        if wrong:
            print(f"  {w.mode} wave {w.wave}: {wrong} loads returned wrong bytes")
        for n in w.notes:
            print(f"  {w.mode} wave {w.wave}: {n}")


def wave_configs(
    mode: str, args: argparse.Namespace, settings: dict[str, Any], work: Path
) -> tuple[list[int], list[dict[str, Any]]]:
    """Returns (the waves to run, one config per loader process) of one mode."""
    nodes = range(args.nodes // args.per_node)
    # Each node has a cache directory of its own, where its loads share their throttling budget
    # even with the cache off (as on a real node, whose processes share cache_dir).
    node_settings = [{**settings, "cache_dir": str(work / mode / f"node{n}")} for n in nodes]
    if mode == "cold":
        configs = [
            {"mode": mode, "settings": node_settings[n]}
            for n in nodes
            for _ in range(args.per_node)
        ]
        return [1], configs
    if mode == "cache":
        configs = [
            {
                "mode": mode,
                "settings": {
                    **settings,
                    "local_nvme_cache_enabled": True,
                    "cache_dir": str(work / "cache" / f"node{n}"),
                },
            }
            for n in nodes
            for _ in range(args.per_node)
        ]
        return [1, 2], configs
    ports = [free_port() for _ in nodes]
    configs = [
        {
            "mode": mode,
            "settings": node_settings[n],
            "port": ports[n],
            "rank": r,
            "world": args.per_node,
        }
        for n in nodes
        for r in range(args.per_node)
    ]
    return [1], configs


def copies_needed(mode: str, wave: int, args: argparse.Namespace) -> float:
    """Copies of the checkpoint the account must serve in one wave of `mode`: one per process
    cold, one per node with the cache (its first wave; none in the second) or fan-out."""
    if mode == "cold":
        return float(args.nodes)
    if mode == "cache" and wave > 1:
        return 0.0
    return float(args.nodes // args.per_node)


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Returns the parser and the parsed command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nodes",
        "--processes",
        type=int,
        default=8,
        help="loader processes started at once (default 8)",
    )
    parser.add_argument(
        "--per-node",
        type=int,
        default=2,
        help="processes per node: sharing a cache_dir, or one gloo group (2)",
    )
    parser.add_argument("--total-mb", type=int, default=256, help="checkpoint size, MB (256)")
    parser.add_argument("--shards", type=int, default=4, help="checkpoint shards (4)")
    parser.add_argument(
        "--chunk-mb",
        type=float,
        default=1,
        help="bytes per ranged GET, MiB (1; the size throttling starts from)",
    )
    parser.add_argument(
        "--rate-cap",
        type=float,
        default=50,
        help="storage requests per second before 503 ServerBusy (50)",
    )
    parser.add_argument("--no-cap", action="store_true", help="no request-rate cap")
    parser.add_argument(
        "--egress-mbps",
        type=float,
        default=0,
        help="the account's egress cap, megabits per second (0: none)",
    )
    parser.add_argument(
        "--egress-burst-mb",
        type=float,
        default=0,
        help="the egress cap's burst, MB (0: one second's worth)",
    )
    parser.add_argument("--modes", default=",".join(MODES), help="cold,cache,fanout")
    parser.add_argument(
        "--prefetch-concurrency",
        type=int,
        default=None,
        help="per process (blob2gpu's default when not given)",
    )
    parser.add_argument(
        "--retry-max-attempts",
        type=int,
        default=None,
        help="per range (blob2gpu's default when not given)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="per wave, seconds (300)")
    parser.add_argument("--json", type=Path, help="write every process's result here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser, parser.parse_args()


def serve(work: Path, args: argparse.Namespace) -> tuple[Any, Any, dict[str, str], tuple[int, int]]:
    """Writes and uploads the checkpoint and the warm-up one, starts the fault proxy in front of
    Azurite; returns (Azurite, the proxy, the loaders' environment, (checkpoint bytes, digest))."""
    import numpy as np
    from harness import azurite
    from safetensors.numpy import save_file
    from support.fault_proxy import FaultProxy  # type: ignore[import-not-found]

    ckpt_dir = work / "checkpoint"
    ckpt_dir.mkdir()
    checkpoint = random_checkpoint(ckpt_dir, args.total_mb, args.shards)
    az, _ = azurite.start()
    try:
        az.upload_directory(CONTAINER, ckpt_dir, PREFIX)
        warmup_dir = work / "warmup"
        warmup_dir.mkdir()
        save_file({"w": np.zeros(16, dtype=np.float16)}, str(warmup_dir / "model.safetensors"))
        az.upload_directory(CONTAINER, warmup_dir, WARMUP_PREFIX)
        proxy = FaultProxy(az.port)
    except BaseException:
        az.stop()
        raise
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLOB2GPU_", "AZURE_"))}
    env["AZURE_STORAGE_CONNECTION_STRING"] = az.connection_string(port=proxy.port)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return az, proxy, env, checkpoint


def main() -> int:
    parser, args = parse_args()
    if args.child:
        return child(json.loads(args.child))

    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    if args.per_node < 1 or args.nodes % args.per_node:
        parser.error("--nodes must be a positive multiple of --per-node")
    cap = 0.0 if args.no_cap else args.rate_cap
    if args.egress_mbps < 0 or args.egress_burst_mb < 0:
        parser.error("--egress-mbps and --egress-burst-mb must not be negative")
    egress = (args.egress_mbps * 1e6 / 8, int(args.egress_burst_mb * 1e6))
    settings: dict[str, Any] = {"chunk_bytes": int(args.chunk_mb * MiB)}
    if args.prefetch_concurrency is not None:
        settings["prefetch_concurrency"] = args.prefetch_concurrency
    if args.retry_max_attempts is not None:
        settings["retry_max_attempts"] = args.retry_max_attempts

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="blob2gpu-fleet-"))
    try:
        az, proxy, env, checkpoint = serve(work, args)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        print(
            f"fleet: {args.nodes} processes ({args.nodes // args.per_node} nodes of "
            f"{args.per_node}), checkpoint {checkpoint[0] / 1e6:.0f} MB in {args.shards} shards, "
            f"{args.chunk_mb:g} MiB ranges, cap "
            f"{'off' if not cap else f'{cap:g} requests/s'}, egress cap "
            f"{f'{args.egress_mbps:g} Mb/s' if args.egress_mbps else 'off'}, settings {settings}, "
            f"{os.cpu_count()} cores shared by Azurite, the proxy and the loaders",
            flush=True,
        )
        waves: list[Wave] = []
        for mode in modes:
            numbers, configs = wave_configs(mode, args, settings, work)
            for wave in numbers:
                copies = copies_needed(mode, wave, args)
                waves.append(
                    run_wave(
                        mode,
                        wave,
                        configs,
                        env,
                        proxy,
                        cap,
                        checkpoint,
                        args.timeout,
                        egress,
                        copies,
                    )
                )
            print(f"  {mode}: done at {time.perf_counter() - t_start:.0f} s", flush=True)
        print()
        print_table(waves)
        print(
            "\ncopies: bytes of ranged GETs served / checkpoint bytes (shards + index); p95 is "
            "the nearest rank; cold start runs from the common release to the last tensor in "
            "memory (imports and a warm-up load before it, gloo rendezvous included)."
        )
        print(f"whole run: {time.perf_counter() - t_start:.0f} s")
        if args.json:
            write_run_json(
                args.json,
                args,
                checkpoint_bytes=checkpoint[0],
                waves=[{**asdict(w), "row": w.row()} for w in waves],
            )
        return 0
    finally:
        proxy.stop()
        az.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
