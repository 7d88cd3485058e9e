"""The fake CUDA driver of tests/fake_cuda for the benchmarks' `cuda-fake` rows: the real CUDA code
path of blob2gpu (staging ring, streams, events) on host memory."""

from __future__ import annotations

import os
import sys
from typing import Any

from harness import REPO_ROOT
from harness.isolation import Unavailable

BUILD_DIR = REPO_ROOT / "tests" / "fake_cuda"


def use_fake_driver() -> Any:
    """Builds the fake driver and points BLOB2GPU_CUDA_DRIVER at it, which must happen before
    blob2gpu is imported; returns a FakeDriver handle on it (its counters: peak device bytes,
    violations, pending copies, emulation CPU). Raises Unavailable when it cannot be built."""
    if not (BUILD_DIR / "build.py").exists():
        raise Unavailable(f"{BUILD_DIR / 'build.py'} does not exist")
    sys.path.insert(0, str(BUILD_DIR))
    try:
        from build import FakeDriver, build_fake_driver  # type: ignore[import-not-found]
    except ImportError as exc:
        raise Unavailable(f"cannot import build_fake_driver from {BUILD_DIR} ({exc})") from exc
    os.environ["BLOB2GPU_CUDA_DRIVER"] = str(build_fake_driver())
    return FakeDriver(os.environ["BLOB2GPU_CUDA_DRIVER"])
