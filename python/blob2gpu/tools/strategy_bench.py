"""`blob2gpu bench`: the case study's strategy comparison on the user's own checkpoint.

For each strategy, repeated loads are split into the case study's phases (fetch, host staging,
model load, first-token tail, cold start total); the table shows medians and the gain of each
strategy over the first one. Strategies:
  image-local    the checkpoint read from a local directory with `safetensors`, then copied to
                 the device (weights baked into the image or on local disk)
  host-staging   blob2gpu with model.direct_gpu_load=false (whole shards in host memory first)
  direct-gpu     blob2gpu's pinned ring straight into device memory (the default)
  runai          runai-model-streamer (when installed), from the local directory
  fastsafetensors fastsafetensors (when installed), from the local directory
The first-token tail is the first use of the weights on the device: a reduction over the largest
tensor, synchronized. Page caches are not dropped: say `--drop-caches` (root) for colder reads.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blob2gpu.errors import InvalidArgument

STRATEGIES = ("image-local", "host-staging", "direct-gpu", "runai", "fastsafetensors")
PHASE_COLUMNS = ("fetch_s", "stage_s", "load_s", "ttft_s", "cold_start_s")


@dataclass
class StrategyResult:
    strategy: str
    runs: list[dict[str, float]] = field(default_factory=list)
    unavailable: str | None = None

    def median(self, column: str) -> float | None:
        values = [r[column] for r in self.runs]
        return statistics.median(values) if values else None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def _first_use(tensors: dict[str, Any], device: str) -> None:
    import torch

    largest = max(
        (t for t in tensors.values() if isinstance(t, torch.Tensor)),
        key=lambda t: t.numel(),
        default=None,
    )
    if largest is not None and largest.numel():
        (largest.float() if largest.is_floating_point() else largest.long()).sum().item()
    _sync(device)


def _phases(fetch: float, staged: float, loaded: float, first: float) -> dict[str, float]:
    return {
        "fetch_s": fetch,
        "stage_s": staged - fetch,
        "load_s": loaded - staged,
        "ttft_s": first - loaded,
        "cold_start_s": first,
    }


def _run_blob2gpu(
    uri: str, device: str, direct: bool, settings: dict[str, Any]
) -> dict[str, float]:
    import blob2gpu

    # torch where it can hold the tensors; else what needs nothing more (a load's bytes and
    # phases are the same whatever hands its tensors out).
    try:
        import torch

        framework = "torch" if device == "cpu" or torch.cuda.is_available() else "dlpack"
    except ImportError:
        framework = "numpy" if device == "cpu" else "dlpack"
    with blob2gpu.open(
        uri, device=device, framework=framework, direct_gpu_load=direct, **settings
    ) as checkpoint:
        tensors = checkpoint.to_dict()
        report = checkpoint.report
    if framework == "torch":
        _first_use(tensors, device)
    first_use = report.elapsed()  # weights touched; no token is generated, none is reported
    p = {name: seconds or 0.0 for name, seconds in report.phases.items()}
    return _phases(
        p["artifact_fetch_complete"],
        p["host_staging_complete"],
        p["model_load_complete"],
        first_use,
    )


def _torch_has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _run_image_local(directory: Path, device: str) -> dict[str, float]:
    from safetensors.torch import load_file

    start = time.perf_counter()
    host: dict[str, Any] = {}
    for f in sorted(directory.glob("*.safetensors")):
        host.update(load_file(str(f)))
    staged = time.perf_counter() - start
    if device != "cpu" and _torch_has_cuda():
        tensors = {k: v.to(device, non_blocking=True) for k, v in host.items()}
        _sync(device)
    else:
        # safetensors maps the file lazily: the copy is what reads every byte, as a copy to the
        # device would.
        tensors = {k: v.clone() for k, v in host.items()}
    loaded = time.perf_counter() - start
    _first_use(tensors, device)
    first = time.perf_counter() - start
    return _phases(0.0, staged, loaded, first)


def _run_peer(name: str, directory: Path, device: str) -> dict[str, float]:
    files = [str(f) for f in sorted(directory.glob("*.safetensors"))]
    start = time.perf_counter()
    tensors: dict[str, Any] = {}
    if name == "runai":
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as streamer:
            streamer.stream_files(files, device=device)
            # Copies: the streamer's buffers do not outlive it.
            tensors = {n: t.clone() for n, t in streamer.get_tensors()}
    else:
        from fastsafetensors import SafeTensorsFileLoader

        # pg=None: a single process; nogds=True: the copier that needs no GPUDirect Storage.
        loader = SafeTensorsFileLoader(None, device, nogds=True)
        loader.add_filenames({0: files})
        buffers = loader.copy_files_to_device()
        tensors = {k: buffers.get_tensor(k).clone() for k in loader.get_keys()}
        buffers.close()
        loader.close()
    _sync(device)
    loaded = time.perf_counter() - start
    _first_use(tensors, device)
    first = time.perf_counter() - start
    return _phases(0.0, loaded, loaded, first)


def _local_copy(
    uri: str, directory: str | None
) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """A local directory of the checkpoint for the local strategies (downloaded, untimed)."""
    from blob2gpu.sources.azure.location import is_blob_uri

    if directory:
        return Path(directory), None
    if not is_blob_uri(uri):
        path = Path(uri.removeprefix("file://"))
        return (path if path.is_dir() else path.parent), None
    from blob2gpu.settings import resolve
    from blob2gpu.sources.azure.container import open_container

    # The same shard files, as an image or a local disk would hold them.
    tmp = tempfile.TemporaryDirectory(prefix="blob2gpu-bench-")
    with open_container(uri, resolve(), None) as container:
        for ref in container.list_checkpoint().plan.shards:
            with open(Path(tmp.name) / ref.name, "wb") as f:
                blob = container.client.get_blob_client(ref.path)
                blob.download_blob(max_concurrency=4).readinto(f)
    return Path(tmp.name), tmp


def drop_page_cache() -> None:
    """Ask the kernel to drop clean page cache (root only); raises InvalidArgument if refused."""
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError as e:
        raise InvalidArgument(
            f"--drop-caches needs root and a writable /proc/sys/vm: {e}"
        ) from None


def run(
    uri: str,
    strategies: list[str],
    device: str = "cpu",
    repeats: int = 3,
    local_dir: str | None = None,
    drop_caches: bool = False,
    settings: dict[str, Any] | None = None,
) -> list[StrategyResult]:
    """Run every strategy `repeats` times, interleaved so drift hits them all alike.

    Returns one StrategyResult per strategy. Raises InvalidArgument for an unknown strategy.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise InvalidArgument(
            f"unknown strategy {', '.join(unknown)}; known: " + ", ".join(STRATEGIES)
        )
    settings = settings or {}
    results = {s: StrategyResult(s) for s in strategies}
    local, tmp = (None, None)
    if any(s in ("image-local", "runai", "fastsafetensors") for s in strategies):
        local, tmp = _local_copy(uri, local_dir)
    try:
        for _ in range(repeats):
            for s in strategies:
                result = results[s]
                if result.unavailable:
                    continue
                if drop_caches:
                    drop_page_cache()
                try:
                    if s == "image-local":
                        assert local is not None  # made above for the local strategies
                        result.runs.append(_run_image_local(local, device))
                    elif s in ("runai", "fastsafetensors"):
                        assert local is not None
                        result.runs.append(_run_peer(s, local, device))
                    else:
                        result.runs.append(_run_blob2gpu(uri, device, s == "direct-gpu", settings))
                except ImportError as e:
                    result.unavailable = f"not installed ({e.name or e})"
                except Exception as e:  # a peer that cannot run here is reported, not fatal
                    if s in ("runai", "fastsafetensors"):
                        result.unavailable = f"{type(e).__name__}: {e}"[:120]
                    else:
                        raise
    finally:
        if tmp is not None:
            tmp.cleanup()
    return list(results.values())


def table(results: list[StrategyResult]) -> str:
    """The comparison as text: median phases per strategy and the gain over the first."""
    base = next((r.median("cold_start_s") for r in results if r.runs), None)
    lines = [f"{'strategy':<16}" + "".join(f"{c:>14}" for c in PHASE_COLUMNS) + f"{'gain':>9}"]
    for r in results:
        if not r.runs:
            lines.append(f"{r.strategy:<16}unavailable: {r.unavailable}")
            continue
        total = r.median("cold_start_s") or 0.0
        gain = (base - total) / base * 100 if base else 0.0
        cells = "".join(f"{r.median(c):>14.3f}" for c in PHASE_COLUMNS)
        lines.append(f"{r.strategy:<16}{cells}{gain:>8.1f}%")
    return "\n".join(lines)


def to_json(results: list[StrategyResult]) -> str:
    return json.dumps(
        [dict(asdict(r), medians={c: r.median(c) for c in PHASE_COLUMNS}) for r in results],
        indent=2,
    )


def plot(results: list[StrategyResult], path: str | os.PathLike[str]) -> None:
    """Stacked bars of the median phases per strategy (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in results if r.runs]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(ran)))
    for i, r in enumerate(ran):
        left = 0.0
        for column, color in zip(
            PHASE_COLUMNS[:4], ("#4c72b0", "#dd8452", "#55a868", "#c44e52"), strict=True
        ):
            width = r.median(column) or 0.0
            ax.barh(i, width, left=left, color=color, label=column if i == 0 else None)
            left += width
    ax.set_yticks(range(len(ran)), [r.strategy for r in ran])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median)")
    ax.set_title("cold start by strategy")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
