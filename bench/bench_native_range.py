#!/usr/bin/env python3
"""The native range reader (blob2gpu._core.RangeClient) against the Python feeder's path and curl:
one large blob read into one preallocated buffer by `--concurrency` ranged GETs at a time, in an
idle process and with one busy Python thread, from three servers (`--schemes`):

    http, https     an in-memory Azurite (the tests' emulator; HTTPS with a private CA)
    fast-http,      harness/range_server.py: the kernel sends the bodies (sendfile), or OpenSSL
    fast-https      encrypts each range in one call; far past Azurite's ceiling, so the
                    clients' own costs show

Usage:
    python bench/bench_native_range.py [--size-mib 1024] [--range-mib 32] [--concurrency 8]
                                       [--schemes http,https,fast-http,fast-https]
                                       [--only native,python-feeder,curl] [--json out.json]

Contestants, each in a fresh interpreter, each reading every byte of the blob (`--range-mib`
ranges, `--concurrency` in flight):

    native          Python threads sign each GET (Shared Key, native_requests.py) and call
                    RangeClient.get_into(): connection, TLS and body in C++, without the GIL,
                    straight into the buffer
    python-feeder   the load path's reader with native_http off: BlobRangeReader.read_into()
                    (azure-storage-blob's pipeline, urllib3, http.client readinto() into the
                    buffer, one GIL round trip per socket read)
    curl            one curl process, --parallel, the same ranges to /dev/null with a SAS: the
                    ceiling bench_blob_load.py uses (its CPU is the curl process's)

Each is timed from making its client to the last byte (its modules imported before). Each runs
idle, then with a Python thread spinning (`while True: x += 1`) beside the reads: the
native reader should not slow down; the Python path waits for the GIL on every read. The buffer
is allocated and touched before the clock starts (page faults are not counted), the bytes are
checked with CRC32C after it stops. CPU s/GB is the reading process's CPU (curl's for curl) less
the busy thread's own; Azurite's CPU is not counted. GIL returns/GB counts, in an untimed second
read of the first ranges, how often the reading threads come back from a blocking C call (each
time taking the GIL again): a socket or TLS read for the Python path, one get_into() per range
for the native reader; it does not depend on the machine's load as times do. On this 2-core
machine the busy thread also takes a core from the server and the readers: compare rows of one
run, not runs of two machines.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import GB, MiB
from harness.busy import BusyThread
from harness.isolation import (
    Unavailable,
    emit,
    emit_unavailable,
    run_in_fresh_process,
    worker_command,
)

CONTAINER = "bench-native"
BLOB = "one/large.bin"
CONTESTANTS = ("native", "python-feeder", "curl")


# -- the worker: one contestant, one read of the whole blob ----------------------------------------
def ranges(size: int, range_bytes: int) -> list[tuple[int, int]]:
    return [(a, min(size, a + range_bytes)) for a in range(0, size, range_bytes)]


def run_threads(count: int, work: list[tuple[int, int]], read: Any) -> None:
    """`count` threads take ranges from `work` and call read(start, end); the first error is
    raised once every thread stopped."""
    todo: queue.Queue[tuple[int, int]] = queue.Queue()
    for item in work:
        todo.put(item)
    errors: list[BaseException] = []

    def worker() -> None:
        while not errors:
            try:
                start, end = todo.get_nowait()
            except queue.Empty:
                return
            try:
                read(start, end)
            except BaseException as e:
                errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def read_native(args: argparse.Namespace, view: memoryview) -> dict[str, Any]:
    from blob2gpu import _core
    from blob2gpu.sources.azure.location import parse_blob_uri
    from blob2gpu.sources.azure.native_requests import RequestSigner, range_endpoint
    from harness.azurite import ACCOUNT, ACCOUNT_KEY

    location = parse_blob_uri(f"{args.endpoint}/{CONTAINER}/{BLOB}")
    endpoint = range_endpoint(location)
    client = _core.RangeClient(**endpoint.client_options(), pool_size=args.concurrency)
    key = {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY}
    signer = RequestSigner(location, key, endpoint.base_path)

    def read(start: int, end: int) -> None:
        target, headers = signer.range_get(BLOB, start, end, args.etag)
        result = client.get_into(target, headers, view[start:end], first_byte=start)
        with NATIVE_CALLS_LOCK:
            NATIVE_CALLS[0] += 1
        if not result.ok:
            raise RuntimeError(f"{result.failure.name} HTTP {result.status}: {result.detail}")

    run_threads(args.concurrency, ranges(args.read_size, args.range_bytes), read)
    return {"connections": client.connections_opened, "tls": client.tls_library}


def read_python_feeder(args: argparse.Namespace, view: memoryview) -> dict[str, Any]:
    from blob2gpu import settings
    from blob2gpu.sources.azure.container import open_container
    from blob2gpu.sources.azure.range_reader import BlobRangeReader
    from blob2gpu.sources.plan import ShardRef
    from harness.azurite import ACCOUNT, ACCOUNT_KEY

    # The SDK's path (native_http off): the Python feeder's reads, as loads made them before.
    resolved = settings.resolve({"prefetch_concurrency": args.concurrency, "native_http": False})
    key = {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY}
    container = open_container(f"{args.endpoint}/{CONTAINER}/{BLOB}", resolved, key)
    reader = BlobRangeReader(container)
    ref = ShardRef(BLOB, BLOB, args.size, args.etag)
    run_threads(
        args.concurrency,
        ranges(args.read_size, args.range_bytes),
        lambda start, end: reader.read_into(ref, start, view[start:end]),
    )
    container.close()
    return {"requests": reader.requests}


def read_curl(args: argparse.Namespace) -> dict[str, Any]:
    import shutil

    curl = shutil.which("curl")
    if curl is None:
        raise Unavailable("curl not found")
    lines = []
    for j, (a, b) in enumerate(ranges(args.size, args.range_bytes)):
        lines += ["next"] if j else []
        lines += [
            f'url = "{args.endpoint}/{CONTAINER}/{BLOB}?{args.sas}"',
            f'header = "x-ms-range: bytes={a}-{b - 1}"',
            'header = "x-ms-version: 2021-08-06"',
            *([f'cacert = "{args.ca}"'] if args.ca else []),
            'output = "/dev/null"',
            'write-out = "%{http_code} %{size_download}\\n"',
        ]
    with tempfile.NamedTemporaryFile("w", suffix=".curl", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        out = subprocess.run(
            [curl, "-sS", "--parallel", "--parallel-max", str(args.concurrency), "-K", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    finally:
        os.unlink(f.name)
    got = sum(int(n) for n in out[1::2])
    if set(out[0::2]) != {"206"} or got != args.size:
        raise RuntimeError(f"curl: statuses {set(out[0::2])}, {got} of {args.size} bytes")
    return {
        "curl": subprocess.run([curl, "--version"], capture_output=True, text=True).stdout.split()[
            1
        ]
    }


# What each contestant imports, imported before the clock starts: the timing is the reading,
# from making the client to the last byte, not the interpreter loading modules.
IMPORTS = {
    "native": ["blob2gpu.sources.azure.native_requests", "harness.azurite"],
    "python-feeder": [
        "blob2gpu.sources.azure.container",
        "blob2gpu.sources.azure.range_reader",
        "azure.storage.blob",
        "azure.storage.blob._generated.models",
        "azure.core.pipeline.transport",
        "requests",
        "harness.azurite",
    ],
    "curl": [],
}


# The blocking C calls a reader thread makes and returns from: each releases the GIL and takes it
# back (socket recv_into over HTTP, the ssl module's read over HTTPS; counted by a profile hook)
# and RangeClient.get_into (a pybind11 method, which profile hooks do not see: counted by
# read_native).
BLOCKING_CALLS = {"recv_into", "read"}
NATIVE_CALLS = [0]
NATIVE_CALLS_LOCK = threading.Lock()


def returns_per_gb(args: argparse.Namespace, view: memoryview) -> float:
    """Untimed: read the first 8 ranges again, counting the reader threads' returns from
    blocking C calls (the GIL taken back each time), per GB read."""
    count = 0
    lock = threading.Lock()

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event == "c_return" and getattr(arg, "__name__", "") in BLOCKING_CALLS:
            owner = type(getattr(arg, "__self__", None)).__name__
            if owner in ("socket", "_SSLSocket"):
                with lock:
                    count += 1

    part = argparse.Namespace(**vars(args))
    part.read_size = min(args.size, 8 * args.range_bytes)  # the blob is still args.size
    if args.worker == "native":
        NATIVE_CALLS[0] = 0
        read_native(part, view)
        return NATIVE_CALLS[0] / (part.read_size / GB)
    threading.setprofile(profile)
    try:
        read_python_feeder(part, view)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    return count / (part.read_size / GB)


def run_worker(args: argparse.Namespace) -> int:
    import importlib

    import numpy as np
    from blob2gpu import _core

    for module in IMPORTS[args.worker]:
        importlib.import_module(module)
    try:
        buffer = np.empty(args.size, dtype=np.uint8)
        buffer.fill(0x5A)  # every page made resident now: no page faults in the timing
        view = memoryview(buffer).cast("B")
        busy = BusyThread() if args.busy else contextlib.nullcontext()
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        with busy:
            cpu0, t0 = time.process_time(), time.perf_counter()
            if args.worker == "native":
                extra = read_native(args, view)
            elif args.worker == "python-feeder":
                extra = read_python_feeder(args, view)
            else:
                extra = read_curl(args)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    except Unavailable as e:
        return emit_unavailable(e)
    returns = 0.0 if args.worker == "curl" or args.busy else returns_per_gb(args, view)
    busy_cpu = busy.cpu_s() if isinstance(busy, BusyThread) else 0.0
    if args.worker == "curl":
        cpu = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
        busy_cpu = 0.0  # the busy thread's CPU is this process's, curl's is its own
    else:
        crc = _core.crc32c(view)
        if crc != args.crc:
            emit({"status": "wrong", "reason": f"CRC32C {crc:08x}, expected {args.crc:08x}"})
            return 1
    emit(
        {
            "status": "ok",
            "wall_s": wall,
            "cpu_s": max(0.0, cpu - busy_cpu),
            "busy_loops": busy.loops if isinstance(busy, BusyThread) else 0,
            "gil_returns_per_gb": returns,
            **extra,
        }
    )
    return 0


# -- the parent: Azurite, the blob, the runs, the table ------------------------------------------
def publish(server: Any, size: int) -> tuple[str, int]:
    """Upload the blob (random bytes); returns its etag and CRC32C."""
    import numpy as np
    from blob2gpu import _core

    data = np.random.default_rng(20240611).integers(0, 256, size=size, dtype=np.uint8)
    client = server.service().get_container_client(CONTAINER)
    if not client.exists():
        client.create_container()
    blob = client.get_blob_client(BLOB)
    etag = blob.upload_blob(
        io.BytesIO(data.tobytes()), length=size, overwrite=True, max_concurrency=4
    )["etag"]
    return etag, _core.crc32c(memoryview(data))


@contextlib.contextmanager
def serving(scheme: str, size: int) -> Iterator[tuple[str, str, int, str, str]]:
    """The blob served over `scheme` (http, https: Azurite; fast-http, fast-https:
    harness/range_server.py, far past Azurite's ceiling): (endpoint, etag, CRC32C, a read SAS,
    CA bundle)."""
    if scheme in ("fast-http", "fast-https"):
        import numpy as np
        from blob2gpu import _core
        from harness.range_server import ETAG

        data = np.random.default_rng(20240611).integers(0, 256, size=size, dtype=np.uint8)
        tls: list[str] = []
        ca = ""
        if scheme == "fast-https":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from support.tls import self_signed_certificate  # type: ignore[import-not-found]

            cert, key = self_signed_certificate(Path(tempfile.mkdtemp(prefix="bench-native-")))
            tls, ca = [str(cert), str(key)], str(cert)
            os.environ["REQUESTS_CA_BUNDLE"] = ca
        with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="bench-native-") as f:
            f.write(memoryview(data))
            f.flush()
            script = Path(__file__).parent / "harness" / "range_server.py"
            server = subprocess.Popen(
                [sys.executable, str(script), f.name, *tls], stdout=subprocess.PIPE, text=True
            )
            try:
                assert server.stdout is not None
                port = int(server.stdout.readline().split()[1])
                endpoint = f"{scheme.removeprefix('fast-')}://127.0.0.1:{port}/devstoreaccount1"
                yield endpoint, ETAG, _core.crc32c(data), "sv=x", ca
            finally:
                server.kill()
                server.wait()
                os.environ.pop("REQUESTS_CA_BUNDLE", None)
        return
    from harness import azurite

    tls_dir = Path(tempfile.mkdtemp(prefix="bench-native-tls-")) if scheme == "https" else None
    server, ca = azurite.start(tls_dir)
    try:
        t0 = time.perf_counter()
        etag, crc = publish(server, size)
        print(
            f"{scheme}: uploaded {size // MiB} MiB in {time.perf_counter() - t0:.0f} s", flush=True
        )
        yield server.endpoint(), etag, crc, azurite.container_sas(CONTAINER), ca
    finally:
        server.stop()
        os.environ.pop("REQUESTS_CA_BUNDLE", None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--range-mib", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="runs of each row; medians shown")
    p.add_argument("--only", default=",".join(CONTESTANTS))
    p.add_argument("--schemes", default="http,https,fast-http,fast-https")
    p.add_argument("--json", type=Path)
    # worker arguments
    p.add_argument("--worker", choices=CONTESTANTS)
    p.add_argument("--endpoint")
    p.add_argument("--etag")
    p.add_argument("--sas", default="")
    p.add_argument("--ca", default="")
    p.add_argument("--crc", type=int, default=0)
    p.add_argument("--busy", action="store_true")
    args = p.parse_args(argv)
    args.size = args.size_mib * MiB
    args.read_size = args.size  # bytes read from the start of the blob
    args.range_bytes = args.range_mib * MiB
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    rows: list[dict[str, Any]] = []
    contestants = [c for c in args.only.split(",") if c]
    for scheme in args.schemes.split(","):
        with serving(scheme, args.size) as (endpoint, etag, crc, sas, ca):
            # Round-robin: a disturbance of the machine spreads over every row.
            for _, busy, name in itertools.product(range(args.repeats), (False, True), contestants):
                cmd = worker_command(
                    __file__,
                    name,
                    f"--size-mib={args.size_mib}",
                    f"--range-mib={args.range_mib}",
                    f"--concurrency={args.concurrency}",
                    f"--endpoint={endpoint}",
                    f"--etag={etag}",
                    f"--sas={sas}",
                    f"--ca={ca}",
                    f"--crc={crc}",
                    *(["--busy"] if busy else []),
                )
                result, stderr = run_in_fresh_process(cmd, timeout_s=900)
                row = {"scheme": scheme, "contestant": name, "busy": busy, **result}
                rows.append(row)
                print(describe(row), flush=True)
                if result.get("status") != "ok" and stderr:
                    print("   " + "\n   ".join(stderr[-5:]))
    print_table(rows, args.size)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def describe(row: dict[str, Any]) -> str:
    what = f"{row['scheme']:5} {row['contestant']:14} {'busy' if row['busy'] else 'idle'}"
    if row.get("status") != "ok":
        return f"{what}  {row.get('status')}: {row.get('reason')}"
    return f"{what}  {row['wall_s']:6.2f} s  CPU {row['cpu_s']:6.2f} s"


def print_table(rows: list[dict[str, Any]], size: int) -> None:
    gb = size / GB
    print()
    print(
        f"{'scheme':10} {'contestant':14} {'idle GB/s':>9} {'CPU s/GB':>8}   "
        f"{'busy GB/s':>9} {'CPU s/GB':>8}   {'busy/idle time':>14}   {'GIL returns/GB':>14}"
    )
    runs: dict[tuple[str, str, bool], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            runs.setdefault((r["scheme"], r["contestant"], r["busy"]), []).append(r)
    index = {
        key: {
            "status": "ok",
            **{f: statistics.median(r[f] for r in rs) for f in ("wall_s", "cpu_s")},
            "gil_returns_per_gb": rs[0].get("gil_returns_per_gb"),
        }
        for key, rs in runs.items()
    }
    for scheme, name in dict.fromkeys((r["scheme"], r["contestant"]) for r in rows):
        idle, busy = index.get((scheme, name, False)), index.get((scheme, name, True))

        def cells(r: dict[str, Any] | None) -> str:
            if not r or r.get("status") != "ok":
                return f"{'-':>9} {'-':>8}"
            return f"{gb / r['wall_s']:9.3f} {r['cpu_s'] / gb:8.2f}"

        ratio = (
            f"{busy['wall_s'] / idle['wall_s']:13.2f}x"
            if idle and busy and idle.get("status") == busy.get("status") == "ok"
            else f"{'-':>14}"
        )
        returns = idle.get("gil_returns_per_gb") if idle and name != "curl" else None
        gil = f"{returns:14,.0f}" if returns is not None else f"{'-':>14}"
        print(f"{scheme:10} {name:14} {cells(idle)}   {cells(busy)}   {ratio}   {gil}")


if __name__ == "__main__":
    sys.exit(main())
