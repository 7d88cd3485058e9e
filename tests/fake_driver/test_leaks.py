"""Repeated loads leak nothing: 200 load/free cycles leave no arena, device or pinned allocation,
and resident memory does not grow beyond noise."""

from __future__ import annotations

import gc
import os
import resource

import blob2gpu
import pytest
import torch
from blob2gpu import _core
from conftest import random_tensor


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.parametrize(
    "reuse_loader,streamed",
    [(False, False), (True, False), (True, True)],
    ids=["fresh-loader", "reused-loader", "streamed"],
)
def test_200_load_free_cycles(device, write_checkpoint, request, reuse_loader, streamed):
    directory = write_checkpoint(
        [
            {f"s{s}.w{i}": random_tensor(torch.float16, (64, 64), s + i) for i in range(3)}
            for s in range(2)
        ]
    )
    framework = "torch" if device == "cpu" else "dlpack"
    loader = blob2gpu.Loader(staging_slots=2, staging_slot_bytes=8192) if reuse_loader else None

    def cycle() -> None:
        if streamed:  # tensor groups cut from a bounded pool, given back and reused
            assert loader is not None
            with loader.open(
                str(directory), device=device, framework=framework, streamed_device_bytes=20000
            ) as checkpoint:
                assert sum(1 for _ in checkpoint.stream()) == 6
            return
        if loader is not None:
            tensors = loader.load(str(directory), device=device, framework=framework)
        else:
            tensors = blob2gpu.load(
                str(directory),
                device=device,
                framework=framework,
                staging_slots=2,
                staging_slot_bytes=8192,
            )
        assert len(tensors) == 6

    for _ in range(20):  # warm up allocator pools and import caches
        cycle()
    gc.collect()
    arenas, rss = _core.live_arena_count(), rss_bytes()
    for _ in range(200):
        cycle()
    gc.collect()
    assert _core.live_arena_count() == arenas == 0
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):  # ASan's quarantine holds freed memory
        assert rss_bytes() - rss < 16 << 20
    if loader is not None:
        loader.close()
    if device == "cuda" and "fake_driver" in request.fixturenames:
        driver = request.getfixturevalue("fake_driver")
        assert driver.live_device_allocations() == 0
        assert driver.live_host_allocations() == 0
        assert driver.live_streams() == 0 and driver.live_events() == 0
