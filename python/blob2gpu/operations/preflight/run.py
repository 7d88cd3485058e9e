"""run_preflight: every check in order, and whether the model fits the target."""

from __future__ import annotations

import os
import time
from pathlib import Path

from blob2gpu import _core
from blob2gpu.errors import Blob2GpuError, InvalidArgument
from blob2gpu.loading.host_memory import host_budget
from blob2gpu.operations.preflight.cache import CACHE_PROBE_BYTES, check_cache, default_cache_dir
from blob2gpu.operations.preflight.node import check_driver, check_gpus, check_pinned
from blob2gpu.operations.preflight.result import (
    FAIL,
    OK,
    SKIP,
    Check,
    PreflightResult,
    PreflightRun,
    gb,
)
from blob2gpu.operations.preflight.storage import check_source
from blob2gpu.redaction import redact
from blob2gpu.settings import resolve


def check_fit(run: PreflightRun) -> None:
    t = time.perf_counter()
    need_bytes = run.model_bytes
    if need_bytes is None:
        run.add(Check("model_fit", SKIP, "model size unknown (give --source or --model-bytes)"), t)
        return
    s = run.settings
    devices = run.driver.get("devices", []) if run.driver.get("available") else []
    gpu = run.device != "cpu" and run.ordinal < len(devices)
    if run.wants_gpu and not gpu:
        run.add(Check("model_fit", SKIP, f"no {run.device} to compare with"), t)
        return
    if gpu:
        target = f"cuda:{run.ordinal}"
        try:
            free, _total, _name = _core.device_memory(run.ordinal)
        except Blob2GpuError as e:
            run.add(Check("model_fit", FAIL, f"{target}: {e}", "check nvidia-smi"), t)
            return
        factor, knob = s.gpu_headroom_factor, "gpu_headroom_factor"
        where = f"{gb(free)} free on {target}"
        remedy = "free GPU memory, use a larger GPU, quantize or shard the model"
    else:
        target = "cpu"
        budget = host_budget(s.host_memory_limit_bytes)
        free, where, remedy = budget.available, f"host RAM: {budget.bound}", budget.remedy
        factor, knob = s.host_headroom_factor, "host_headroom_factor"
    need = need_bytes * factor
    data = {
        "model_bytes": need_bytes,
        "model_bytes_from": run.model_bytes_from,
        "headroom_factor": factor,
        "need_bytes": int(need),
        "free_bytes": free,
        "target": target,
    }
    counted = f"{gb(need_bytes)} from {run.model_bytes_from} x {factor:g}"
    value = f"{gb(need)} needed ({counted}), {where}"
    if free < need:
        run.add(Check("model_fit", FAIL, value, f"{remedy}, or lower {knob}", data=data), t)
    else:
        run.add(Check("model_fit", OK, value, data=data), t)


def run_preflight(
    source: str | None = None,
    model_bytes: int | None = None,
    device: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    cache_probe_bytes: int = CACHE_PROBE_BYTES,
) -> PreflightResult:
    """Run every check and return the PreflightResult (its exit_code is 0 or 1).

    source: a Blob URI or local path (None: $MODEL_SOURCE_URI, else no storage check).
    model_bytes: the weights' size; else taken from the checkpoint at `source`.
    device: 'auto' (the first GPU when a driver loads, else cpu), 'cpu', 'cuda' or 'cuda:N'; with
    cuda a missing driver or GPU fails, otherwise the GPU checks are skipped.
    Raises ConfigError for a bad config file or setting, InvalidArgument for a bad device.
    """
    from blob2gpu.loading.request import SOURCE_URI_ENV, normalize_device

    settings = resolve(config_path=config)
    requested = device.strip().lower()
    if requested != "auto":
        requested = normalize_device(requested)
    if model_bytes is not None and model_bytes < 0:
        raise InvalidArgument(f"--model-bytes must be at least 0, not {model_bytes}")
    source = source or os.environ.get(SOURCE_URI_ENV) or None

    run = PreflightRun(requested, settings)
    if model_bytes is not None:
        run.model_bytes, run.model_bytes_from = model_bytes, "--model-bytes"
    check_driver(run)
    if run.device == "auto":  # the first GPU when the driver sees one, else the host
        run.device = "cuda:0" if run.driver.get("available") and run.driver["devices"] else "cpu"
    check_gpus(run)
    check_pinned(run)
    check_source(run, source)
    check_cache(
        run, Path(cache_dir) if cache_dir else default_cache_dir(settings), cache_probe_bytes
    )
    check_fit(run)
    return PreflightResult(
        device=run.device, source=redact(source) if source else None, checks=run.checks
    )
