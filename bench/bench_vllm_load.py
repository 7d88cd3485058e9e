"""vLLM's weight loading, per load format, for the same checkpoint: the engine's `load_weights`
time (its model already built) with vLLM's default loader (local files), `runai_streamer` (local
files, and from Azurite over HTTPS) and `blob2gpu` (local files, and from Azurite over HTTP and
HTTPS), as ratios; and, outside vLLM, what the emulator itself serves here (the ceiling: plain
ranged GETs to /dev/null) and what blob2gpu fetches from it alone, so that the Blob rows read as
fractions of the emulator's ceiling on this machine.

    <vLLM env>/bin/python bench/bench_vllm_load.py [--total-mb 300] [--repeats 2] [--only ...]
        [--wait-idle 30] [--timeout 900] [--json out.json]

Needs vLLM (scripts/test_vllm.sh makes the environment; its CPU build loads to the CPU, and on a
machine with vLLM's CUDA build the same run loads to the GPU). The checkpoint is a transformers
Llama with random bf16 weights (blob2gpu.tools.demo.write_demo_llama), written once under
bench/.data/. Each contestant runs in a fresh interpreter with vLLM's engine in that process (no
engine or worker processes: the loader's code path is the same, and its time is measured around
BaseModelLoader.load_weights). The page cache is warmed before local-file rows (a node's second
start); Blob rows read through Azurite on loopback: `blob` is an HTTP Azurite (as blob2gpu's
tests), `tls` a second one over HTTPS on the production-style host devstoreaccount1.blob.localhost,
because runai-model-streamer's native Azure client only builds https://<account>.<suffix> URLs and
trusts only its compiled-in CA file: its worker runs in a private mount namespace (unshare -m, root)
where that file also holds the emulator's self-signed certificate (see runai_blob_wrapper). With
local rows only (bench/vllm_check.sh on a GPU host) no emulator is started.
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

from blob2gpu.settings import BY_NAME as SETTINGS_BY_NAME
from harness import DATA_DIR
from harness.checkpoints import warm_page_cache
from harness.isolation import (
    Unavailable,
    emit,
    emit_unavailable,
    import_or_unavailable,
    run_in_fresh_process,
    worker_command,
)
from harness.tables import print_markdown, ratio, verdict, write_run_json

# name -> (load format, source): 'local' is the model directory, 'blob' the HTTP Azurite's copy,
# 'tls' the HTTPS Azurite's. The two formats that are not vLLM's run outside vLLM:
# 'ceiling' is curl's ranged GETs to /dev/null ('ceiling-shm': into fresh RAM, files in /dev/shm,
# as a cpu-target load must land them), 'fetch' is blob2gpu streaming to CPU tensors.
CONTESTANTS = {
    "ceiling": ("ceiling", "blob"),
    "ceiling-shm": ("ceiling-shm", "blob"),
    "ceiling-tls": ("ceiling", "tls"),
    "blob2gpu-fetch-blob": ("fetch", "blob"),
    "default-local": ("auto", "local"),
    "runai-local": ("runai_streamer", "local"),
    "runai-blob": ("runai_streamer", "tls"),
    "blob2gpu-local": ("blob2gpu", "local"),
    "blob2gpu-blob": ("blob2gpu", "blob"),
    "blob2gpu-blob-tls": ("blob2gpu", "tls"),
}
OUTSIDE_VLLM = ("ceiling", "ceiling-shm", "fetch")
CEILING_OF = {"blob": "ceiling", "tls": "ceiling-tls"}  # a Blob row's ceiling: same server
CONTAINER = "vllmbench"
PREFIX = "llama"
# Azurite takes the account from the first label of a host that is not an IP (its production-style
# URLs), and libcurl resolves any *.localhost name to loopback itself.
TLS_HOST_SUFFIX = "blob.localhost"
TLS_HOST = f"devstoreaccount1.{TLS_HOST_SUFFIX}"
# The CA file compiled into runai-model-streamer-azure's libcurl (libstreamerazure.so).
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
CEILING_PARALLEL = SETTINGS_BY_NAME["prefetch_concurrency"].default  # blob2gpu's default
CEILING_RANGE_BYTES = SETTINGS_BY_NAME["staging_slot_bytes"].default  # its chunk_bytes default


def model_directory(total_mb: int) -> Path:
    """The benchmark's Llama (cached under bench/.data/)."""
    directory = DATA_DIR / f"vllm-llama-{total_mb}mb"
    if not (directory / "model.safetensors.index.json").exists():
        from blob2gpu.tools.demo import write_demo_llama

        write_demo_llama(directory, total_mb)
    return directory


def weight_files(model: str) -> dict[str, int]:
    """The checkpoint's shard files and their sizes."""
    return {p.name: p.stat().st_size for p in sorted(Path(model).glob("*.safetensors"))}


def ceiling_worker(model: str, to_shm: bool) -> int:
    """The emulator's ceiling: CEILING_PARALLEL curl processes, each fetching its share of the
    shards' CEILING_RANGE_BYTES ranges on one keep-alive connection to /dev/null, or with `to_shm`
    to files in /dev/shm (bench_blob_load's `ceiling` and `ceiling-shm`, at blob2gpu's default
    concurrency and range size)."""
    from bench_blob_load import Target, make_ceiling
    from harness.azurite import container_sas

    files = weight_files(model)
    target = Target(
        connection_string=os.environ["AZURE_STORAGE_CONNECTION_STRING"],
        endpoint=os.environ["BENCH_BLOB_ENDPOINT"],
        container=CONTAINER,
        prefix=PREFIX,
        sas=container_sas(CONTAINER),
        files=files,
        ca_bundle=os.environ.get("REQUESTS_CA_BUNDLE", ""),
    )
    try:
        contestant = make_ceiling(target, CEILING_PARALLEL, CEILING_RANGE_BYTES, to_shm)
    except Unavailable as exc:
        return emit_unavailable(exc)
    start = time.perf_counter()
    _, extra = contestant.load()
    seconds = time.perf_counter() - start
    contestant.after_load()
    if extra["errors"] or extra["bytes"] != extra["expected_bytes"]:
        emit({"status": "failed", "reason": f"ceiling: {extra}"})
        return 1
    emit({"status": "ok", "load_s": seconds, "bytes": extra["bytes"], **contestant.versions})
    return 0


def fetch_worker(blob_uri: str) -> int:
    """blob2gpu alone, no vLLM: stream the checkpoint from Blob to CPU tensors and drop each one
    (what the load format does, less the model's copies into its parameters)."""
    import blob2gpu
    import torch  # noqa: F401  (imported untimed, as in a serving process)

    start = time.perf_counter()
    count = 0
    with blob2gpu.open(blob_uri, device="cpu", framework="torch") as checkpoint:
        for _name, tensor in checkpoint.stream():
            count += tensor.numel() * tensor.element_size()
        report = checkpoint.report
    seconds = time.perf_counter() - start
    numbers = report_numbers(json.loads(report.to_json()))
    emit({"status": "ok", "load_s": seconds, "bytes": count, "report": numbers})
    return 0


def report_numbers(data: dict[str, Any]) -> dict[str, Any]:
    """The LoadReport numbers (of its JSON) that say where a Blob load's time went."""
    keep = (
        "seconds",
        "throughput_gbps",
        "requests",
        "retries",
        "host_populate_seconds",
        "verification",
        "concurrency_settled",
        "range_bytes_settled",
        "phases",
    )
    return {k: data[k] for k in keep if k in data}


def worker(name: str, model: str, blob_uri: str) -> int:
    """Start an in-process engine with the contestant's load format; emit load_weights' time."""
    load_format, source = CONTESTANTS[name]
    if load_format in ("ceiling", "ceiling-shm"):
        return ceiling_worker(model, load_format == "ceiling-shm")
    if load_format == "fetch":
        return fetch_worker(blob_uri)
    try:
        import_or_unavailable("vllm")
        if load_format == "runai_streamer":
            import_or_unavailable("runai_model_streamer", "runai-model-streamer")
            if source == "tls":
                import_or_unavailable("runai_model_streamer_azure", "runai-model-streamer-azure")
    except Unavailable as exc:
        return emit_unavailable(exc)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from vllm import LLM
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    timings: list[float] = []
    affinity: list[int] = []
    original = BaseModelLoader.load_model

    def load_model(loader: Any, *args: Any, **kwargs: Any) -> Any:
        # Times the loader's load_weights: building the model and post-processing are not loading.
        inner = type(loader).load_weights

        def timed(model: Any, model_config: Any) -> None:
            # The CPUs the loading thread may run on (vLLM's CPU build binds its OpenMP threads,
            # and threads a loader starts inherit the binding of the thread that starts them).
            affinity.extend(sorted(os.sched_getaffinity(0)))
            start = time.perf_counter()
            inner(loader, model, model_config)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # copies still queued on the GPU are part of the load
            timings.append(time.perf_counter() - start)

        loader.load_weights = timed
        return original(loader, *args, **kwargs)

    BaseModelLoader.load_model = load_model  # type: ignore[method-assign]
    extra: dict[str, Any] = {}
    report_file = Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "report.json"
    if load_format == "blob2gpu":
        extra["report_path"] = str(report_file)
        if source != "local":
            extra["source"] = blob_uri
    if source == "local":
        warm_page_cache(str(p) for p in Path(model).glob("*.safetensors"))
    # runai_streamer takes the Blob copy as the model itself (az://...): vLLM pulls its config
    # files through runai's Python side, and the weights stream through its native client.
    engine_model = blob_uri if load_format == "runai_streamer" and source != "local" else model
    try:
        llm = LLM(
            model=engine_model,
            load_format=load_format,
            model_loader_extra_config=extra,
            skip_tokenizer_init=True,
            enforce_eager=True,
            dtype="bfloat16",
            max_model_len=128,
            max_num_seqs=1,
            distributed_executor_backend="uni",
        )
        del llm
        report = json.loads(report_file.read_text()) if report_file.exists() else None
    finally:
        shutil.rmtree(report_file.parent, ignore_errors=True)
    weight_bytes = sum(weight_files(model).values())
    result: dict[str, Any] = {
        "status": "ok",
        "load_s": timings[-1],
        "bytes": weight_bytes,
        "cpus": affinity,
        "machine_cpus": os.cpu_count(),
    }
    if report is not None:
        result["report"] = report_numbers(report)
    emit(result)
    return 0


def runai_blob_wrapper(ca_bundle: str, workdir: Path) -> tuple[list[str], str]:
    """(command prefix, '') that runs a worker where runai-model-streamer's native Azure client
    trusts the HTTPS emulator, or ([], why not).

    libstreamerazure.so (runai-model-streamer-azure 0.17.0) reads AZURE_STORAGE_ACCOUNT_NAME,
    AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN and AZURE_STORAGE_ENDPOINT_SUFFIX, and
    builds "https://" + account + "." + suffix (its azure/client/client.cc); its connection-string
    branch (AZURE_STORAGE_CONNECTION_STRING) is compiled only into its AZURITE_TESTING builds, not
    the released wheel. Its statically linked libcurl verifies TLS against SYSTEM_CA_FILE and
    ignores SSL_CERT_FILE. So the worker runs in a private mount namespace where SYSTEM_CA_FILE is
    the system's bundle plus the emulator's certificate: nothing outside that process tree sees
    the change."""
    unshare = shutil.which("unshare")
    if unshare is None or not Path(SYSTEM_CA_FILE).is_file():
        return [], f"needs unshare(1) and {SYSTEM_CA_FILE} to trust the emulator's certificate"
    bundle = workdir / "ca-bundle.pem"
    bundle.write_bytes(Path(SYSTEM_CA_FILE).read_bytes() + Path(ca_bundle).read_bytes())
    prefix = [unshare, "-m", "--propagation", "private", "sh", "-c"]
    script = f'mount --bind "$0" {SYSTEM_CA_FILE} && exec "$@"'
    probe = subprocess.run([*prefix, script, str(bundle), "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return [], f"a private mount namespace is refused here ({why}): needs root"
    return [*prefix, script, str(bundle)], ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-mb", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=list(CONTESTANTS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per worker process")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=30,
        help="before each process, wait up to this many seconds for the machine to go idle",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--blob-uri", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.blob_uri)

    model = model_directory(args.total_mb)
    size_mb = sum(weight_files(str(model)).values()) / 1e6
    print(f"checkpoint: {model} ({size_mb:.0f} MB of bf16 weights)")
    names = args.only or list(CONTESTANTS)
    workdir = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    sources = {CONTESTANTS[n][1] for n in names}
    # Local rows only (gpu_check.sh on a host without Azurite): no emulator.
    servers = Servers(model, workdir, tls="tls" in sources) if sources - {"local"} else None
    try:
        results = run_rounds(names, model, servers, args)
    finally:
        if servers is not None:
            servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {n: statistics.median(r["runs"]) for n, r in results.items() if r["runs"]}
    print()
    print_markdown(table_rows(results, medians, size_mb))
    print()
    print_goals(medians)
    if args.json:
        write_run_json(args.json, args, results=results, medians=medians)
    return 0


class Servers:
    """The Azurites the Blob rows read from, each holding the checkpoint published with
    `blob2gpu publish`: HTTP always; HTTPS on TLS_HOST when a `tls` row runs."""

    def __init__(self, model: Path, workdir: Path, tls: bool) -> None:
        from harness.azurite import start

        self.http, _ = start()
        self.https = None
        self.env = {"blob": self._publish(self.http, model)}
        self.env["blob"]["BENCH_BLOB_ENDPOINT"] = self.http.endpoint()
        self.env["blob"].pop("REQUESTS_CA_BUNDLE", None)
        self.runai_wrapper: list[str] = []
        self.runai_unavailable = ""
        if tls:
            tls_dir = workdir / "tls"
            tls_dir.mkdir()
            self.https, ca_bundle = start(tls_dir, (TLS_HOST,))
            env = self._publish(self.https, model)
            env.update(
                BENCH_BLOB_ENDPOINT=self.https.endpoint(),
                REQUESTS_CA_BUNDLE=ca_bundle,
                # runai-model-streamer's native client (runai_blob_wrapper says why)
                AZURE_STORAGE_ACCOUNT_NAME="devstoreaccount1",
                AZURE_STORAGE_ACCOUNT_KEY=account_key(),
                AZURE_STORAGE_ENDPOINT_SUFFIX=f"{TLS_HOST_SUFFIX}:{self.https.port}",
            )
            self.env["tls"] = env
            self.runai_wrapper, self.runai_unavailable = runai_blob_wrapper(ca_bundle, workdir)

    @staticmethod
    def _publish(azurite: Any, model: Path) -> dict[str, str]:
        """Publishes the checkpoint to `azurite`; returns the environment that reaches it."""
        from blob2gpu.integrity.publish import publish

        env = dict(os.environ, AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string())
        saved = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = env["AZURE_STORAGE_CONNECTION_STRING"]
        try:
            t0 = time.perf_counter()
            publish(model, f"az://{CONTAINER}/{PREFIX}")
            print(f"published to {azurite.endpoint()} in {time.perf_counter() - t0:.1f} s")
        finally:
            if saved is None:
                del os.environ["AZURE_STORAGE_CONNECTION_STRING"]
            else:
                os.environ["AZURE_STORAGE_CONNECTION_STRING"] = saved
        return env

    def stop(self) -> None:
        self.http.stop()
        if self.https is not None:
            self.https.stop()


def account_key() -> str:
    from blob2gpu.tools.emulator import ACCOUNT_KEY

    return ACCOUNT_KEY


def run_rounds(
    names: list[str], model: Path, servers: Servers | None, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Each contestant args.repeats times, round robin (a disturbance hits every contestant
    alike), each process started once the machine is idle (or args.wait_idle passed: the busy
    share of the CPUs then is kept with the run)."""
    from harness.accounting import wait_for_idle

    results: dict[str, dict[str, Any]] = {}
    blob_uri = f"az://{CONTAINER}/{PREFIX}"
    for _ in range(args.repeats):
        for name in names:
            source = CONTESTANTS[name][1]
            row = results.setdefault(name, {"runs": [], "reports": [], "status": "unavailable"})
            env = None
            cmd = worker_command(__file__, name, "--model", str(model), "--blob-uri", blob_uri)
            if servers is not None:
                if name == "runai-blob" and servers.runai_unavailable:
                    row["reason"] = f"unavailable: {servers.runai_unavailable}"
                    continue
                if name == "runai-blob":
                    cmd = [*servers.runai_wrapper, *cmd]
                env = servers.env.get(source, servers.env["blob"])
            busy = wait_for_idle(args.wait_idle, 0.15)
            result, _ = run_in_fresh_process(cmd, timeout_s=args.timeout, env=env)
            # A row is ok when any repeat was; a failed repeat keeps its reason beside the runs.
            if row["status"] != "ok" or result["status"] == "ok":
                row["status"] = result["status"]
            if result["status"] == "ok":
                row["runs"].append(result["load_s"])
                row.setdefault("busy_before", []).append(round(busy, 2))
                if "report" in result:
                    row["reports"].append(result["report"])
                if "cpus" in result:
                    row["cpus"] = f"{result['cpus']} of {result['machine_cpus']}"
            else:
                row["reason"] = f"{result['status']}: {result.get('reason', '')}"
                row["stderr_tail"] = result.get("stderr_tail", [])
            print(f"  {name}: {result['status']} {result.get('load_s', result.get('reason'))}")
    return results


def table_rows(
    results: dict[str, dict[str, Any]], medians: dict[str, float], size_mb: float
) -> list[dict[str, str]]:
    """The table: median seconds, GB/s, x the default loader, x the ceiling of the emulator the
    row read from (HTTP or HTTPS)."""
    default = medians.get("default-local")
    rows = []
    for name, row in results.items():
        seconds = medians.get(name)
        ceiling = medians.get(CEILING_OF.get(CONTESTANTS[name][1], ""))
        in_vllm = CONTESTANTS[name][0] not in OUTSIDE_VLLM
        rows.append(
            {
                "contestant": name,
                "where": ("vLLM" if in_vllm else "outside vLLM")
                + (" (HTTPS)" if CONTESTANTS[name][1] == "tls" else ""),
                "s (median)": f"{seconds:.2f}" if seconds else row.get("reason", ""),
                "GB/s": f"{size_mb / 1e3 / seconds:.2f}" if seconds else "",
                "x default": f"{default / seconds:.2f}" if seconds and default and in_vllm else "",
                "x ceiling": f"{ceiling / seconds:.2f}" if seconds and ceiling else "",
            }
        )
    return rows


def print_goals(medians: dict[str, float]) -> None:
    """The issue's goals, and the Blob rows as fractions of the emulator's ceiling."""
    default = medians.get("default-local")
    b2g_local, b2g_blob = medians.get("blob2gpu-local"), medians.get("blob2gpu-blob")
    goals = [
        ("blob2gpu local >= 1.0x default", ratio(default, b2g_local), 1.0),
        ("blob2gpu local >= 2x runai_streamer", ratio(medians.get("runai-local"), b2g_local), 2.0),
        ("blob2gpu Blob within 1.5x of its local", ratio(b2g_local, b2g_blob), 1 / 1.5),
    ]
    for what, value, target in goals:
        shown = f"{value:.2f}" if value is not None else "n/a"
        print(f"{what}: {shown} -> {verdict(None if value is None else value >= target)}")
    blob_rows = ("ceiling-shm", "blob2gpu-fetch-blob", "blob2gpu-blob", "blob2gpu-blob-tls")
    for name in (*blob_rows, "runai-blob"):
        ceiling_name = CEILING_OF[CONTESTANTS[name][1]]
        ceiling = medians.get(ceiling_name)
        share = ratio(ceiling, medians.get(name))
        if ceiling is not None and share is not None:
            print(f"{name}: {share:.2f}x the emulator's ceiling ({ceiling_name} {ceiling:.2f} s)")
    if b2g_local is not None and medians.get("ceiling") is not None:
        bound = medians["ceiling"] / b2g_local
        print(
            f"the emulator's ceiling alone is {bound:.2f}x blob2gpu's local time "
            f"(the 1.5x goal needs a server that serves the checkpoint in {1.5 * b2g_local:.2f} s)"
        )
    versus = ratio(medians.get("runai-blob"), medians.get("blob2gpu-blob-tls"))
    if versus is not None:
        print(f"blob2gpu from Blob (HTTPS) vs runai_streamer from Blob (HTTPS): {versus:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
