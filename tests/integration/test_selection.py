"""Tensor selections (tensor_names=, tensor_filter=): only the wanted tensors are handed out, only
their bytes are read (local files and Blob, counted at the proxy), the arenas hold only them, a
verified checkpoint is read in whole manifest chunks, and unknown names are typed errors."""

from __future__ import annotations

import gc
import struct
import tracemalloc

import blob2gpu
import pytest
import torch
from blob2gpu import _core, errors
from blob2gpu.integrity.manifest import MANIFEST_NAME, manifest_for_directory
from conftest import as_bytes, prepare_device, random_tensor, raw_safetensors, upload_directory
from conftest import checkpoint_bytes as expected


def layers(count: int = 4, rows: int = 64):
    """`count` shards of one 'layer' each: two bf16 weights and a norm."""
    return [
        {
            f"layers.{s}.attn.w": random_tensor(torch.bfloat16, (rows, 256), s * 3),
            f"layers.{s}.mlp.w": random_tensor(torch.bfloat16, (rows, 512), s * 3 + 1),
            f"layers.{s}.norm": random_tensor(torch.float32, (256,), s * 3 + 2),
        }
        for s in range(count)
    ]


def framework_for(device):
    return "torch" if device == "cpu" else "dlpack"


def load_selected(uri, device, **kwargs):
    with blob2gpu.open(str(uri), device=device, framework=framework_for(device), **kwargs) as c:
        got = {n: as_bytes(t) for n, t in c.to_dict().items()}
        report = c.report
    return got, report


# Each target's ways of landing bytes: cpu read or mapped; cuda direct, host staging, tiny slots.
STRATEGIES = [
    ("cpu", {"mmap_local_files": False}),
    ("cpu", {"mmap_local_files": True}),
    ("cuda", {}),
    ("cuda", {"direct_gpu_load": False}),
    ("cuda", {"staging_slot_bytes": 4096}),
]


@pytest.mark.parametrize(("device", "strategy"), STRATEGIES)
def test_only_the_named_tensors_are_read_and_handed_out(
    request, device, strategy, write_checkpoint
):
    prepare_device(request, device)
    directory = write_checkpoint(layers(), index=False)
    reference = expected(directory)
    wanted = ["layers.1.mlp.w", "layers.3.norm", "layers.3.attn.w"]
    got, report = load_selected(directory, device, tensor_names=wanted, **strategy)
    assert got == {n: reference[n] for n in wanted}
    assert report.tensor_selection == 3 and report.tensors == 3
    needed = sum(len(reference[n]) for n in wanted)
    assert sum(s.needed_bytes for s in report.shards) == needed
    if not strategy.get("mmap_local_files"):
        headers = sum(8 + s.header_bytes for s in report.shards)
        assert report.bytes == headers + needed  # every shard's header, then only those tensors


def test_device_memory_holds_only_the_selection(fake_driver, write_checkpoint):
    directory = write_checkpoint(layers(count=2, rows=256), index=False)
    full = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    gc.collect()
    base = fake_driver.live_device_bytes()
    tensors = blob2gpu.load(
        str(directory),
        device="cuda",
        framework="dlpack",
        tensor_filter=lambda n: n.endswith("norm"),
    )
    assert sorted(tensors) == ["layers.0.norm", "layers.1.norm"]
    held = fake_driver.live_device_bytes() - base
    assert held <= 2 * (1024 + 256) < full // 100  # two norms (and alignment), not two shards
    del tensors
    gc.collect()
    assert fake_driver.live_device_bytes() == base


def test_a_filter_with_an_index_skips_shards_without_a_wanted_tensor(write_checkpoint):
    directory = write_checkpoint(layers())
    got, report = load_selected(directory, "cpu", tensor_filter=lambda n: n.startswith("layers.2"))
    assert sorted(got) == ["layers.2.attn.w", "layers.2.mlp.w", "layers.2.norm"]
    assert [s.name for s in report.shards] == ["model-00003-of-00004.safetensors"]


def test_progress_counts_what_the_selection_reads_and_get_refuses_the_rest(write_checkpoint):
    directory = write_checkpoint(layers(), index=False)
    reference = expected(directory)
    with blob2gpu.open(
        str(directory), tensor_names=["layers.0.norm"], mmap_local_files=False
    ) as checkpoint:
        with pytest.raises(KeyError, match="not among the tensors this load selected"):
            checkpoint.get("layers.1.norm")
        assert as_bytes(checkpoint.get("layers.0.norm")) == reference["layers.0.norm"]
        checkpoint.to_dict()
        done, total = checkpoint.progress()
        headers = sum(8 + s.header_bytes for s in checkpoint.report.shards)
        assert done == total == headers + 1024


def test_misaligned_tensors_are_realigned_inside_a_selection(device, tmp_path):
    # An odd-sized int8 tensor first: the float32 and float64 after it are misaligned in the file.
    data = {
        "bytes": bytes(range(5)),
        "f32": struct.pack("<6f", *range(6)),
        "skip": bytes(1000),
        "f64": struct.pack("<3d", 1.5, -2.0, 3.25),
    }
    path = raw_safetensors(
        tmp_path / "odd.safetensors",
        [
            ("bytes", "I8", [5], data["bytes"]),
            ("f32", "F32", [6], data["f32"]),
            ("skip", "U8", [1000], data["skip"]),
            ("f64", "F64", [3], data["f64"]),
        ],
    )
    got, report = load_selected(path, device, tensor_names=["f32", "f64"])
    assert got == {"f32": data["f32"], "f64": data["f64"]}
    assert report.shards[0].needed_bytes == len(data["f32"]) + len(data["f64"])


def test_a_header_longer_than_the_core_accepts_is_refused_before_it_is_read(tmp_path):
    # Selecting without an index reads each shard's header from Python. A shard (sparse here)
    # whose length prefix claims 150 MB, past the core's cap, is refused with HeaderTooLarge
    # after the first small read: the 150 MB are neither allocated nor read.
    claimed = _core.MAX_HEADER_BYTES + 50_000_000
    directory = tmp_path / "ckpt"
    directory.mkdir()
    with open(directory / "model.safetensors", "wb") as shard:
        shard.write(struct.pack("<Q", claimed) + b"{}")
        shard.truncate(8 + claimed + 4096)
    tracemalloc.start()
    try:
        with pytest.raises(errors.HeaderTooLarge, match=str(claimed)):
            blob2gpu.load(str(directory), tensor_filter=lambda name: True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_empty_selection_and_empty_tensors(write_checkpoint):
    directory = write_checkpoint([{"empty": torch.zeros(0), "w": torch.ones(4)}], index=False)
    assert blob2gpu.load(str(directory), tensor_filter=lambda n: False) == {}
    indexed = write_checkpoint([{"w": torch.ones(4)}], name="indexed")  # every shard skipped
    assert blob2gpu.load(str(indexed), tensor_filter=lambda n: False, verify="auto") == {}
    got = blob2gpu.load(str(directory), tensor_names=["empty"])
    assert list(got) == ["empty"] and got["empty"].numel() == 0


def test_unknown_names_and_bad_arguments(write_checkpoint):
    indexed = write_checkpoint(layers(count=2))
    with pytest.raises(errors.TensorNotFound, match="'nope'.*index"):
        blob2gpu.load(str(indexed), tensor_names=["layers.0.norm", "nope"])
    plain = write_checkpoint(layers(count=2), index=False, name="plain")
    gc.collect()
    arenas = _core.live_arena_count()
    with pytest.raises(errors.TensorNotFound, match="'nope'"):
        blob2gpu.load(str(plain), tensor_names=["layers.0.norm", "nope"])
    gc.collect()
    assert _core.live_arena_count() == arenas
    with pytest.raises(errors.InvalidArgument, match="not both"):
        blob2gpu.load(str(plain), tensor_names=["a"], tensor_filter=lambda n: True)
    with pytest.raises(errors.InvalidArgument, match="list of names"):
        blob2gpu.load(str(plain), tensor_names="layers.0.norm")
    with pytest.raises(errors.InvalidArgument, match="function"):
        blob2gpu.load(str(plain), tensor_filter="layers")


def test_verified_selection_reads_whole_manifest_chunks(device, write_checkpoint):
    directory = write_checkpoint(layers(count=1, rows=256), index=False)
    chunk = 16384
    (directory / MANIFEST_NAME).write_text(manifest_for_directory(directory, chunk).to_json())
    reference = expected(directory)
    got, report = load_selected(directory, device, tensor_names=["layers.0.norm"])
    assert got == {"layers.0.norm": reference["layers.0.norm"]}
    shard = report.shards[0]
    assert len(reference["layers.0.norm"]) <= shard.needed_bytes <= 1024 + 2 * chunk
    assert report.verified_bytes == report.bytes and report.shards[0].checksum == "ok"


def test_corruption_outside_the_selection_is_not_read_inside_it_fails(device, write_checkpoint):
    directory = write_checkpoint(layers(count=1, rows=256), index=False)
    (directory / MANIFEST_NAME).write_text(manifest_for_directory(directory, 16384).to_json())
    path = next(directory.glob("*.safetensors"))
    header = _core.parse_header(path.read_bytes()[: 1 << 16], path.stat().st_size, path.name)
    spans = {t["name"]: (t["begin"], t["end"]) for t in header["tensors"]}
    raw = bytearray(path.read_bytes())
    begin, end = spans["layers.0.mlp.w"]
    raw[header["data_offset"] + (begin + end) // 2] ^= 0x10  # the middle of a 256 KiB tensor
    path.write_bytes(bytes(raw))
    got, _ = load_selected(directory, device, tensor_names=["layers.0.attn.w"])
    assert list(got) == ["layers.0.attn.w"]
    with pytest.raises(errors.ChecksumMismatch, match=path.name):
        load_selected(directory, device, tensor_names=["layers.0.mlp.w"])


def test_blob_selection_fetches_only_the_wanted_bytes(
    device, write_checkpoint, azurite, container, fault_proxy, monkeypatch
):
    directory = write_checkpoint(layers(rows=256))
    upload_directory(azurite, container, directory, "m")
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    reference = expected(directory)
    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    wanted = ["layers.0.norm", "layers.2.mlp.w"]
    got, report = load_selected(
        f"az://{container}/m", device, tensor_names=wanted, chunk_bytes=65536, verify="none"
    )
    assert got == {n: reference[n] for n in wanted}
    assert [s.name for s in report.shards] == [
        "model-00001-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
    ]
    # Two first ranges (<= 1 MiB each, capped by the shard) and the mlp weight's remainder.
    assert fault_proxy.counters.range_bytes < weights // 2
    fault_proxy.reset()
    with pytest.raises(errors.TensorNotFound):  # checked against the index: no weight is read
        blob2gpu.load(f"az://{container}/m", tensor_names=["nope"])
    assert fault_proxy.counters.range_gets <= 1  # the index itself


def test_blob_filter_without_an_index_reads_headers_first(
    write_checkpoint, azurite, container, fault_proxy, monkeypatch
):
    directory = write_checkpoint([layers(count=1, rows=1024)[0]], index=False)
    upload_directory(azurite, container, directory, "one")
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    reference = expected(directory)
    size = next(directory.glob("*.safetensors")).stat().st_size
    got, _ = load_selected(
        f"az://{container}/one",
        "cpu",
        tensor_filter=lambda n: n.endswith("attn.w"),
        chunk_bytes=65536,
        staging_slot_bytes=65536,
    )
    assert got == {"layers.0.attn.w": reference["layers.0.attn.w"]}
    assert fault_proxy.counters.range_bytes < size * 0.6  # attn.w is a third of the shard


def test_selection_reads_cache_hits_and_writes_no_partial_entries(
    write_checkpoint, azurite, container, blob_env, tmp_path
):
    directory = write_checkpoint(layers(count=2))
    upload_directory(azurite, container, directory, "m")
    reference = expected(directory)
    uri = f"az://{container}/m"
    cache = {"local_nvme_cache_enabled": True, "cache_dir": str(tmp_path / "cache")}
    got, report = load_selected(uri, "cpu", tensor_names=["layers.1.norm"], **cache)
    assert got == {"layers.1.norm": reference["layers.1.norm"]}
    assert not report.cache_written and not any((tmp_path / "cache").rglob("*.safetensors*"))
    blob2gpu.load(uri, **cache)  # a whole load fills the cache
    got, report = load_selected(uri, "cpu", tensor_names=["layers.1.norm"], **cache)
    assert got == {"layers.1.norm": reference["layers.1.norm"]}
    assert report.cache_hit_rate == 1.0 and report.tensors == 1


def test_blob_selection_with_headers_longer_than_the_first_range(
    device, write_checkpoint, azurite, container, blob_env
):
    # 200 small tensors: a header of several KiB; 4 KiB ranges (and slots) split it.
    shard = {f"t{i:03d}": random_tensor(torch.float32, (16 + i % 7,), i) for i in range(200)}
    directory = write_checkpoint([shard], index=False)
    upload_directory(azurite, container, directory, "many")
    reference = expected(directory)
    wanted = ["t007", "t100", "t199"]
    settings = {"chunk_bytes": 4096}
    if device != "cpu":
        settings["staging_slot_bytes"] = 4096
    got, report = load_selected(f"az://{container}/many", device, tensor_names=wanted, **settings)
    assert got == {n: reference[n] for n in wanted}
    assert report.shards[0].header_bytes > 4096 and report.tensors == 3


def test_the_fit_check_sizes_a_selection_not_the_shards_it_touches(fake_driver, write_checkpoint):
    # Two ~1.4 MB shards; the GPU has 1 MB free: the norms fit, one mlp weight does not.
    directory = write_checkpoint(layers(count=2, rows=1024), index=False)
    fake_driver.set_vram_budget(fake_driver.live_device_bytes() + 1_000_000)
    try:
        got = blob2gpu.load(
            str(directory),
            device="cuda",
            framework="dlpack",
            tensor_filter=lambda n: n.endswith("norm"),
        )
        assert sorted(got) == ["layers.0.norm", "layers.1.norm"]
        del got
        with pytest.raises(errors.InsufficientGPUMemory, match="the selected tensors needs"):
            blob2gpu.load(str(directory), device="cuda", tensor_names=["layers.0.mlp.w"])
        with pytest.raises(errors.InsufficientGPUMemory, match="loading the checkpoint needs"):
            blob2gpu.load(str(directory), device="cuda")
    finally:
        fake_driver.set_vram_budget(8 << 30)


# --- property: any checkpoint layout, any subset, any slot size --------------------------------
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = {"U8": 1, "F16": 2, "F32": 4, "F64": 8}


@st.composite
def selections(draw):
    """Tensors of random dtypes and lengths laid end to end (so most are misaligned), a random
    subset of them, a slot size, a target and an optional manifest chunk size."""
    count = draw(st.integers(1, 12))
    entries = []
    for i in range(count):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        elements = draw(st.integers(0, 3000))
        data = draw(st.binary(min_size=elements * DTYPES[dtype], max_size=elements * DTYPES[dtype]))
        entries.append((f"t{i}", dtype, [elements], data))
    wanted = draw(st.sets(st.sampled_from([e[0] for e in entries])))
    slot = draw(st.sampled_from([4096, 5000, 16384, 1 << 20]))
    target = draw(st.sampled_from(["cpu", "cpu-mmap", "cuda", "cuda-host-staging"]))
    chunk = draw(st.sampled_from([0, 1000, 4096]))
    return entries, wanted, slot, target, chunk


@hypothesis_settings(
    deadline=None,
    database=None,
    max_examples=100,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(selections())
def test_any_selection_of_any_layout_is_byte_exact(fake_driver, tmp_path_factory, case):
    entries, wanted, slot, target, chunk = case
    directory = tmp_path_factory.mktemp("layout")
    path = raw_safetensors(directory / "m.safetensors", entries)
    if chunk:
        (directory / MANIFEST_NAME).write_text(manifest_for_directory(directory, chunk).to_json())
    settings = {
        "cpu": {"mmap_local_files": False},
        "cpu-mmap": {"mmap_local_files": True},
        "cuda": {"staging_slot_bytes": slot},
        "cuda-host-staging": {"staging_slot_bytes": slot, "direct_gpu_load": False},
    }[target]
    device = "cuda" if target.startswith("cuda") else "cpu"
    got, report = load_selected(path, device, tensor_names=sorted(wanted), **settings)
    assert got == {name: data for name, _, _, data in entries if name in wanted}
    if chunk:
        assert report.verified_bytes >= sum(len(d) for n, _, _, d in entries if n in wanted)
