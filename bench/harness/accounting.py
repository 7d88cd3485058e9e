"""CPU, page faults and memory, read from getrusage and /proc: of this process and its children,
of a process group (Azurite and what it forked), of the kernel's threads and of the whole machine.
`Stopwatch` takes them all around a timed load; the other users' CPU it infers is what tells a
disturbed sample from a clean one on a shared box."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass


def process_cpu_seconds() -> float:
    """Returns user + system CPU seconds of every thread of this process."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def current_rss_bytes() -> int:
    """Returns this process's resident set size."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Resets this process's RSS high-water mark (VmHWM) to its current RSS; returns False where
    the kernel does not support it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Returns this process's RSS high-water mark: VmHWM, or ru_maxrss where /proc lacks it."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_stats() -> list[tuple[str, list[str]]]:
    """Returns (pid, the fields after the command name) of every live process."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                out.append((pid, fh.read().rsplit(")", 1)[1].split()))
        except OSError:
            continue
    return out


def kernel_threads_cpu_seconds() -> float:
    """Returns CPU seconds of all kernel threads: work a load may cause (compaction, page
    reporting), kept apart from other users' processes."""
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    total = sum(
        int(rest[11]) + int(rest[12])
        for pid, rest in _proc_stats()
        if pid == "2" or rest[1] == "2"  # kthreadd and its children
    )
    return total / os.sysconf("SC_CLK_TCK")


def group_cpu_and_rss(pgid: int) -> tuple[float, int]:
    """Returns (user+system CPU seconds, RSS bytes) of every live process in process group `pgid`
    (Azurite runs in its own session, so its group is the server and anything it forked); (0, 0)
    for pgid 0."""
    if pgid <= 0:
        return 0.0, 0
    hz = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    cpu, rss = 0.0, 0
    for _, rest in _proc_stats():
        if int(rest[2]) == pgid:  # pgrp is field 5, rss 24
            cpu += (int(rest[11]) + int(rest[12])) / hz
            rss += int(rest[21]) * page
    return cpu, rss


def machine_cpu_seconds() -> tuple[float, float]:
    """Returns (busy, steal) CPU seconds of the whole machine since boot (all cores), from
    /proc/stat; (0, 0) where it cannot be read."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq) / hz, steal / hz


def wait_for_idle(max_wait_s: float, busy_limit: float) -> float:
    """Waits (at most max_wait_s) until under busy_limit of all cores is busy over half a second;
    returns the last busy fraction. On a shared box a neighbour's build would decide rankings."""
    deadline = time.monotonic() + max_wait_s
    ncpu = os.cpu_count() or 1
    while True:
        b0 = machine_cpu_seconds()[0]
        time.sleep(0.5)
        frac = (machine_cpu_seconds()[0] - b0) / (0.5 * ncpu)
        if frac < busy_limit or time.monotonic() >= deadline:
            return frac


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Sets the CPU affinity of every thread of `pid` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass  # the thread ended meanwhile


@dataclass(frozen=True)
class Counters:
    """The counters at one instant (the group's and the kernel threads' are 0 when not asked)."""

    wall: float
    self_usage: resource.struct_rusage
    children_usage: resource.struct_rusage
    machine_busy: float
    machine_steal: float
    kernel_threads: float
    group_cpu: float
    group_rss: int


@dataclass(frozen=True)
class Spent:
    """What an interval cost, from two Counters."""

    wall_s: float
    user_s: float  # this process, all threads
    sys_s: float
    children_user_s: float  # children waited for during the interval (the ceiling's curls)
    children_sys_s: float
    minor_faults: int
    children_minor_faults: int
    involuntary_switches: int
    machine_busy_s: float
    machine_steal_s: float
    kernel_threads_s: float
    group_cpu_s: float
    group_rss_bytes: int  # at the end

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def children_cpu_s(self) -> float:
        return self.children_user_s + self.children_sys_s

    @property
    def foreign_cpu_s(self) -> float:
        """CPU other users' processes (a build next door) burnt meanwhile: the machine's busy time
        less this process, its children, the watched group and the kernel threads."""
        mine = self.cpu_s + self.children_cpu_s + self.group_cpu_s + self.kernel_threads_s
        return max(0.0, self.machine_busy_s - mine)


class Stopwatch:
    """Counters around an interval: `start()`, then `stop()` returns what it Spent. The slow /proc
    scans (the process group `pgid`, kernel threads when `kernel_threads`) run outside the timed
    part: first on start, last on stop."""

    def __init__(self, pgid: int = 0, kernel_threads: bool = False) -> None:
        self._pgid = pgid
        self._kernel_threads = kernel_threads
        self._start: Counters | None = None

    def _slow(self) -> tuple[float, float, float, float, int]:
        busy, steal = machine_cpu_seconds()
        kthreads = kernel_threads_cpu_seconds() if self._kernel_threads else 0.0
        return (busy, steal, kthreads, *group_cpu_and_rss(self._pgid))

    def start(self) -> float:
        """Takes the first counters; returns the start time (time.perf_counter)."""
        slow = self._slow()
        fast = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        self._start = Counters(time.perf_counter(), *fast, *slow)
        return self._start.wall

    def stop(self) -> Spent:
        """Returns what the interval since start() cost."""
        assert self._start is not None, "stop() before start()"
        wall = time.perf_counter()
        fast = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        end = Counters(wall, *fast, *self._slow())
        a, b = self._start, end

        def own(field: str) -> float:
            return getattr(b.self_usage, field) - getattr(a.self_usage, field)

        def kids(field: str) -> float:
            return getattr(b.children_usage, field) - getattr(a.children_usage, field)

        return Spent(
            wall_s=b.wall - a.wall,
            user_s=own("ru_utime"),
            sys_s=own("ru_stime"),
            children_user_s=kids("ru_utime"),
            children_sys_s=kids("ru_stime"),
            minor_faults=int(own("ru_minflt")),
            children_minor_faults=int(kids("ru_minflt")),
            involuntary_switches=int(own("ru_nivcsw")),
            machine_busy_s=b.machine_busy - a.machine_busy,
            machine_steal_s=b.machine_steal - a.machine_steal,
            kernel_threads_s=b.kernel_threads - a.kernel_threads,
            group_cpu_s=b.group_cpu - a.group_cpu,
            group_rss_bytes=b.group_rss,
        )
