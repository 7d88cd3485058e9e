"""What a preflight run finds: one Check per question, a PreflightResult for the run, and the
PreflightRun the checks share while they run."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from blob2gpu import _core
from blob2gpu.redaction import redact
from blob2gpu.settings import ResolvedSettings

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


MiB = 1 << 20


@dataclass
class Check:
    """One preflight check: its status, what was measured (`value`) and what to do (`hint`)."""

    name: str
    status: str
    value: str
    hint: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # the numbers behind `value`, for --json
    seconds: float = 0.0


@dataclass
class PreflightResult:
    """Every check of one preflight run; `ok` is False when any check failed."""

    device: str
    source: str | None  # redacted
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    @property
    def exit_code(self) -> int:
        """0 when nothing failed, 1 otherwise (an init container's verdict)."""
        return 0 if self.ok else 1

    def check(self, name: str) -> Check:
        """The check named `name`; raises KeyError when it did not run."""
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        counts = {s: sum(c.status == s for c in self.checks) for s in (OK, WARN, FAIL, SKIP)}
        return {
            "ok": self.ok,
            "device": self.device,
            "source": self.source,
            "counts": counts,
            "checks": [asdict(c) for c in self.checks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """One line per check (status, name, value, hint), and a verdict line."""
        name_w = max(len(c.name) for c in self.checks)
        value_w = min(max(len(c.value) for c in self.checks), 72)
        lines = [f"{'STATUS':<6}  {'CHECK':<{name_w}}  {'VALUE':<{value_w}}  HINT"]
        for c in self.checks:
            line = f"{c.status.upper():<6}  {c.name:<{name_w}}  {c.value:<{value_w}}  {c.hint}"
            lines.append(line.rstrip())
        counts = self.to_dict()["counts"]
        verdict = "ready" if self.ok else "NOT READY"
        lines.append(
            f"preflight: {verdict} ({counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail, "
            f"{counts[SKIP]} skip)"
        )
        return "\n".join(lines)


def gb(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


class PreflightRun:
    """The state one preflight run shares between its checks."""

    def __init__(self, device: str, settings: ResolvedSettings) -> None:
        self.device = device  # 'auto', 'cpu' or 'cuda:N'
        self.settings = settings
        self.checks: list[Check] = []
        self.driver: _core.DriverInfo = {
            "available": False,
            "status": _core.DriverStatus.NOT_FOUND,
            "path": "",
            "detail": "not looked for yet",
        }
        self.model_bytes: int | None = None
        self.model_bytes_from = ""

    @property
    def wants_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def ordinal(self) -> int:
        return int(self.device.split(":")[1]) if self.wants_gpu else 0

    @property
    def gpu_missing_status(self) -> str:
        """A GPU check that cannot run fails when a GPU was asked for, and is skipped otherwise."""
        return FAIL if self.wants_gpu else SKIP

    def add(self, check: Check, started: float) -> Check:
        check.seconds = round(time.perf_counter() - started, 4)
        check.value, check.hint = redact(check.value), redact(check.hint)
        self.checks.append(check)
        return check
