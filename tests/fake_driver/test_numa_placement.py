"""Where a GPU pipeline sits on the host: the GPU's NUMA node from the driver
(CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID) where it answers, else from sysfs (the PCI device's
numa_node), -1 from either meaning no node; the node's CPUs within this process's affinity; a
load's ring pinned and io threads bound there (csrc/numa_placement.hpp)."""

from __future__ import annotations

import os

import blob2gpu
import pytest
import torch
from blob2gpu import _core
from conftest import checkpoint_bytes as expected

# The fake names device N's PCI function 0000:(1A+N):00.0 in upper case, as the real driver does.
BUS_ID = "0000:1a:00.0"


def fake_sysfs(root, *, numa_node: str | None, node_cpus: dict[int, str]):
    """A sysfs tree under `root` with the fake GPU's PCI device and the given nodes' CPU lists."""
    if numa_node is not None:
        device = root / "bus" / "pci" / "devices" / BUS_ID
        device.mkdir(parents=True)
        (device / "numa_node").write_text(numa_node + "\n")
    for node, cpus in node_cpus.items():
        directory = root / "devices" / "system" / "node" / f"node{node}"
        directory.mkdir(parents=True)
        (directory / "cpulist").write_text(cpus + "\n")
    return str(root)


def allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def test_the_driver_attribute_names_the_node(fake_driver, tmp_path):
    fake_driver.set_host_numa_attribute(True)
    fake_driver.set_host_numa_id(0, 1)
    mine = allowed_cpus()
    # sysfs says node 0; the driver's answer wins, and node 1's CPUs are those this process has.
    root = fake_sysfs(tmp_path, numa_node="0", node_cpus={1: f"{mine[0]},{max(mine) + 64}"})
    placement = _core.numa_placement(0, sys_root=root)
    assert placement == {"node": 1, "source": "driver", "cpus": [mine[0]]}


def test_the_driver_saying_minus_one_means_no_node(fake_driver, tmp_path):
    fake_driver.set_host_numa_attribute(True)
    fake_driver.set_host_numa_id(0, -1)
    root = fake_sysfs(tmp_path, numa_node="0", node_cpus={0: "0-3"})
    # -1 is the driver's answer (a host without NUMA), not a reason to ask sysfs.
    assert _core.numa_placement(0, sys_root=root) == {"node": -1, "source": "driver", "cpus": []}


def test_without_the_attribute_sysfs_names_the_node(fake_driver, tmp_path):
    # A driver before CUDA 12.2 refuses the attribute (the fake's default).
    mine = allowed_cpus()
    cpu_list = f"{mine[0]}-{mine[-1]}"
    root = fake_sysfs(tmp_path, numa_node="0", node_cpus={0: cpu_list})
    placement = _core.numa_placement(0, sys_root=root)
    assert placement == {"node": 0, "source": "sysfs", "cpus": list(range(mine[0], mine[-1] + 1))}


@pytest.mark.parametrize(
    ("numa_node", "source"), [("-1", "sysfs"), ("junk", "sysfs"), (None, "none")]
)
def test_no_node_from_sysfs(fake_driver, tmp_path, numa_node, source):
    # -1 (one socket, NUMA off), something unreadable as a node, or no such PCI device: no node.
    root = fake_sysfs(tmp_path, numa_node=numa_node, node_cpus={0: "0-3"})
    assert _core.numa_placement(0, sys_root=root) == {"node": -1, "source": source, "cpus": []}


def test_a_node_without_cpus_of_this_process_binds_no_thread(fake_driver, tmp_path):
    fake_driver.set_host_numa_attribute(True)
    fake_driver.set_host_numa_id(0, 2)
    root = fake_sysfs(tmp_path, numa_node=None, node_cpus={2: f"{max(allowed_cpus()) + 1}"})
    assert _core.numa_placement(0, sys_root=root) == {"node": 2, "source": "driver", "cpus": []}


def a_node_of_this_process() -> int:
    """A NUMA node of this host (its own /sys) with CPUs this process may run on: the node the
    fake's attribute names must be one the host lists, and one the io threads can be bound to.
    Every Linux host lists at least node 0, holding CPUs."""
    mine = set(allowed_cpus())
    root = "/sys/devices/system/node"
    nodes = sorted(int(n[4:]) for n in os.listdir(root) if n.startswith("node") and n[4:].isdigit())
    for node in nodes:
        with open(f"{root}/node{node}/cpulist") as f:
            if mine & set(cpu_list(f.read())):
                return node
    raise AssertionError(f"no node in {root} ({nodes}) holds a CPU of this process ({mine})")


def cpu_list(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def test_a_load_is_placed_on_the_gpus_node(fake_driver, write_checkpoint):
    node = a_node_of_this_process()
    fake_driver.set_host_numa_attribute(True)
    fake_driver.set_host_numa_id(0, node)
    node_cpus = _core.numa_placement(0)["cpus"]
    assert node_cpus
    directory = write_checkpoint([{"w": torch.arange(4096, dtype=torch.float32)}])
    path = next(directory.glob("*.safetensors"))
    pipeline = _core.LoadPipeline(
        "cuda:0",
        staging_slots=4,
        staging_slot_bytes=1 << 20,
        copy_streams=2,
        io_threads=2,
        use_pinned_host_fallback=True,
    )
    try:
        source = _core.ShardSource(path.name, size=path.stat().st_size, path=str(path))
        session = pipeline.start_local([source])
        while session.next_shard() is not None:
            pass
        session.wait_landed()
        stats = session.stats()
        session.close()
    finally:
        pipeline.close()
    assert (stats.numa_node, stats.numa_source) == (node, "driver")
    assert stats.numa_cpus == len(node_cpus)  # the io threads were bound to the node's CPUs
    with blob2gpu.open(str(directory), device="cuda", framework="dlpack") as checkpoint:
        assert {n: v.to_bytes() for n, v in checkpoint.to_dict().items()} == expected(directory)
        assert checkpoint.report.numa_node == node


def test_placement_can_be_turned_off(fake_driver, write_checkpoint):
    fake_driver.set_host_numa_attribute(True)
    fake_driver.set_host_numa_id(0, 0)
    directory = write_checkpoint([{"w": torch.ones(64)}])
    with blob2gpu.Loader(bind_numa_node=False) as loader:
        with loader.open(str(directory), device="cuda", framework="dlpack") as checkpoint:
            checkpoint.to_dict()
            assert checkpoint.report.numa_node == -1


# (set_mempolicy, get_mempolicy) syscall numbers; MPOL_INTERLEAVE.
MEMPOLICY_SYSCALLS = {"x86_64": (238, 239), "aarch64": (237, 236)}
MPOL_DEFAULT, MPOL_INTERLEAVE = 0, 3


def test_a_threads_own_memory_policy_is_restored_after_placement(fake_driver):
    """A pipeline made on a thread started under `numactl --interleave` leaves it interleaving
    (restoring MPOL_DEFAULT dropped the policy the thread had)."""
    import ctypes
    import platform
    import threading

    set_number, get_number = MEMPOLICY_SYSCALLS[platform.machine()]
    libc = ctypes.CDLL(None, use_errno=True)
    fake_driver.set_host_numa_attribute(True)
    fake_driver.set_host_numa_id(0, 0)
    seen: list[int] = []

    def make_pipeline() -> None:  # on a thread of its own: its policy changes nothing else
        mask = (ctypes.c_ulong * 16)(1)  # node 0
        if libc.syscall(set_number, MPOL_INTERLEAVE, mask, 1024) != 0:
            seen.append(-ctypes.get_errno())
            return
        pipeline = _core.LoadPipeline(
            "cuda:0",
            staging_slots=2,
            staging_slot_bytes=1 << 20,
            copy_streams=1,
            io_threads=1,
            use_pinned_host_fallback=True,
        )
        pipeline.close()
        mode, nodes = ctypes.c_int(-1), (ctypes.c_ulong * 16)()
        libc.syscall(get_number, ctypes.byref(mode), nodes, 1024, None, 0)
        seen.extend([mode.value, nodes[0]])

    thread = threading.Thread(target=make_pipeline)
    thread.start()
    thread.join()
    # set_mempolicy refused (seen [-errno]) would leave nothing to restore: the host must allow it,
    # as the placement itself needs.
    assert seen == [MPOL_INTERLEAVE, 1]
