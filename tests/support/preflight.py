"""`blob2gpu preflight` run as a node would run it: a fresh process, its JSON read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def preflight(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m blob2gpu preflight ARGS` with os.environ plus `env`."""
    return subprocess.run(
        [sys.executable, "-m", "blob2gpu", "preflight", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def checks(result: subprocess.CompletedProcess) -> dict[str, dict]:
    """The checks of a `--json` run, by name."""
    doc = json.loads(result.stdout)
    return {c["name"]: c for c in doc["checks"]}
