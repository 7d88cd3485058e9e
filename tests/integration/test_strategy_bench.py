"""`blob2gpu bench`: the case study's strategy comparison, phase by phase, on the user's checkpoint
(local and Blob), with a table, JSON and a picture."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from blob2gpu import errors
from blob2gpu.tools import strategy_bench
from conftest import random_tensor, upload_directory


@pytest.fixture
def checkpoint(write_checkpoint):
    return write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float16, (256, 256), s)} for s in range(3)]
    )


def test_every_strategy_reports_ordered_phases(checkpoint):
    results = strategy_bench.run(
        str(checkpoint), ["image-local", "host-staging", "direct-gpu"], repeats=2
    )
    for r in results:
        assert len(r.runs) == 2, r.unavailable
        for run in r.runs:
            assert all(run[c] >= 0 for c in strategy_bench.PHASE_COLUMNS)
            assert (
                abs(
                    run["fetch_s"]
                    + run["stage_s"]
                    + run["load_s"]
                    + run["ttft_s"]
                    - run["cold_start_s"]
                )
                < 1e-9
            )
    text = strategy_bench.table(results)
    assert text.splitlines()[1].startswith("image-local") and text.count("%") == 3


def test_from_blob_on_the_fake_gpu(fake_driver, checkpoint, azurite, container, blob_env):
    upload_directory(azurite, container, checkpoint, "m")
    results = strategy_bench.run(
        f"az://{container}/m", ["image-local", "direct-gpu"], device="cuda", repeats=1
    )
    assert [len(r.runs) for r in results] == [1, 1]
    assert results[1].runs[0]["fetch_s"] > 0


def test_peers_that_are_missing_are_reported(checkpoint):
    results = strategy_bench.run(
        str(checkpoint), ["direct-gpu", "runai", "fastsafetensors"], repeats=1
    )
    for r in results[1:]:
        assert r.runs or r.unavailable  # ran here, or says why not


def test_the_command_runs_without_torch(checkpoint):
    # A load's phases need no framework: without torch the blob2gpu rows load to numpy, and
    # the baselines that need torch say so.
    blocked = (
        "import sys, runpy\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith(('torch.', 'safetensors.torch')):\n"
        "            raise ImportError(f'no module named {name!r}')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "sys.argv = ['blob2gpu', 'bench', sys.argv[1], '--strategies',"
        " 'host-staging,image-local', '--repeats', '1']\n"
        "runpy.run_module('blob2gpu', run_name='__main__')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", blocked, str(checkpoint)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line for line in run.stdout.splitlines()[1:] if line.strip()}
    assert "unavailable" not in rows["host-staging"] and "unavailable" in rows["image-local"]


def test_unknown_strategy():
    with pytest.raises(errors.InvalidArgument, match="unknown strategy teleport"):
        strategy_bench.run("x", ["teleport"])


def test_command_writes_table_json_and_png(checkpoint, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "blob2gpu",
            "bench",
            str(checkpoint),
            "--repeats",
            "1",
            "--json",
            str(out),
            "--png",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "direct-gpu" in run.stdout and "cold_start_s" in run.stdout
    doc = json.loads(out.read_text())
    assert [d["strategy"] for d in doc] == ["image-local", "host-staging", "direct-gpu"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
