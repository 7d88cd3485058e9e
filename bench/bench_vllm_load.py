"""vLLM's weight loading, per load format, for the same checkpoint: the engine's `load_weights`
time (its model already built) with vLLM's default loader (local files), `runai_streamer` (local
files; from Azurite when its Azure backend can reach the emulator) and `blob2gpu` (local files,
and from Azurite), as ratios.

    <vLLM env>/bin/python bench/bench_vllm_load.py [--total-mb 300] [--repeats 2] [--json out.json]

Needs vLLM (scripts/test_vllm.sh makes the environment; its CPU build loads to the CPU, and on a
machine with vLLM's CUDA build the same run loads to the GPU). The checkpoint is a transformers
Llama with random bf16 weights (blob2gpu.tools.demo.write_demo_llama), written once under
bench/.data/. Each contestant runs in a fresh interpreter with vLLM's engine in that process (no
engine or worker processes: the loader's code path is the same, and its time is measured around
BaseModelLoader.load_weights). The page cache is warmed before local-file rows (a node's second
start); Blob rows read through Azurite on loopback.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

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

# name -> (load format, source): 'local' is the model directory, 'blob' the Azurite copy
CONTESTANTS = {
    "default-local": ("auto", "local"),
    "runai-local": ("runai_streamer", "local"),
    "runai-blob": ("runai_streamer", "blob"),
    "blob2gpu-local": ("blob2gpu", "local"),
    "blob2gpu-blob": ("blob2gpu", "blob"),
}
CONTAINER = "vllmbench"


def model_directory(total_mb: int) -> Path:
    """The benchmark's Llama (cached under bench/.data/)."""
    directory = DATA_DIR / f"vllm-llama-{total_mb}mb"
    if not (directory / "model.safetensors.index.json").exists():
        from blob2gpu.tools.demo import write_demo_llama

        write_demo_llama(directory, total_mb)
    return directory


def worker(name: str, model: str, blob_uri: str) -> int:
    """Start an in-process engine with the contestant's load format; emit load_weights' time."""
    load_format, source = CONTESTANTS[name]
    try:
        import_or_unavailable("vllm")
        if load_format == "runai_streamer":
            import_or_unavailable("runai_model_streamer", "runai-model-streamer")
            if source == "blob":
                # Not tried yet: whether runai's Azure backend can be pointed at Azurite.
                raise Unavailable("runai_streamer from Azurite: endpoint override not wired yet")
    except Unavailable as exc:
        return emit_unavailable(exc)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    timings: list[float] = []
    original = BaseModelLoader.load_model

    def load_model(loader: Any, *args: Any, **kwargs: Any) -> Any:
        # Times the loader's load_weights: building the model and post-processing are not loading.
        inner = type(loader).load_weights

        def timed(model: Any, model_config: Any) -> None:
            start = time.perf_counter()
            inner(loader, model, model_config)
            timings.append(time.perf_counter() - start)

        loader.load_weights = timed
        return original(loader, *args, **kwargs)

    BaseModelLoader.load_model = load_model  # type: ignore[method-assign]
    extra = {"source": blob_uri} if load_format == "blob2gpu" and source == "blob" else {}
    if source == "local":
        warm_page_cache(str(p) for p in Path(model).glob("*.safetensors"))
    llm = LLM(
        model=model,
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
    weight_bytes = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
    emit({"status": "ok", "load_s": timings[-1], "bytes": weight_bytes})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-mb", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=list(CONTESTANTS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--blob-uri", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.blob_uri)

    from harness.azurite import start

    model = model_directory(args.total_mb)
    size_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e6
    print(f"checkpoint: {model} ({size_mb:.0f} MB of bf16 weights)")
    azurite, _ = start()
    try:
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string()
        from blob2gpu.integrity.publish import publish

        azurite.service().create_container(CONTAINER)
        t0 = time.perf_counter()
        publish(model, f"az://{CONTAINER}/llama")
        print(f"published to Azurite in {time.perf_counter() - t0:.1f} s")
        results: dict[str, dict[str, Any]] = {}
        names = args.only or list(CONTESTANTS)
        for _ in range(args.repeats):  # round robin: a disturbance hits every contestant alike
            for name in names:
                cmd = worker_command(
                    __file__, name, "--model", str(model), "--blob-uri", f"az://{CONTAINER}/llama"
                )
                result, _ = run_in_fresh_process(cmd, timeout_s=900)
                row = results.setdefault(name, {"runs": [], "status": result["status"]})
                row["status"] = result["status"]
                if result["status"] == "ok":
                    row["runs"].append(result["load_s"])
                else:
                    row["reason"] = result.get("reason", "")
                print(f"  {name}: {result['status']} {result.get('load_s', result.get('reason'))}")
    finally:
        azurite.stop()

    medians = {n: statistics.median(r["runs"]) for n, r in results.items() if r["runs"]}
    default = medians.get("default-local")
    rows = []
    for name, row in results.items():
        seconds = medians.get(name)
        rows.append(
            {
                "contestant": name,
                "load_weights s (median)": f"{seconds:.2f}" if seconds else row.get("reason", ""),
                "GB/s": f"{size_mb / 1e3 / seconds:.2f}" if seconds else "",
                "x default": f"{default / seconds:.2f}" if seconds and default else "",
            }
        )
    print()
    print_markdown(rows)
    b2g_local, b2g_blob = medians.get("blob2gpu-local"), medians.get("blob2gpu-blob")
    goals = [
        ("blob2gpu local >= 1.0x default", ratio(default, b2g_local), 1.0),
        ("blob2gpu local >= 2x runai_streamer", ratio(medians.get("runai-local"), b2g_local), 2.0),
        ("blob2gpu Blob within 1.5x of its local", ratio(b2g_local, b2g_blob), 1 / 1.5),
    ]
    print()
    for what, value, target in goals:
        shown = f"{value:.2f}" if value is not None else "n/a"
        print(f"{what}: {shown} -> {verdict(None if value is None else value >= target)}")
    if args.json:
        write_run_json(args.json, args, results=results, medians=medians)
    return 0


if __name__ == "__main__":
    sys.exit(main())
