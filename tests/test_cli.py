"""The command line: `blob2gpu load` prints a summary and writes the report; errors exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import random_tensor


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blob2gpu", *args], capture_output=True, text=True, timeout=120
    )


def test_load_prints_summary_and_writes_report(write_checkpoint, tmp_path):
    directory = write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.bfloat16, (128, 32), s)} for s in range(2)]
    )
    out = tmp_path / "report.json"
    result = run("load", str(directory), "--device", "cpu", "--report", str(out))
    assert result.returncode == 0, result.stderr
    assert "GB/s" in result.stdout and "2 tensors from 2 shard(s)" in result.stdout
    assert "model_load_complete" in result.stdout
    report = json.loads(out.read_text())
    total = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    assert report["bytes"] == total and report["tensors"] == 2 and report["shard_count"] == 2
    assert report["seconds"] > 0 and len(report["shards"]) == 2


def test_load_on_cuda_with_settings(fake_driver, write_checkpoint):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (64, 64))}])
    result = run("load", str(directory), "--device", "cuda", "--set", "staging_slots=3")
    assert result.returncode == 0, result.stderr
    assert "to cuda:0" in result.stdout


def test_errors_are_one_line_and_exit_2(tmp_path):
    result = run("load", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.startswith("blob2gpu: SourceUnavailable:")
    result = run("load", str(tmp_path), "--set", "staging_slots=1")
    assert result.returncode == 2 and "ConfigError" in result.stderr


def test_settings_command_shows_sources(monkeypatch):
    monkeypatch.setenv("BLOB2GPU_COPY_STREAMS", "3")
    result = run("settings", "--json")
    doc = json.loads(result.stdout)
    assert doc["copy_streams"] == {"value": 3, "source": "env BLOB2GPU_COPY_STREAMS"}


def test_demo_runs(tmp_path):
    result = run("demo", "--device", "cpu", "--size-mb", "8")
    assert result.returncode == 0, result.stderr
    assert "tensors" in result.stdout and "GB/s" in result.stdout
