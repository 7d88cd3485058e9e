"""Microbenchmarks of the core (pytest-benchmark; not part of the test suite):

    python -m pytest bench/test_core_micro.py --benchmark-columns=min,median,ops

header parsing, the host backend's read throughput, CRC32C and SHA-256. CI GPU runners can run
the same file; the GPU path has bench/bench_gpu_load.py.
"""

from __future__ import annotations

import json
import struct

import blob2gpu
import numpy as np
import pytest
from blob2gpu import _core

MiB = 1 << 20


def header_with(tensors: int) -> bytes:
    header = {
        f"model.layers.{i}.mlp.weight": {
            "dtype": "BF16",
            "shape": [64, 64],
            "data_offsets": [i * 8192, (i + 1) * 8192],
        }
        for i in range(tensors)
    }
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


@pytest.mark.parametrize("tensors", [300, 30_000])
def test_header_parse(benchmark, tensors):
    data = header_with(tensors)
    size = len(data) + tensors * 8192
    result = benchmark(_core.parse_header, data, size, "bench")
    assert len(result["tensors"]) == tensors


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    from safetensors.numpy import save_file

    directory = tmp_path_factory.mktemp("micro")
    rng = np.random.default_rng(0)
    for s in range(2):
        save_file(
            {f"s{s}.w{i}": rng.integers(0, 255, 16 * MiB, dtype=np.uint8) for i in range(4)},
            str(directory / f"model-{s}.safetensors"),
        )
    for f in directory.iterdir():
        f.read_bytes()  # page cache warm
    return directory


def test_host_backend_read_throughput(benchmark, shard_dir):
    with blob2gpu.Loader() as loader:
        result = benchmark(loader.load, str(shard_dir), framework="dlpack")
    assert len(result) == 8
    benchmark.extra_info["GB"] = 128 * MiB / 1e9


@pytest.mark.parametrize("algorithm", ["crc32c", "crc32c_portable", "sha256", "md5"])
def test_checksum_throughput(benchmark, algorithm):
    data = np.random.default_rng(1).integers(0, 255, 64 * MiB, dtype=np.uint8)
    if algorithm == "sha256":
        benchmark(lambda: _core.Sha256(data).hexdigest())
    else:
        benchmark(getattr(_core, algorithm), data)
    benchmark.extra_info["GB"] = 64 * MiB / 1e9


def test_crc32c_cache_resident_throughput(benchmark):
    # What load-time verification sees: a 256 KiB piece just read, still in L2.
    data = np.random.default_rng(2).integers(0, 255, 256 << 10, dtype=np.uint8)
    benchmark(lambda: [_core.crc32c(data) for _ in range(64)])
    benchmark.extra_info["GB"] = 64 * (256 << 10) / 1e9
