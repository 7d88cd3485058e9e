"""The set-up scripts say what they are doing during their silent minutes: one `==>` line per
step (run here with stand-ins for python and npm, so nothing is installed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stand_ins(tmp_path):
    log = tmp_path / "calls.log"
    for name in ("python", "npm"):
        tool = tmp_path / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
        tool.chmod(0o755)
    return tmp_path, log


@pytest.mark.parametrize(
    ("script", "args", "steps"),
    [
        ("demo.sh", [], ["build tools", "building and installing blob2gpu[azure]", "running"]),
        (
            "demo.sh",
            ["--model", "llama"],
            ["build tools", "torch 2.13.0", "blob2gpu[azure,transformers]", "running"],
        ),
        ("test.sh", [], ["torch 2.13.0", "build tools", "blob2gpu[test]", "running the tests"]),
    ],
)
def test_each_step_is_announced(stand_ins, script, args, steps):
    bin_dir, log = stand_ins
    env = dict(os.environ, PYTHON=str(bin_dir / "python"))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    announced = [ln for ln in result.stderr.splitlines() if ln.startswith("==> ")]
    for step, line in zip(steps, [a for a in announced if "Azurite" not in a], strict=True):
        assert step in line
    assert "pip install" in log.read_text()  # the steps ran, with the stand-in
