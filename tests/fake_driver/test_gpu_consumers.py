"""On a real GPU: torch and CuPy consume loaded tensors through DLPack on their current stream.

These need a CUDA build of torch (or CuPy) and a GPU, so they run in bench/gpu_check.sh; the same
pipeline runs in CI over the fake driver (test_cuda_pipeline.py)."""

from __future__ import annotations

import blob2gpu
import pytest
import torch
from conftest import REAL_GPU, random_tensor

pytestmark = pytest.mark.skipif(
    not (REAL_GPU and torch.cuda.is_available()), reason="needs a GPU and a CUDA build of torch"
)


def test_torch_gets_cuda_tensors_equal_to_the_reference(write_checkpoint):
    tensors = {f"w{i}": random_tensor(torch.bfloat16, (257, 129), seed=i) for i in range(6)}
    directory = write_checkpoint([tensors])
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # the consumer's stream waits on the load's events
        got = blob2gpu.load(str(directory), device="cuda")
        for name, t in tensors.items():
            assert got[name].device.type == "cuda"
            assert torch.equal(got[name].cpu().view(torch.int16), t.view(torch.int16)), name


def test_torch_can_compute_on_loaded_weights(write_checkpoint):
    a = torch.randn(64, 64)
    directory = write_checkpoint([{"a": a}])
    got = blob2gpu.load(str(directory), device="cuda")["a"]
    torch.testing.assert_close((got @ got).cpu(), a @ a, rtol=1e-3, atol=1e-3)


def test_cupy_consumes_the_same_memory(write_checkpoint):
    cupy = pytest.importorskip("cupy")
    directory = write_checkpoint([{"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}])
    got = blob2gpu.load(str(directory), device="cuda", framework="cupy")["w"]
    assert isinstance(got, cupy.ndarray)
    assert cupy.asnumpy(got).tolist() == torch.arange(12.0).reshape(3, 4).tolist()
