"""How much host memory a new allocation may take: the machine's MemAvailable, bounded by the
memory limit of the process's control group (a Kubernetes pod's or a container's), which
/proc/meminfo does not show. A pod that passes the fit check on the node's free memory and is
then killed by its own limit mid-load is the failure this exists for."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from blob2gpu import _core

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
MEMINFO = "/proc/meminfo"
_TEXT_MAX_BYTES = 1 << 20  # /proc and cgroup files: a few KiB

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
    root = cgroup_root or CGROUP_ROOT
    membership = _membership(str(proc_cgroup or PROC_CGROUP))
    files = _group_files(root, membership)
    texts = _read_texts([MEMINFO, *files])  # a load reads these each time it sizes itself
    machine = _mem_available(texts[0])
    group = _cgroup_room(root, membership, dict(zip(files, texts[1:], strict=True)))
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


def _read_texts(paths: list[str]) -> list[str | None]:
    """The text of each small file, None where it cannot be read: read by the core in one call
    (one return of the GIL for the batch; a load reads these each time it sizes itself)."""
    files = _core.read_small_files([os.fsencode(p) for p in paths], _TEXT_MAX_BYTES)
    return [
        None if f.error or not f.regular or f.over_limit else f.data.decode(errors="replace")
        for f in files
    ]


def _mem_available(meminfo: str | None = None) -> int:
    """MemAvailable of /proc/meminfo (its text, else read now), in bytes."""
    if meminfo is None:
        meminfo = _read_texts([MEMINFO])[0]
    for line in (meminfo or "").splitlines():
        if line.startswith("MemAvailable:"):
            try:
                return int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                break
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# Where each cgroup version keeps a group's memory limit, usage and the memory.stat key of its
# inactive file cache (which the kernel reclaims before it counts against the limit).
_V2_FILES = ("memory.max", "memory.current", "inactive_file")
_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


_memberships: dict[str, str] = {}  # /proc/self/cgroup's path -> its text, once read


def _membership(proc_cgroup: str) -> str | None:
    """The process's /proc/self/cgroup text, read once (a failed read is tried again next
    time): the groups a process is in are set when it starts (a container's, a pod's), and
    their limits and usage are what each load reads."""
    text = _memberships.get(proc_cgroup)
    if text is None:
        text = _read_texts([proc_cgroup])[0]
        if text is not None:
            _memberships[proc_cgroup] = text
    return text


def _hierarchies(root: Path, membership: str | None) -> list[tuple[list[Path], tuple[str, ...]]]:
    """For each memory hierarchy the process is in (its /proc/self/cgroup text: `membership`),
    in that file's order: the directories of its group and of each parent up to the mounted root
    (a parent's limit binds its children too; inside a container the group's own path is often
    not mounted, and the mounted root is the container's group), and that version's file names."""
    found: list[tuple[list[Path], tuple[str, ...]]] = []
    for line in (membership or "").splitlines():
        hierarchy, controllers, path = [*line.split(":", 2), "", ""][:3]
        if hierarchy == "0" and controllers == "":
            found.append((_groups_up(root, path), _V2_FILES))
        elif "memory" in controllers.split(","):
            found.append((_groups_up(root / "memory", path), _V1_FILES))
    return found


def _group_files(root: Path, membership: str | None) -> list[str]:
    """Every file _cgroup_room reads: each group's limit, usage and memory.stat."""
    return [
        str(d / name)
        for groups, (limit_file, usage_file, _) in _hierarchies(root, membership)
        for d in groups
        for name in (limit_file, usage_file, "memory.stat")
    ]


def _cgroup_room(
    root: Path, membership: str | None, texts: dict[str, str | None]
) -> tuple[int, int, str] | None:
    """(room left, limit, limit's file) of the innermost limited group the process is in, from
    the texts of _group_files(), or None when no group limits it or the files cannot be read
    (not Linux, no cgroupfs mounted)."""
    for groups, (limit_file, usage_file, inactive_key) in _hierarchies(root, membership):
        tightest: tuple[int, int, str] | None = None
        for d in groups:
            limit = _as_int(texts[str(d / limit_file)])
            if limit is None or limit >= _UNLIMITED:
                continue
            usage = _as_int(texts[str(d / usage_file)]) or 0
            inactive = _stat_value(texts[str(d / "memory.stat")], inactive_key)
            room = max(limit - max(usage - inactive, 0), 0)
            if tightest is None or room < tightest[0]:
                tightest = (room, limit, str(d / limit_file))
        if tightest is not None:
            return tightest
    return None


def _groups_up(base: Path, path: str) -> list[Path]:
    """The directories of the group `path` (from /proc/self/cgroup) under `base` and of each of
    its parents up to `base`: a parent's limit binds its children too."""
    relative = Path(path.lstrip("/"))
    return [base / relative, *(base / p for p in relative.parents)]


def affinity_cpus() -> int:
    """How many CPUs this process may run on (its affinity; the machine's count where that
    cannot be read), before any cgroup quota."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_cpu_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP
) -> int | None:
    """The CPUs the process's cgroup v2 quota allows (cpu.max "quota period", rounded up; the
    tightest from its group up to the mounted root), or None without a quota or a v2 group."""
    lines = (_membership(str(proc_cgroup)) or "").splitlines()
    path = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None
    tightest: int | None = None
    groups = _groups_up(cgroup_root, path)
    for text in _read_texts([str(d / "cpu.max") for d in groups]):
        try:
            quota, period = (text or "").split()[:2]
            cpus = -(-int(quota) // max(1, int(period)))
        except ValueError:  # absent, unreadable, or "max": no quota there
            continue
        tightest = cpus if tightest is None else min(tightest, cpus)
    return None if tightest is None else max(1, tightest)


def _as_int(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return _UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
