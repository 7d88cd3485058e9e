"""Loaded bytes equal what safetensors reads, for every dtype and shape, on cpu and on cuda."""

from __future__ import annotations

import gc
import itertools
import weakref
from pathlib import Path

import blob2gpu
import numpy as np
import pytest
import torch
from conftest import (
    RAW_DTYPE_BITS,
    TORCH_DTYPES,
    as_bytes,
    load_bytes,
    random_tensor,
    raw_safetensors,
    reference_bytes,
    upload_directory,
)
from conftest import checkpoint_bytes as expected

SMALL_SLOTS = {"staging_slots": 2, "staging_slot_bytes": 4096}


def test_every_dtype_is_byte_equal(device, write_checkpoint, tmp_path):
    tensors = {
        f"t_{name}": random_tensor(dtype, (3, 5), seed=i)
        for i, (name, dtype) in enumerate(TORCH_DTYPES.items())
    }
    directory = write_checkpoint([tensors], index=False)
    # The dtypes safetensors cannot write from torch, by hand: 8-bit E8M0, packed F6 and F4.
    entries = [
        (f"t_{name}", name, [4, 8], bytes(range(bits * 4))) for name, bits in RAW_DTYPE_BITS.items()
    ]
    raw_safetensors(directory / "model-extra.safetensors", entries)
    got = blob2gpu.load(str(directory), device=device, framework="dlpack")
    ref = expected(directory)
    assert set(got) == set(ref)
    for name, view in got.items():
        assert view.to_bytes() == ref[name], name
    assert {v.dtype for v in got.values()} == set(TORCH_DTYPES) | set(RAW_DTYPE_BITS)


def test_torch_tensors_match_dtype_and_shape(write_checkpoint):
    tensors = {
        f"t_{name}": random_tensor(dtype, (2, 3), seed=i)
        for i, (name, dtype) in enumerate(TORCH_DTYPES.items())
    }
    directory = write_checkpoint([tensors])
    got = blob2gpu.load(str(directory), device="cpu", framework="torch")
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


def test_a_path_object_names_a_checkpoint_as_its_string_does(write_checkpoint):
    directory = write_checkpoint([{"a": random_tensor(torch.float32, (4, 4), seed=1)}])
    assert isinstance(directory, Path)  # the fixture hands back a pathlib.Path
    assert torch.equal(blob2gpu.load(directory)["a"], blob2gpu.load(str(directory))["a"])
    with blob2gpu.open(directory / "model-00001-of-00001.safetensors") as checkpoint:
        assert list(checkpoint.keys()) == ["a"]
    with blob2gpu.Loader() as loader:
        assert list(loader.load(directory)) == ["a"]


def test_numpy_arrays_match(write_checkpoint):
    tensors = {
        "f32": random_tensor(torch.float32, (4, 4)),
        "i64": random_tensor(torch.int64, (7,)),
        "bool": random_tensor(torch.bool, (3,)),
    }
    directory = write_checkpoint([tensors])
    got = blob2gpu.load(str(directory), device="cpu", framework="numpy")
    for name, t in tensors.items():
        assert isinstance(got[name], np.ndarray)
        np.testing.assert_array_equal(got[name], t.numpy())


def test_empty_and_zero_dim_tensors(device, write_checkpoint):
    tensors = {
        "empty": torch.zeros((0, 3)),
        "empty_i8": torch.zeros((5, 0), dtype=torch.int8),
        "scalar": torch.tensor(3.5),
        "scalar_bf16": torch.tensor(1.25, dtype=torch.bfloat16),
        "after": random_tensor(torch.float16, (9,)),
    }
    directory = write_checkpoint([tensors])
    assert load_bytes(directory, device) == expected(directory)
    if device == "cpu":
        got = blob2gpu.load(str(directory))
        assert got["empty"].shape == (0, 3) and got["scalar"].shape == ()
        assert got["scalar"].item() == 3.5


def test_shard_of_only_empty_tensors(device, write_checkpoint):
    directory = write_checkpoint([{"nothing": torch.zeros((0,))}, {"x": torch.ones(4)}])
    assert load_bytes(directory, device) == expected(directory)


def test_tensor_larger_than_a_slot(device, write_checkpoint):
    tensors = {"big": random_tensor(torch.float32, (300, 1000)), "small": torch.ones(3)}
    directory = write_checkpoint([tensors])
    assert load_bytes(directory, device, **SMALL_SLOTS) == expected(directory)


def test_header_larger_than_a_slot(device, write_checkpoint):
    tensors = {
        f"layer.{i}.a_rather_long_parameter_name.weight": random_tensor(torch.float16, (3,), i)
        for i in range(400)
    }
    directory = write_checkpoint([tensors], metadata={"note": "x" * 5000})
    header_len = int.from_bytes(next(directory.glob("*.safetensors")).read_bytes()[:8], "little")
    assert header_len > SMALL_SLOTS["staging_slot_bytes"]
    assert load_bytes(directory, device, **SMALL_SLOTS) == expected(directory)


@pytest.mark.parametrize("form", ["directory", "index", "directory_without_index", "file_url"])
def test_many_shards_every_uri_form(device, write_checkpoint, form):
    shards = [
        {f"s{s}.w{i}": random_tensor(torch.bfloat16, (64, 33), seed=s * 10 + i) for i in range(5)}
        for s in range(8)
    ]
    directory = write_checkpoint(shards, index=form != "directory_without_index")
    uri = {
        "directory": str(directory),
        "directory_without_index": str(directory),
        "index": str(directory / "model.safetensors.index.json"),
        "file_url": f"file://{directory}",
    }[form]
    assert load_bytes(uri, device) == expected(directory)


def test_single_file(device, write_checkpoint):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (17, 3))}], index=False)
    file = next(directory.glob("*.safetensors"))
    assert load_bytes(file, device) == reference_bytes(file)


def test_misaligned_tensor_gets_its_own_aligned_allocation(device, tmp_path):
    f32 = np.arange(4, dtype=np.float32).tobytes()
    file = raw_safetensors(
        tmp_path / "odd.safetensors",
        [("u8", "U8", [3], b"\x01\x02\x03"), ("f32", "F32", [4], f32)],
        pad=False,
    )
    framework = "torch" if device == "cpu" else "dlpack"
    # Read into a fresh arena (not mapped), so the data region starts aligned and only the F32
    # tensor at offset 3 is misaligned.
    with blob2gpu.open(
        str(file), device=device, framework=framework, mmap_local_files=False
    ) as checkpoint:
        got = checkpoint.to_dict()
        report = checkpoint.report
    assert as_bytes(got["f32"]) == f32 and as_bytes(got["u8"]) == b"\x01\x02\x03"
    ptr = got["f32"].data_ptr() if device == "cpu" else got["f32"].data_ptr
    assert ptr % 4 == 0
    assert report.shards[0].realigned_tensors == 1
    if device == "cpu":
        assert torch.equal(got["f32"], torch.arange(4, dtype=torch.float32))


def test_mmap_mode_maps_instead_of_reading(write_checkpoint):
    tensors = {"a": random_tensor(torch.float32, (100, 10)), "b": random_tensor(torch.int8, (33,))}
    directory = write_checkpoint([tensors])
    with blob2gpu.open(str(directory), mmap_local_files=True) as checkpoint:
        got = checkpoint.to_dict()
        assert checkpoint.report.mmap
    for name, t in tensors.items():
        assert as_bytes(got[name]) == as_bytes(t), name
    got["a"][0, 0] = 42.0  # copy-on-write: the file is not touched
    assert load_bytes(directory, "cpu") == expected(directory)


def test_checkpoint_api_iterates_in_arrival_order(write_checkpoint):
    shards = [
        {f"s{s}.t{i}": torch.full((4,), float(s * 10 + i)) for i in range(3)} for s in range(4)
    ]
    directory = write_checkpoint(shards, metadata={"format": "pt"})
    with blob2gpu.open(str(directory)) as checkpoint:
        seen = [name for name, _ in checkpoint]
        assert sorted(seen) == sorted(checkpoint.keys())
        assert checkpoint.metadata == {"format": "pt"}
        assert checkpoint.get("s2.t1")[0].item() == 21.0
        assert "s3.t2" in checkpoint and len(checkpoint) == 12
        with pytest.raises(KeyError):
            checkpoint.get("missing")
    # Within a shard, tensors come in file order; shards may interleave in arrival order only.
    by_shard = [[n for n in seen if n.startswith(f"s{s}.")] for s in range(4)]
    assert all(group == sorted(group) for group in by_shard)


def test_streaming_hands_tensors_out_without_keeping_them(write_checkpoint, blob_env, container):
    # A serving engine copies each tensor into its own parameters: the checkpoint must not hold
    # a second copy of the weights, and the index checks still run at the end.
    directory = write_checkpoint(
        [{f"s{s}.t{i}": torch.full((4,), float(s * 10 + i)) for i in range(3)} for s in range(3)]
    )
    upload_directory(blob_env, container, directory, "m")
    for uri in (str(directory), f"az://{container}/m"):
        with blob2gpu.open(uri) as checkpoint:
            values, handed_out = {}, []
            for name, tensor in checkpoint.stream():
                values[name] = tensor[0].item()
                handed_out.append(weakref.ref(tensor))
            del tensor
            gc.collect()
            assert [ref() for ref in handed_out] == [None] * 9  # none kept behind the consumer
            assert checkpoint.finished and checkpoint.report.tensors == 9
            with pytest.raises(blob2gpu.errors.InvalidArgument, match="streamed"):
                checkpoint.keys()
        assert values == {f"s{s}.t{i}": float(s * 10 + i) for s in range(3) for i in range(3)}


def test_what_a_stream_left_is_where_the_next_consumer_goes_on(write_checkpoint):
    # A consumer that stops early (a serving engine's load_weights), then another stream() or
    # an iteration: every tensor reaches one of them, once; none of an arrived group is lost.
    directory = write_checkpoint(
        [{f"s{s}.t{i}": torch.full((4,), float(s * 10 + i)) for i in range(3)} for s in range(3)]
    )
    everything = [f"s{s}.t{i}" for s in range(3) for i in range(3)]
    for then in ("iterate", "stream"):
        with blob2gpu.open(str(directory)) as checkpoint:
            first = [name for name, _ in itertools.islice(checkpoint.stream(), 1)]
            rest = checkpoint if then == "iterate" else checkpoint.stream()
            assert sorted(first + [name for name, _ in rest]) == everything, then


def test_mapped_tensors_are_aligned_too(tmp_path):
    f32 = np.arange(4, dtype=np.float32).tobytes()
    file = raw_safetensors(
        tmp_path / "odd.safetensors",
        [("u8", "U8", [3], b"\x01\x02\x03"), ("f32", "F32", [4], f32)],
        pad=False,
    )
    got = blob2gpu.load(str(file), mmap_local_files=True)
    assert got["f32"].data_ptr() % 4 == 0
    assert torch.equal(got["f32"], torch.arange(4, dtype=torch.float32))
