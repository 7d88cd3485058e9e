"""One contestant per fresh interpreter, so that imports, RSS and crashes stay its own.

A benchmark script runs itself again with `--worker NAME ...`; the worker builds its contestant
(raising Unavailable when a package or tool is missing), loads, and prints one result line
(`emit`); the parent (`run_in_fresh_process`) reads that line back, or says why there is none.
"""

from __future__ import annotations

import importlib
import json
import resource
import subprocess
import sys
import time
from types import ModuleType
from typing import Any

RESULT_TAG = "@@BENCH_RESULT "  # a worker's result line on stdout
EXIT_UNAVAILABLE = 3  # a worker's exit status when its contestant cannot run here


class Unavailable(Exception):
    """The contestant cannot run here (missing package, tool or prerequisite)."""


def import_or_unavailable(module: str, what: str = "") -> ModuleType:
    """Returns the imported module; raises Unavailable naming `what` (default: the module)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"{what or module} not importable ({exc})") from exc


def emit(payload: dict[str, Any]) -> None:
    """Prints the worker's result line (the parent keeps the last one)."""
    print(RESULT_TAG + json.dumps(payload), flush=True)


def emit_unavailable(exc: Unavailable) -> int:
    """Prints an 'unavailable' result; returns the worker's exit status for it."""
    emit({"status": "unavailable", "reason": str(exc)})
    return EXIT_UNAVAILABLE


def worker_command(script: str, name: str, *args: str) -> list[str]:
    """Returns the command that runs `script` as the worker of contestant `name`."""
    return [sys.executable, script, "--worker", name, *args]


def run_in_fresh_process(
    cmd: list[str], timeout_s: float, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Runs one worker (with `env`, else this process's environment); returns (its result, its
    non-empty stderr lines).

    The result is the worker's emitted payload plus `process` (wall and CPU seconds of the whole
    process as the parent sees it, imports included: a cross-check; its exit code) and
    `stderr_tail`; or, when no result line came, status 'failed' with why."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout_s:.0f} s"}, []
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, Any] | None = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
    stderr = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
    if result is None:
        why = stderr[-1] if stderr else "no output"
        failed = {"status": "failed", "reason": f"exit {proc.returncode}: {why}"}
        return {**failed, "stderr_tail": stderr[-20:]}, stderr
    result["process"] = {
        "wall_s": time.perf_counter() - t0,
        "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
        "exit_code": proc.returncode,
    }
    if stderr:
        result["stderr_tail"] = stderr[-20:]
    return result, stderr
