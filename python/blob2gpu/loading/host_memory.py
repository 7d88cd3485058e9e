"""How much host memory a new allocation may take: the machine's MemAvailable, bounded by the
memory limit of the process's control group (a Kubernetes pod's or a container's), which
/proc/meminfo does not show. A pod that passes the fit check on the node's free memory and is
then killed by its own limit mid-load is the failure this exists for."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")

# A cgroup v1 "no limit" is a page-rounded 2**63 - 1; anything this large is no limit.
_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class HostMemory:
    """available: bytes a new allocation may take. limit: the control group's memory limit in
    bytes when it is what bounds `available` (0 when the machine's free memory does); where: the
    file that limit was read from, for messages."""

    available: int
    limit: int = 0
    where: str = ""


def host_memory(cgroup_root: Path | None = None, proc_cgroup: Path | None = None) -> HostMemory:
    """The host memory a new allocation may take now: the smaller of MemAvailable and the room
    left under the process's cgroup limit (v2 memory.max, or v1 memory.limit_in_bytes, less the
    group's working set: usage less its inactive file cache, which the kernel reclaims first)."""
    machine = _mem_available()
    group = _cgroup_room(cgroup_root or CGROUP_ROOT, proc_cgroup or PROC_CGROUP)
    if group is not None and group[0] < machine:
        room, limit, where = group
        return HostMemory(room, limit, where)
    return HostMemory(machine)


@dataclass(frozen=True)
class HostBudget:
    """The host memory a load may count on. available: bytes; bound: what sets it, as a clause
    for messages ("1.20 GB is available"); remedy: what gives it more."""

    available: int
    bound: str
    remedy: str


def host_budget(limit_setting: int) -> HostBudget:
    """The host memory a load may count on: host_memory(), lowered to `limit_setting`
    (host_memory_limit_bytes) when that is set and smaller; for the fit check and preflight."""
    host = host_memory()
    if 0 < limit_setting < host.available:
        return HostBudget(
            limit_setting,
            f"host_memory_limit_bytes allows {memory_size(limit_setting)}",
            "raise host_memory_limit_bytes if it may use more",
        )
    if host.limit:
        return HostBudget(
            host.available,
            f"{memory_size(host.available)} is left under this process's memory limit "
            f"({memory_size(host.limit)}, {host.where})",
            "raise the container's memory limit",
        )
    return HostBudget(
        host.available,
        f"{memory_size(host.available)} is available",
        "free host memory or use a larger node",
    )


def memory_size(n: float) -> str:
    """`n` bytes as the memory messages write them: GB from 0.1 GB, else MB, two decimals."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_room(root: Path, proc_cgroup: Path) -> tuple[int, int, str] | None:
    """(room left, limit, limit's file) of the innermost limited group the process is in, or None
    when no group limits it or the files cannot be read (not Linux, no cgroupfs mounted)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = [*line.split(":", 2), "", ""][:3]
        if hierarchy == "0" and controllers == "":
            found = _room_in(root, path, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            found = _room_in(
                root / "memory",
                path,
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            )
        else:
            continue
        if found is not None:
            return found
    return None


def _room_in(
    base: Path, path: str, limit_file: str, usage_file: str, inactive_key: str
) -> tuple[int, int, str] | None:
    """The least room under any limited group from the process's own up to the hierarchy's
    root (a parent's limit binds its children too; inside a container the group's own path is
    often not mounted, and the mounted root is the container's group)."""
    tightest: tuple[int, int, str] | None = None
    for directory in _groups_up(base, path):
        limit = _read_int(directory / limit_file)
        if limit is None or limit >= _UNLIMITED:
            continue
        usage = _read_int(directory / usage_file) or 0
        inactive = _stat_value(directory / "memory.stat", inactive_key)
        room = max(limit - max(usage - inactive, 0), 0)
        if tightest is None or room < tightest[0]:
            tightest = (room, limit, str(directory / limit_file))
    return tightest


def _groups_up(base: Path, path: str) -> list[Path]:
    """The directories of the group `path` (from /proc/self/cgroup) under `base` and of each of
    its parents up to `base`: a parent's limit binds its children too."""
    relative = Path(path.lstrip("/"))
    return [base / relative, *(base / p for p in relative.parents)]


def cgroup_cpu_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP
) -> int | None:
    """The CPUs the process's cgroup v2 quota allows (cpu.max "quota period", rounded up; the
    tightest from its group up to the mounted root), or None without a quota or a v2 group."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    path = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None
    tightest: int | None = None
    for directory in _groups_up(cgroup_root, path):
        try:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            cpus = -(-int(quota) // max(1, int(period)))
        except (OSError, ValueError):  # absent, unreadable, or "max": no quota there
            continue
        tightest = cpus if tightest is None else min(tightest, cpus)
    return None if tightest is None else max(1, tightest)


def _read_int(file: Path) -> int | None:
    try:
        text = file.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return _UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(file: Path, key: str) -> int:
    try:
        for line in file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
