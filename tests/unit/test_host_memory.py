"""The host memory the fit check counts on: MemAvailable, bounded by the process's cgroup limit.
Each test lays out a cgroup filesystem (v1 or v2, as the kernel shows it) in a directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from blob2gpu.loading import host_memory as host_memory_module
from blob2gpu.loading.host_memory import HostMemory, _mem_available, host_memory

GiB = 1 << 30
MACHINE = 64 * GiB  # the MemAvailable of the meminfo each test reads


@pytest.fixture(autouse=True)
def meminfo(tmp_path, monkeypatch):
    """A /proc/meminfo that holds still: the machine's own changes between two reads."""
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       {2 * MACHINE >> 10} kB\nMemAvailable:   {MACHINE >> 10} kB\n")
    monkeypatch.setattr(host_memory_module, "MEMINFO", str(path))
    return path


def _group(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def _proc(tmp_path: Path, text: str) -> Path:
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(text)
    return proc


def test_a_v2_pod_limit_bounds_what_is_available(tmp_path):
    root = tmp_path / "cgroup"
    _group(
        root / "kubepods/pod1",
        {
            "memory.max": str(4 * GiB),
            "memory.current": str(3 * GiB),
            "memory.stat": f"anon {GiB}\ninactive_file {2 * GiB}\nactive_file 5\n",
        },
    )
    got = host_memory(root, _proc(tmp_path, "0::/kubepods/pod1\n"))
    # Working set 3 - 2 GiB (inactive file cache is reclaimed first): 3 GiB left of 4.
    assert got == HostMemory(3 * GiB, 4 * GiB, str(root / "kubepods/pod1/memory.max"))


def test_a_v2_group_without_a_limit_leaves_the_machine_s_free_memory(tmp_path):
    root = tmp_path / "cgroup"
    _group(root / "user.slice", {"memory.max": "max\n", "memory.current": str(GiB)})
    got = host_memory(root, _proc(tmp_path, "0::/user.slice\n"))
    assert got == HostMemory(MACHINE)


def test_a_parent_s_tighter_limit_binds_the_child(tmp_path):
    root = tmp_path / "cgroup"
    _group(root / "pod", {"memory.max": str(2 * GiB), "memory.current": str(GiB)})
    _group(root / "pod/container", {"memory.max": str(8 * GiB), "memory.current": str(GiB)})
    got = host_memory(root, _proc(tmp_path, "0::/pod/container\n"))
    assert (got.available, got.limit) == (GiB, 2 * GiB)


def test_inside_a_container_the_mounted_root_is_the_container_s_group(tmp_path):
    # v1 without a cgroup namespace: /proc/self/cgroup names the host's path, which is not
    # mounted in the container; the mounted root holds the container's limit.
    root = tmp_path / "cgroup"
    _group(
        root / "memory",
        {
            "memory.limit_in_bytes": str(GiB),
            "memory.usage_in_bytes": str(GiB // 2),
            "memory.stat": f"inactive_file 7\ntotal_inactive_file {GiB // 4}\n",
        },
    )
    proc = _proc(tmp_path, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    got = host_memory(root, proc)
    assert (got.available, got.limit) == (GiB - GiB // 4, GiB)
    assert got.where == str(root / "memory/memory.limit_in_bytes")


def test_v1_s_no_limit_and_unreadable_files_leave_the_machine_s_free_memory(tmp_path):
    root = tmp_path / "cgroup"
    _group(root / "memory", {"memory.limit_in_bytes": "9223372036854771712\n"})
    assert host_memory(root, _proc(tmp_path, "4:memory:/\n")) == HostMemory(MACHINE)
    _group(root / "memory", {"memory.limit_in_bytes": "garbage\n"})
    assert host_memory(root, _proc(tmp_path, "4:memory:/\n")) == HostMemory(MACHINE)
    assert host_memory(root, tmp_path / "no-such-file") == HostMemory(MACHINE)


def test_a_group_over_its_limit_has_no_room_left(tmp_path):
    root = tmp_path / "cgroup"
    _group(root, {"memory.max": str(GiB), "memory.current": str(2 * GiB)})
    got = host_memory(root, _proc(tmp_path, "0::/\n"))
    assert (got.available, got.limit) == (0, GiB)


def test_mem_available_is_read_from_meminfo(meminfo):
    assert _mem_available() == MACHINE
