"""Round-robin rounds of fresh processes and what is kept of them.

Round r runs every contestant once, so slow drift hits all of them alike. A process whose timed
load other users' processes disturbed (they burnt more than CONTENDED_FRACTION of a core) is run
again, up to `retries` times; when every attempt is disturbed the least disturbed is kept. A row
then folds its processes: the first wrong or failed one decides a row with no good process, and
disturbed samples are left out of the medians when undisturbed ones exist.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

CONTENDED_FRACTION = 0.2  # foreign CPU seconds per wall second above which a sample is retried

Process = dict[str, Any]  # one worker's result (isolation.run_in_fresh_process)


def disturbance(sample: dict[str, Any]) -> float:
    """Returns the other processes' CPU seconds per wall second of a sample's timed load."""
    return sample.get("foreign_cpu_s", 0.0) / max(sample.get("wall_s", 0.0), 1e-9)


@dataclass
class Rounds:
    """How the rounds run: `attempt(name)` runs one process (its waits included) and returns its
    result; `timed_sample(process)` is the sample of its timed (cold) load; `progress(prefix,
    process)` prints the line of a good process (`prefix` is '[round/repeats] name: ')."""

    attempt: Callable[[str], Process]
    timed_sample: Callable[[Process], dict[str, Any]]
    progress: Callable[[str, Process], None]
    repeats: int
    retries: int

    def _disturbed(self, p: Process) -> bool:
        return p.get("status") == "ok" and disturbance(self.timed_sample(p)) > CONTENDED_FRACTION

    def _one(self, name: str) -> Process:
        """Returns the kept process of one contestant in one round, its discarded ones inside."""
        discarded: list[Process] = []
        for attempt in range(self.retries + 1):
            p = self.attempt(name)
            p["contended"] = self._disturbed(p)
            if not p["contended"]:
                break
            discarded.append(p)
            if attempt == self.retries:  # every attempt disturbed: keep the least disturbed
                p = min(discarded, key=lambda d: disturbance(self.timed_sample(d)))
                discarded.remove(p)
                break
            foreign = self.timed_sample(p)["foreign_cpu_s"]
            print(f"  {name}: other processes used {foreign:.2f} CPU s; retrying", flush=True)
        p["discarded_attempts"] = discarded
        return p

    def run(self, names: list[str]) -> dict[str, list[Process]]:
        """Returns every contestant's kept processes, in round order."""
        processes: dict[str, list[Process]] = {n: [] for n in names}
        for r in range(self.repeats):
            for name in names:
                done = processes[name]
                if done and done[-1].get("status") in ("unavailable", "wrong"):
                    continue  # no point in repeating it
                p = self._one(name)
                done.append(p)
                prefix = f"[{r + 1}/{self.repeats}] {name}: "
                if p.get("status") == "ok":
                    self.progress(prefix, p)
                else:
                    print(f"{prefix}{p['status']}: {p.get('reason', '')}", flush=True)
        return processes


def fold(processes: list[Process]) -> tuple[dict[str, Any], list[Process]]:
    """Returns (the start of one contestant's row: its processes, status and reason; the good
    processes its medians are taken over, none unless the status is 'ok'), as the module's
    docstring says."""
    ok = [p for p in processes if p.get("status") == "ok"]
    not_ok = [p for p in processes if p.get("status") != "ok"]
    wrong = [p for p in not_ok if p.get("status") == "wrong"]
    if wrong or not ok:
        first = (wrong or not_ok)[0]
        status, reason = first.get("status", "failed"), first.get("reason", "")
        return {"processes": processes, "status": status, "reason": reason}, []
    notes = []
    if not_ok:
        notes.append(f"{len(not_ok)} process(es) failed: {not_ok[0].get('reason', '')}")
    if len({json.dumps(p.get("versions"), sort_keys=True) for p in ok}) > 1:
        notes.append("package changed during the run")
    busy = sum(1 for p in ok if p.get("contended"))
    if busy == len(ok):
        notes.append(f"all {busy} samples contended by other processes")
    elif busy:
        notes.append(f"{busy} contended sample(s) of {len(ok)} left out")
        ok = [p for p in ok if not p.get("contended")]
    return {"processes": processes, "status": "ok", "reason": "; ".join(notes)}, ok


def add_round_arguments(ap: argparse.ArgumentParser) -> None:
    """Adds --wait-idle and --retries, which every round-robin benchmark takes."""
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=20,
        help="before each process, wait up to this many seconds for the machine to go idle",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=2,
        help="reruns of a process whose load other processes' CPU use disturbed (default 2)",
    )


def chosen_contestants(
    ap: argparse.ArgumentParser, only: str | None, default: list[str], known: Sequence[str]
) -> list[str]:
    """Returns the contestants `--only` names (comma-separated), or `default` without it; exits
    through ap.error when it names one not in `known`."""
    if not only:
        return default
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown contestants {unknown}; choose from {', '.join(known)}")
    return names
