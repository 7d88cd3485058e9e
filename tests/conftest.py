"""Shared test fixtures: the fake CUDA driver, and checkpoints written by the real `safetensors`.

The fake driver (tests/fake_cuda/) is built once and named in BLOB2GPU_CUDA_DRIVER before the core
loads a driver, so device='cuda' runs the real CUDA backend on host memory. With
BLOB2GPU_TEST_REAL_GPU=1 the real libcuda is used instead and the fake-only tests are skipped.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fake_cuda"))
from build import FakeDriver, build_fake_driver

REAL_GPU = os.environ.get("BLOB2GPU_TEST_REAL_GPU") == "1"
if not REAL_GPU:
    os.environ["BLOB2GPU_CUDA_DRIVER"] = str(build_fake_driver())

# Every dtype torch and safetensors can both write, by safetensors name.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
# dtypes the safetensors package cannot write from torch: written by raw_safetensors() with bits.
RAW_DTYPE_BITS = {"F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}


def sparse_checkpoint(path, data_bytes: int, name: str = "huge"):
    """A valid shard whose one U8 tensor `name` is `data_bytes` long, written as a sparse file:
    its size is real for every reader, but it takes no disk. Shards of one checkpoint need a
    name each (a load refuses a tensor found in two shards)."""
    header = json.dumps(
        {name: {"dtype": "U8", "shape": [data_bytes], "data_offsets": [0, data_bytes]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + data_bytes)
    return path


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes reinterpreted as `dtype` (every bit pattern, so byte equality is meaningful)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = int(np.prod(shape)) if shape else 1
    raw = np.random.default_rng(seed).integers(0, 256, size=count * itemsize, dtype=np.uint8)
    if dtype == torch.bool:
        raw = raw & 1
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def raw_safetensors(
    path: Path,
    entries: list[tuple[str, str, list[int], bytes]],
    metadata: dict[str, str] | None = None,
    pad: bool = True,
) -> Path:
    """Write a safetensors file by hand (json + struct), independent of the code under test."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, data in entries:
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    blob = json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(e[3] for e in entries))
    return path


def reference_bytes(path: Path) -> dict[str, bytes]:
    """Each tensor's bytes as the reference reads them: safetensors where it knows the dtype, and
    the header's own offsets (parsed with json here) where it does not."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    from safetensors import safe_open

    out: dict[str, bytes] = {}
    with safe_open(str(path), framework="pt") as f:
        for name, entry in header.items():
            if entry["dtype"] in TORCH_DTYPES:
                t = f.get_tensor(name)
                out[name] = (
                    t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                    if t.numel()
                    else b""
                )
            else:
                begin, end = entry["data_offsets"]
                out[name] = raw[8 + n + begin : 8 + n + end]
    return out


def checkpoint_bytes(directory: Path) -> dict[str, bytes]:
    """Every tensor's reference bytes across the .safetensors files of a directory."""
    out: dict[str, bytes] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(reference_bytes(f))
    return out


def as_bytes(tensor: object) -> bytes:
    """The bytes of a loaded tensor, whatever framework or device holds it."""
    if hasattr(tensor, "to_bytes"):  # a blob2gpu TensorView (framework='dlpack'), any device
        return tensor.to_bytes()
    if isinstance(tensor, torch.Tensor):
        return (
            tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            if tensor.numel()
            else b""
        )
    return np.ascontiguousarray(tensor).tobytes()


@pytest.fixture
def write_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Write shards with safetensors.torch.save_file; returns the checkpoint directory.

    shards: list of {name: tensor}; index=True also writes model.safetensors.index.json.
    """
    from safetensors.torch import save_file

    def write(
        shards: list[dict[str, torch.Tensor]],
        index: bool = True,
        metadata: dict[str, str] | None = None,
        name: str = "ckpt",
    ) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        weight_map = {}
        for i, tensors in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors, str(directory / file), metadata=metadata)
            weight_map.update(dict.fromkeys(tensors, file))
        if index:
            (directory / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map})
            )
        return directory

    return write


@pytest.fixture
def fake_driver() -> Iterator[FakeDriver]:
    """The fake CUDA driver's control API; checks after the test that nothing was misused."""
    if REAL_GPU:
        pytest.skip("runs on the fake CUDA driver only (BLOB2GPU_TEST_REAL_GPU=1)")
    driver = FakeDriver(os.environ["BLOB2GPU_CUDA_DRIVER"])
    driver.reset_faults()
    driver.reset_counters()
    violations_before = driver.violations()
    yield driver
    driver.reset_faults()
    assert driver.violations() == violations_before, driver.last_violation()


def prepare_device(request: pytest.FixtureRequest, device: str) -> str:
    """Set up `device` for a test: on cuda without a real GPU, the fake driver (and its checks).
    For tests that parametrize `device` themselves, with target-specific settings."""
    if device == "cuda" and not REAL_GPU:
        request.getfixturevalue("fake_driver")
    return device


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest) -> str:
    """Each target: the host backend, and the CUDA backend (fake driver in CI, real with a GPU)."""
    return prepare_device(request, request.param)


def load_bytes(uri: Path | str, device: str, **settings: object) -> dict[str, bytes]:
    """Load with blob2gpu and return each tensor's bytes (read back through the driver on cuda)."""
    import blob2gpu

    framework = "dlpack" if device != "cpu" else "torch"
    tensors = blob2gpu.load(str(uri), device=device, framework=framework, **settings)
    return {name: as_bytes(t) for name, t in tensors.items()}


def load_with_report(uri: Path | str, device: str, **settings: object) -> tuple[dict, object]:
    """Like load_bytes, through blob2gpu.open: (each tensor's bytes, the load report)."""
    import blob2gpu

    framework = "dlpack" if device != "cpu" else "torch"
    with blob2gpu.open(str(uri), device=device, framework=framework, **settings) as checkpoint:
        tensors = checkpoint.to_dict()
        report = checkpoint.report
    return {name: as_bytes(t) for name, t in tensors.items()}, report


# --- Azure Blob: a real Azurite, and a fault proxy in front of it -----------------------------
from support.azurite import Azurite  # noqa: E402
from support.fault_proxy import FaultProxy  # noqa: E402


def azure_sdk_missing() -> str | None:
    """On a GPU host (BLOB2GPU_TEST_REAL_GPU=1: bench/gpu_check.sh), why azure-storage-blob cannot
    be used there (the GPU machine's image lacks it unless bench/device_bundle.sh's bundle came
    along); None where it can. Off a GPU host always None: there a missing package fails."""
    if not REAL_GPU:
        return None
    try:
        import azure.storage.blob  # noqa: F401
    except ImportError as exc:
        return f"azure-storage-blob does not import ({exc})"
    return None


def azurite_missing() -> str | None:
    """Likewise for Azurite (and the SDK its tests talk to it with)."""
    if not REAL_GPU:
        return None
    from blob2gpu.tools.emulator import find_azurite

    if find_azurite((Path(__file__).resolve().parents[1],)) is None:
        return "no Azurite (AZURITE_BLOB, .azurite/ or azurite-blob on PATH)"
    return azure_sdk_missing()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "azure: needs azure-storage-blob but not Azurite (skipped on a GPU host without)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a GPU host without Azure's parts, the tests that need them skip, saying why, instead of
    failing for a reason that says nothing about the GPU: those that use Azurite, and those marked
    `azure` (the SDK alone)."""
    sdk, emulator = azure_sdk_missing(), azurite_missing()
    for item in items:
        if emulator and {"azurite", "azurite_tls"} & set(getattr(item, "fixturenames", ())):
            reason = emulator
        elif sdk and item.get_closest_marker("azure"):
            reason = sdk
        else:
            continue
        item.add_marker(pytest.mark.skip(reason=f"on this GPU host: {reason} (device_bundle.sh)"))


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    server = Azurite()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """An Azurite over HTTPS (a self-signed certificate, `.certificate`) that also accepts OAuth
    bearer tokens."""
    from support.tls import self_signed_certificate

    server = Azurite(tls=self_signed_certificate(tmp_path_factory.mktemp("tls")), oauth=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _proxy_server(azurite: Azurite) -> Iterator[FaultProxy]:
    proxy = FaultProxy(azurite.port)
    yield proxy
    proxy.stop()


@pytest.fixture
def fault_proxy(_proxy_server: FaultProxy) -> Iterator[FaultProxy]:
    """The fault proxy, reset (no faults armed, counters at 0) for each test."""
    _proxy_server.reset()
    yield _proxy_server
    _proxy_server.reset()


_container_counter = [0]


@pytest.fixture
def container(azurite: Azurite) -> Iterator[str]:
    """A fresh container in Azurite; deleted after the test."""
    _container_counter[0] += 1
    name = f"models{_container_counter[0]:04d}"
    service = azurite.service()
    service.create_container(name)
    yield name
    service.delete_container(name)


def upload_directory(azurite: Azurite, container: str, directory: Path, prefix: str) -> None:
    """Upload every file of `directory` to `container` under `prefix/`."""
    azurite.upload_directory(container, directory, prefix)


@pytest.fixture
def blob_env(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> Azurite:
    """AZURE_STORAGE_CONNECTION_STRING pointing at Azurite (az:// URIs resolve through it)."""
    for var in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string())
    return azurite


@pytest.fixture
def free_port() -> int:
    """A free TCP port on loopback (for a torch.distributed rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def published(write_checkpoint, azurite, container):
    """Three shards of ~300 KB uploaded to Azurite under 'm' of `container`; their directory."""
    directory = write_checkpoint(
        [
            {f"s{s}.w{i}": random_tensor(torch.float32, (128, 200), s * 3 + i) for i in range(3)}
            for s in range(3)
        ]
    )
    upload_directory(azurite, container, directory, "m")
    return directory


@pytest.fixture
def cache_dir(tmp_path):
    """Where a test's NVMe cache lives (created by the cache on first use)."""
    return tmp_path / "nvme"


@pytest.fixture(autouse=True)
def node_cache_home(tmp_path, monkeypatch):
    """Each test's own default cache directory ($XDG_CACHE_HOME/blob2gpu), inherited by the
    loaders it starts: Blob loads keep their node's throttling state there even with the cache
    off (sources/azure/throttle.py), and one test's throttling must not slow the next (nor
    another checkout's tests on this machine)."""
    home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home
