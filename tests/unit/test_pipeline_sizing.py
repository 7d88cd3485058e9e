"""The pipeline's shape sized from the host: io threads from the CPUs, slots for every reading
thread and two queued copies per stream, slot size within the pinned budget; the cpu target and
what a user set stay as they are."""

from __future__ import annotations

import blob2gpu
import pytest
import torch
from blob2gpu.errors import ConfigError
from blob2gpu.loading.pipelines import HostFacts, pipeline_settings, sized_settings
from blob2gpu.settings import resolve

MiB, GiB = 1 << 20, 1 << 30


def shape(settings: dict[str, object]) -> tuple[object, object, object]:
    return settings["io_threads"], settings["staging_slots"], settings["staging_slot_bytes"]


@pytest.mark.parametrize(
    ("cpus", "memory", "expected"),
    [
        # An 8-GPU node: 16 threads (the most), 16 + 2 x 2 + 2 slots of 32 MiB (704 MiB pinned).
        (192, 2048 * GiB, (16, 22, 32 * MiB)),
        # This kind of machine: 2 CPUs still get 4 threads (reads also wait on the drive).
        (2, 24 * GiB, (4, 10, 32 * MiB)),
        # 8 CPUs, 16 GiB: 8 threads, 14 slots of 32 MiB fit in 512 MiB.
        (8, 16 * GiB, (8, 14, 32 * MiB)),
        # A small host: 128 MiB of pinned budget holds 10 slots of 12 MiB, not 10 of 32.
        (2, 4 * GiB, (4, 10, 12 * MiB)),
        # Less than 64 MiB of budget never: the floor, and 8 MiB slots (8 of them fit).
        (1, 1 * GiB, (4, 8, 8 * MiB)),
    ],
)
def test_a_gpu_pipeline_is_sized_from_the_cpus_and_memory(cpus, memory, expected):
    sized = pipeline_settings(resolve(environ={}), "cuda:0", HostFacts(cpus, memory))
    assert shape(sized) == expected
    assert sized["staging_slots"] * sized["staging_slot_bytes"] <= max(64 * MiB, memory // 32)


def test_the_pinned_budget_bounds_the_ring():
    host = HostFacts(cpus=32, memory_bytes=1024 * GiB)
    settings = resolve({"pinned_staging_bytes": "256MiB"}, environ={})
    sized = pipeline_settings(settings, "cuda:0", host)
    # 16 threads want 22 slots: 256 MiB holds 22 of 11 MiB.
    assert shape(sized) == (16, 22, 11 * MiB)
    settings = resolve({"pinned_staging_bytes": "64MiB"}, environ={})
    # At the 8 MiB floor only 8 fit: fewer slots, never smaller ones.
    assert shape(pipeline_settings(settings, "cuda:0", host)) == (16, 8, 8 * MiB)


def test_what_a_user_sets_is_kept():
    host = HostFacts(cpus=64, memory_bytes=512 * GiB)
    settings = resolve({"io_threads": 3, "staging_slots": 5, "staging_slot_bytes": "4MiB"})
    assert shape(pipeline_settings(settings, "cuda:0", host)) == (3, 5, 4 * MiB)
    # Slots given, their size sized: within the budget for those slots.
    settings = resolve({"staging_slots": 40, "pinned_staging_bytes": "640MiB"}, environ={})
    assert shape(pipeline_settings(settings, "cuda:0", host)) == (16, 40, 16 * MiB)


def test_the_cpu_target_keeps_the_small_fixed_shape():
    # On cpu the ring only holds each fed shard's first range: nothing to size, whatever the host.
    sized = pipeline_settings(resolve(environ={}), "cpu", HostFacts(256, 4096 * GiB))
    assert shape(sized) == (4, 8, 32 * MiB)


@pytest.mark.parametrize(("name", "value"), [("staging_slots", 1), ("staging_slot_bytes", 100)])
def test_zero_is_sized_and_other_small_values_are_refused(name, value):
    assert getattr(resolve({name: 0}, environ={}), name) == 0
    with pytest.raises(ConfigError, match=r"0 \(sized from the host\) or an integer"):
        resolve({name: value}, environ={})


def test_a_request_carries_the_sized_shape_and_says_so(write_checkpoint):
    directory = write_checkpoint([{"w": torch.ones(4)}])
    with blob2gpu.Loader() as loader:
        request = loader.request(str(directory), device="cpu")
    assert (request.settings.io_threads, request.settings.staging_slots) == (4, 8)
    assert request.settings.sources["io_threads"] == "sized from the host for cpu"
    kept = sized_settings(resolve({"io_threads": 2}, environ={}), "cuda:0")
    assert kept.io_threads == 2 and kept.sources["io_threads"] == "argument"


def _cgroup(tmp_path, cpu_max_by_level):
    """A cgroup v2 tree for the process's group /pods/pod1/worker: cpu.max per level given."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text("0::/pods/pod1/worker\n")
    root = tmp_path / "fs"
    for level, text in cpu_max_by_level.items():
        directory = root / level if level else root
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpu.max").write_text(text)
    (root / "pods/pod1/worker").mkdir(parents=True, exist_ok=True)
    return root, proc


def test_the_cgroup_cpu_quota_is_the_tightest_from_the_group_up(tmp_path):
    from blob2gpu.loading.host_memory import cgroup_cpu_quota

    root, proc = _cgroup(tmp_path, {"": "max 100000\n", "pods/pod1": "250000 100000\n"})
    assert cgroup_cpu_quota(root, proc) == 3  # 2.5 CPUs, rounded up
    root, proc = _cgroup(
        tmp_path / "b", {"pods/pod1": "800000 100000\n", "pods/pod1/worker": "50000 100000\n"}
    )
    assert cgroup_cpu_quota(root, proc) == 1
    root, proc = _cgroup(tmp_path / "c", {"": "max 100000\n"})
    assert cgroup_cpu_quota(root, proc) is None  # no quota anywhere
    assert cgroup_cpu_quota(root, tmp_path / "missing") is None
    v1 = tmp_path / "v1"
    v1.write_text("4:cpu,cpuacct:/pods/pod1\n")
    assert cgroup_cpu_quota(root, v1) is None  # cgroup v1: not read


def test_local_ranks_share_the_host():
    from blob2gpu.loading.pipelines import local_ranks

    assert local_ranks({}) == 1
    assert local_ranks({"LOCAL_WORLD_SIZE": "8"}) == 8
    assert local_ranks({"LOCAL_WORLD_SIZE": "0"}) == 1
    assert local_ranks({"LOCAL_WORLD_SIZE": "eight"}) == 1
    alone, shared = HostFacts.probe({}), HostFacts.probe({"LOCAL_WORLD_SIZE": "2"})
    assert shared.cpus == max(1, alone.cpus // 2)
    assert shared.memory_bytes == alone.memory_bytes // 2
