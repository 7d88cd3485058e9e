"""The memory-fit guardrail: before any download, free GPU memory (or host RAM) is checked against
the weights x headroom; a checkpoint that cannot fit fails at once, naming both numbers and what
to change, with nothing read and nothing allocated."""

from __future__ import annotations

import blob2gpu
import pytest
import torch
from blob2gpu import _core, errors
from conftest import random_tensor, sparse_checkpoint, upload_directory


def test_checkpoint_larger_than_host_memory_fails_before_reading(tmp_path):
    shard = sparse_checkpoint(tmp_path / "huge.safetensors", 4 << 40)  # 4 TiB
    before = _core.live_arena_count()
    with pytest.raises(errors.InsufficientHostMemory, match=r"needs 4837.*GB of host memory") as e:
        blob2gpu.load(str(shard))
    assert "host_headroom_factor 1.1" in str(e.value) and "available" in str(e.value)
    assert "host_headroom_factor=1.0" in e.value.hint and str(e.value).endswith(e.value.hint)
    assert _core.live_arena_count() == before


def test_checkpoint_larger_than_free_gpu_memory_fails_before_reading(fake_driver, tmp_path):
    shard = sparse_checkpoint(tmp_path / "huge.safetensors", 20 << 30)  # fake GPU: 8 GiB
    allocations = fake_driver.live_device_allocations()
    with pytest.raises(errors.InsufficientGPUMemory) as info:
        blob2gpu.load(str(shard), device="cuda")
    message = str(info.value)
    assert "cuda:0 has 8.59 GB free of 8.59 GB" in message
    assert "23.62 GB (21.47 GB of weights x gpu_headroom_factor 1.1)" in message
    assert "lower gpu_headroom_factor" in message
    assert info.value.hint.startswith("free GPU memory") and message.endswith(info.value.hint)
    assert fake_driver.live_device_allocations() == allocations
    assert fake_driver.h2d_copies() == 0


def test_headroom_factor_is_a_setting(fake_driver, write_checkpoint):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (256, 256))}])  # 256 KiB
    fake_driver.set_vram_budget(fake_driver.live_device_bytes() + 300_000)
    try:
        with pytest.raises(errors.InsufficientGPUMemory, match="gpu_headroom_factor 1.5"):
            blob2gpu.load(str(directory), device="cuda", gpu_headroom_factor=1.5)
        got = blob2gpu.load(str(directory), device="cuda", framework="dlpack")
        assert list(got) == ["w"]
    finally:
        fake_driver.set_vram_budget(8 << 30)


def test_blob_checkpoint_that_cannot_fit_sends_no_get(
    fake_driver, write_checkpoint, azurite, container, fault_proxy, monkeypatch
):
    directory = write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float32, (256, 256), s)} for s in range(3)]
    )
    upload_directory(azurite, container, directory, "m")
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    fake_driver.set_vram_budget(fake_driver.live_device_bytes() + 500_000)
    try:
        with pytest.raises(errors.InsufficientGPUMemory):
            blob2gpu.load(f"az://{container}/m", device="cuda")
    finally:
        fake_driver.set_vram_budget(8 << 30)
    weight_gets = [p for p in fault_proxy.counters.paths if p.endswith(".safetensors")]
    assert weight_gets == []
