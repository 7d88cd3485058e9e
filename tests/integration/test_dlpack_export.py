"""DLPack export: versioned and legacy capsules, device tuples, lifetimes, torch and numpy."""

from __future__ import annotations

import gc

import blob2gpu
import numpy as np
import pytest
import torch
from blob2gpu import _core
from conftest import random_tensor


@pytest.fixture
def views(write_checkpoint):
    directory = write_checkpoint(
        [{"w": random_tensor(torch.float32, (4, 6)), "b": torch.arange(3, dtype=torch.int16)}]
    )
    return blob2gpu.load(str(directory), framework="dlpack")


def test_capsule_kinds_follow_max_version(views):
    w = views["w"]
    assert "dltensor_versioned" in repr(w.__dlpack__(max_version=(1, 1)))
    assert "dltensor_versioned" in repr(w.__dlpack__(max_version=(2, 0)))
    assert '"dltensor"' in repr(w.__dlpack__())
    assert '"dltensor"' in repr(w.__dlpack__(max_version=(0, 8)))
    assert w.__dlpack_device__() == (1, 0)


def test_torch_and_numpy_consume_without_copying(views):
    w = views["w"]
    t = torch.from_dlpack(w)
    a = np.from_dlpack(w)
    assert t.data_ptr() == a.ctypes.data == w.data_ptr
    t[0, 0] = 7.0
    assert a[0, 0] == 7.0  # same memory


def test_tensor_outlives_checkpoint_view_and_loader(write_checkpoint):
    directory = write_checkpoint([{"w": torch.arange(10, dtype=torch.float64)}])
    gc.collect()
    before = _core.live_arena_count()
    with blob2gpu.Loader() as loader:
        t = loader.load(str(directory))["w"]
    gc.collect()
    assert _core.live_arena_count() == before + 1
    assert torch.equal(t, torch.arange(10, dtype=torch.float64))
    del t
    gc.collect()
    assert _core.live_arena_count() == before


def test_unconsumed_capsule_releases_its_arena(write_checkpoint):
    directory = write_checkpoint([{"w": torch.ones(5)}])
    gc.collect()
    before = _core.live_arena_count()
    views = blob2gpu.load(str(directory), framework="dlpack")
    capsules = [views["w"].__dlpack__(), views["w"].__dlpack__(max_version=(1, 0))]
    del views
    gc.collect()
    assert _core.live_arena_count() == before + 1
    del capsules
    gc.collect()
    assert _core.live_arena_count() == before


def test_as_bytes_view_of_subbyte_and_wide_dtypes(tmp_path):
    from conftest import raw_safetensors

    file = raw_safetensors(
        tmp_path / "x.safetensors",
        [("f4", "F4", [2, 4], b"\x12\x34\x56\x78"), ("bf", "BF16", [2, 3], bytes(range(12)))],
    )
    views = blob2gpu.load(str(file), framework="dlpack")
    assert views["f4"].as_bytes().shape == (4,)
    assert views["bf"].as_bytes().shape == (2, 6)
    assert bytes(np.from_dlpack(views["bf"].as_bytes()).reshape(-1)) == bytes(range(12))


def test_unsupported_dtype_raises_or_returns_bytes(tmp_path):
    from conftest import raw_safetensors

    file = raw_safetensors(tmp_path / "x.safetensors", [("f4", "F4", [2, 4], b"\x12\x34\x56\x78")])
    with pytest.raises(blob2gpu.errors.DTypeNotSupported, match="unsupported_dtype='bytes'"):
        blob2gpu.load(str(file), framework="numpy")
    got = blob2gpu.load(str(file), framework="numpy", unsupported_dtype="bytes")
    assert got["f4"].dtype == np.uint8 and bytes(got["f4"]) == b"\x12\x34\x56\x78"


def test_dtype_table_comes_from_the_core():
    table = {row["name"]: row for row in _core.dtype_table()}
    assert table["F8_E4M3"]["dlpack_code"] == 10 and table["F8_E4M3"]["bits"] == 8
    assert table["BF16"]["dlpack_code"] == 4 and table["F4"]["bits"] == 4
    assert len(table) == 22
