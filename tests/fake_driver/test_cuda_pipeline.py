"""The CUDA path over the fake driver: asynchronous copies, slot recycling by events, fences that
consumer streams wait on, pinned fallback, and out-of-memory that releases everything."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import blob2gpu
import pytest
import torch
from blob2gpu import errors
from conftest import checkpoint_bytes as expected
from conftest import random_tensor, raw_safetensors


def shards(count: int, rows: int = 64, cols: int = 256, per_shard: int = 4):
    return [
        {
            f"s{s}.w{i}": random_tensor(torch.float32, (rows, cols), seed=s * 100 + i)
            for i in range(per_shard)
        }
        for s in range(count)
    ]


def test_slots_are_never_reused_before_their_copy_completes(fake_driver, write_checkpoint):
    # Slow copies and a tiny ring: every slot is refilled many times while copies are still
    # pending. A slot reused before its event completed would show up as wrong bytes.
    directory = write_checkpoint(shards(3))
    fake_driver.set_copy_delay_us(1500)
    with blob2gpu.open(
        str(directory),
        device="cuda",
        framework="dlpack",
        staging_slots=3,
        staging_slot_bytes=16384,
        io_threads=4,
        copy_streams=2,
    ) as checkpoint:
        got = {name: view.to_bytes() for name, view in checkpoint.to_dict().items()}
        report = checkpoint.report
    assert got == expected(directory)
    assert fake_driver.h2d_copies() >= 3 * 4 * 65536 // 16384
    assert report.peak_slots_in_flight >= 2  # invariant: a copy overlaps the next fill
    assert fake_driver.max_pending_h2d_copies() >= 2
    assert report.slot_waits > 0 and report.pinned and not report.pinned_fallback


def test_tensors_are_handed_out_before_copies_land_and_consumers_wait_on_events(
    fake_driver, write_checkpoint
):
    directory = write_checkpoint(shards(2, per_shard=2))
    fake_driver.set_copy_delay_us(20000)
    with blob2gpu.open(
        str(directory), device="cuda", framework="dlpack", staging_slot_bytes=65536
    ) as checkpoint:
        name, view = next(iter(checkpoint))
        # No host-side wait happened: the view exists while its copies are still queued.
        assert fake_driver.h2d_copies() < 4
        # A consumer reading through its own stream waits on the fence, on the device.
        assert view.to_bytes() == expected(directory)[name]
        checkpoint.to_dict()


def test_dlpack_stream_argument_makes_the_consumer_stream_wait(fake_driver, write_checkpoint):
    directory = write_checkpoint(shards(1, per_shard=1))
    fake_driver.set_copy_delay_us(20000)
    with blob2gpu.open(str(directory), device="cuda", framework="dlpack") as checkpoint:
        _, view = next(iter(checkpoint))
        for stream in (None, 1, 2, -1):
            capsule = view.__dlpack__(stream=stream, max_version=(1, 0))
            assert "dltensor_versioned" in repr(capsule)
        with pytest.raises(BufferError, match="ambiguous"):
            view.__dlpack__(stream=0)
        checkpoint.to_dict()


@pytest.mark.parametrize("stream", [-2, -(2**63), 2**64])
def test_dlpack_stream_that_names_no_stream_is_refused(fake_driver, write_checkpoint, stream):
    # Below -1 (or past 64 bits) a value is no CUDA stream: refused, never handed to the driver
    # as a handle (on a GPU that is undefined behaviour; the fake records it as a violation).
    directory = write_checkpoint(shards(1, per_shard=1))
    with blob2gpu.open(str(directory), device="cuda", framework="dlpack") as checkpoint:
        _, view = next(iter(checkpoint))
        with pytest.raises(errors.InvalidArgument, match="is not a CUDA stream"):
            view.__dlpack__(stream=stream, max_version=(1, 0))
        checkpoint.to_dict()


def test_a_refused_copy_leaves_its_slot_to_the_event_of_the_copies_before_it(fake_driver, tmp_path):
    # One slot, two copies: the shard's arena and a realigned tensor's own arena (f32 at offset
    # 3). The second copy is refused while the first is still queued (slow copies): the slot must
    # not go back to the ring at once, or the load's clean-up frees the arenas (and the next load
    # reuses the slot) while that copy still reads and writes them.
    f32 = random_tensor(torch.float32, (1024,), 1).numpy().tobytes()
    file = raw_safetensors(
        tmp_path / "odd.safetensors", [("u8", "U8", [3], b"abc"), ("f32", "F32", [1024], f32)]
    )
    gc.collect()
    before = fake_driver.live_device_allocations()
    fake_driver.set_copy_delay_us(300_000)
    fake_driver.fail_copy_after(1)
    with pytest.raises(errors.CudaError, match="cuMemcpyHtoDAsync"):
        blob2gpu.load(str(file), device="cuda", framework="dlpack")
    gc.collect()
    assert fake_driver.live_device_allocations() == before


def test_copy_to_cpu_through_dlpack(fake_driver, write_checkpoint):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (8, 8))}])
    view = blob2gpu.load(str(directory), device="cuda", framework="dlpack")["w"]
    assert view.__dlpack_device__() == (2, 0)
    capsule = view.__dlpack__(dl_device=(1, 0), copy=True, max_version=(1, 0))
    host = torch.from_dlpack(capsule)
    assert host.numpy().tobytes() == expected(directory)["w"]
    with pytest.raises(BufferError):
        view.__dlpack__(copy=True, max_version=(1, 0))  # same-device copy
    with pytest.raises(BufferError):
        view.__dlpack__(dl_device=(1, 0), copy=False, max_version=(1, 0))


def test_pinning_refused_falls_back_to_pageable_and_says_so(fake_driver, write_checkpoint):
    directory = write_checkpoint(shards(2))
    fake_driver.fail_host_alloc_after(0)
    with blob2gpu.open(str(directory), device="cuda", framework="dlpack") as checkpoint:
        got = {n: v.to_bytes() for n, v in checkpoint.to_dict().items()}
        report = checkpoint.report
    assert got == expected(directory)
    assert report.pinned_fallback and not report.pinned
    assert fake_driver.pageable_h2d_copies() > 0


def test_pinning_refused_without_fallback_is_a_typed_error(fake_driver, write_checkpoint):
    directory = write_checkpoint(shards(1))
    host_before = fake_driver.live_host_allocations()
    fake_driver.fail_host_alloc_after(3)  # the 4th slot is refused
    with pytest.raises(errors.PinnedMemoryUnavailable, match="use_pinned_host_fallback"):
        blob2gpu.load(str(directory), device="cuda", use_pinned_host_fallback=False)
    assert fake_driver.live_host_allocations() == host_before


def test_out_of_memory_mid_load_releases_everything(fake_driver, write_checkpoint):
    directory = write_checkpoint(shards(5))
    gc.collect()
    device_before = fake_driver.live_device_allocations()
    host_before = fake_driver.live_host_allocations()
    arenas_before = blob2gpu._core.live_arena_count()
    fake_driver.set_copy_delay_us(500)
    fake_driver.fail_device_alloc_after(2)  # third shard's arena is refused
    with pytest.raises(errors.GPUOutOfMemory, match="model-0000"):
        blob2gpu.load(str(directory), device="cuda", framework="dlpack")
    gc.collect()
    assert fake_driver.live_device_allocations() == device_before
    assert fake_driver.live_host_allocations() == host_before
    assert blob2gpu._core.live_arena_count() == arenas_before


def test_vram_budget_exceeded_names_shard_and_sizes(fake_driver, write_checkpoint):
    directory = write_checkpoint(shards(2, rows=512))  # 2 MiB per shard
    gc.collect()
    device_before = fake_driver.live_device_allocations()
    fake_driver.set_vram_budget(fake_driver.live_device_bytes() + (3 << 20))
    try:
        with pytest.raises(errors.GPUOutOfMemory) as info:  # mid-load: the guardrail is off
            blob2gpu.load(str(directory), device="cuda", framework="dlpack", check_memory_fit=False)
    finally:
        fake_driver.set_vram_budget(8 << 30)
    # Whichever shard's arena came second is refused.
    assert "shard 'model-0000" in str(info.value) and "MiB free" in str(info.value)
    hint = "free GPU memory, use a larger GPU, or load fewer tensors"  # the core's, for code
    assert info.value.hint == hint and str(info.value).endswith(f"); {hint}")
    gc.collect()
    assert fake_driver.live_device_allocations() == device_before


def test_freeing_tensors_frees_device_memory(fake_driver, write_checkpoint):
    directory = write_checkpoint(shards(3))
    before = fake_driver.live_device_allocations()
    tensors = blob2gpu.load(str(directory), device="cuda", framework="dlpack")
    assert fake_driver.live_device_allocations() == before + 3  # one arena per shard
    keep = tensors["s1.w2"].__dlpack__(max_version=(1, 0))  # a capsule keeps its arena alive
    del tensors
    assert fake_driver.live_device_allocations() == before + 1
    del keep
    assert fake_driver.live_device_allocations() == before


def test_device_ordinal_out_of_range(fake_driver, write_checkpoint):
    directory = write_checkpoint(shards(1))
    with pytest.raises(errors.InvalidArgument, match="cuda:3 does not exist"):
        blob2gpu.load(str(directory), device="cuda:3")


def test_second_device(fake_driver, write_checkpoint):
    directory = write_checkpoint(shards(1))
    fake_driver.set_device_count(2)
    try:
        view = blob2gpu.load(str(directory), device="cuda:1", framework="dlpack")["s0.w0"]
        assert view.__dlpack_device__() == (2, 1) and view.device == "cuda:1"
        assert view.to_bytes() == expected(directory)["s0.w0"]
    finally:
        del view
        fake_driver.set_device_count(1)


def test_missing_driver_is_a_typed_error(write_checkpoint, tmp_path):
    directory = write_checkpoint(shards(1))
    code = (
        "import blob2gpu, sys\n"
        "try:\n"
        f"    blob2gpu.load({str(directory)!r}, device='cuda')\n"
        "except blob2gpu.errors.CudaDriverUnavailable as e:\n"
        "    print('typed:', e)\n"
        "    print('status:', e.driver_status.name, blob2gpu._core.driver_info()['status'].name)\n"
        "    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    env = dict(os.environ, BLOB2GPU_CUDA_DRIVER=str(tmp_path / "no-such-libcuda.so"))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "no-such-libcuda.so" in run.stdout and "device='cpu'" in run.stdout
    assert "status: NOT_FOUND NOT_FOUND" in run.stdout  # a field code reads, not the message
    # The command line says the same in its own syntax.
    cli = subprocess.run(
        [sys.executable, "-m", "blob2gpu", "load", str(directory), "--device", "cuda"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "CudaDriverUnavailable" in cli.stderr
    assert "--device cpu" in cli.stderr and "device='cpu'" not in cli.stderr


def test_reused_loader_keeps_its_ring(fake_driver, write_checkpoint):
    directory = write_checkpoint(shards(2))
    with blob2gpu.Loader(staging_slots=4, staging_slot_bytes=65536) as loader:
        loader.load(str(directory), device="cuda", framework="dlpack")
        host_allocs = fake_driver.live_host_allocations()
        assert host_allocs == 4
        for _ in range(3):
            got = loader.load(str(directory), device="cuda", framework="dlpack")
            assert fake_driver.live_host_allocations() == host_allocs
        assert {n: v.to_bytes() for n, v in got.items()} == expected(directory)
    assert fake_driver.live_host_allocations() == 0
