"""The installed wheel's smoke test, run where users run it: an environment that has the wheel and
its run-time dependencies but no compiler, CMake or pybind11 (scripts/wheel_smoke.sh makes one;
cibuildwheel runs this in its test environment).

    python scripts/smoke_test.py --fake-driver PATH [--require-no-toolchain]

Checks, in order: the package imports from the installed wheel (not the source tree), `blob2gpu
--version` agrees with `blob2gpu.__version__` and the wheel's metadata, a checkpoint served by a
real Azurite (found as the tests find it: $AZURITE_BLOB or .azurite/) loads into torch, and a
load to device="cuda" runs the CUDA path over the fake driver (prebuilt by tests/fake_cuda/build.py,
since there is no compiler here) with its copies counted and no misuse recorded. Exits 1 on the
first failure, with a line saying which.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOOLCHAIN = ("cc", "c++", "gcc", "g++", "clang", "clang++", "cmake", "pybind11-config", "zig")


class SmokeFailure(Exception):
    """One check of the smoke test failed (the message says which and what was seen)."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SmokeFailure(what)


def check_no_toolchain() -> None:
    found = {tool: shutil.which(tool) for tool in TOOLCHAIN}
    found = {tool: path for tool, path in found.items() if path}
    check(not found, f"the environment has build tools on PATH: {found}")
    check(importlib.util.find_spec("pybind11") is None, "pybind11 is importable here")
    print(f"environment: no compiler, cmake or pybind11 on PATH={os.environ.get('PATH', '')}")


def check_import() -> str:
    import blob2gpu
    from blob2gpu import _core

    package = Path(blob2gpu.__file__).resolve().parent
    check(REPO / "python" not in package.parents, f"blob2gpu imported from the source: {package}")
    metadata = importlib.metadata.version("blob2gpu")
    check(blob2gpu.__version__ == metadata, f"__version__ {blob2gpu.__version__} != {metadata}")
    print(f"import: blob2gpu {blob2gpu.__version__} from {package} ({Path(_core.__file__).name})")
    return blob2gpu.__version__


def check_cli_version(version: str) -> None:
    cli = shutil.which("blob2gpu")
    check(cli is not None, "no blob2gpu command on PATH")
    out = subprocess.run([str(cli), "--version"], capture_output=True, text=True, check=False)
    check(out.returncode == 0, f"blob2gpu --version exited {out.returncode}: {out.stderr}")
    check(out.stdout.strip() == f"blob2gpu {version}", f"blob2gpu --version said {out.stdout!r}")
    print(f"cli: `blob2gpu --version` -> {out.stdout.strip()}")


def write_checkpoint(directory: Path) -> dict[str, np.ndarray]:
    from blob2gpu.tools.demo import write_safetensors

    rng = np.random.default_rng(17)
    tensors = {
        f"layers.{i}.weight": rng.standard_normal((64, 128)).astype(np.float16) for i in range(6)
    }
    directory.mkdir(parents=True)
    names = list(tensors)
    for shard, part in enumerate((names[:3], names[3:])):
        write_safetensors(
            directory / f"model-{shard}.safetensors", {n: tensors[n] for n in part}, {}
        )
    return tensors


def check_azurite_into_torch(directory: Path, expected: dict[str, np.ndarray]) -> None:
    import blob2gpu
    import torch
    from blob2gpu.tools.emulator import ACCOUNT, ACCOUNT_KEY, Azurite, find_azurite

    launcher = find_azurite((REPO,))
    check(launcher is not None, "azurite-blob not found ($AZURITE_BLOB or .azurite/)")
    with Azurite(launcher) as azurite:
        azurite.upload_directory("models", directory, "smoke")
        uri = f"{azurite.endpoint()}/models/smoke"
        credential = {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY}
        state = blob2gpu.load(uri, device="cpu", framework="torch", credential=credential)
    check(set(state) == set(expected), f"Azurite load returned {sorted(state)}")
    for name, tensor in state.items():
        check(isinstance(tensor, torch.Tensor), f"{name} is a {type(tensor).__name__}")
        check(np.array_equal(tensor.numpy(), expected[name]), f"{name}: wrong bytes from Azurite")
    total = sum(t.numel() * t.element_size() for t in state.values())
    print(f"azurite: {len(state)} tensors ({total} B) from {uri} into torch {torch.__version__}")


def check_fake_driver(directory: Path, expected: dict[str, np.ndarray], library: Path) -> None:
    sys.path.insert(0, str(REPO / "tests" / "fake_cuda"))
    import blob2gpu

    from build import FakeDriver  # the ctypes wrapper only: nothing is compiled here

    fake = FakeDriver(library)
    with blob2gpu.open(str(directory), device="cuda", framework="dlpack") as checkpoint:
        got = {name: view.to_bytes() for name, view in checkpoint.to_dict().items()}
    del checkpoint  # its arenas live as long as it (or a view of them) does
    gc.collect()
    check(got == {n: a.tobytes() for n, a in expected.items()}, "fake driver: wrong bytes")
    check(fake.h2d_copies() > 0, "fake driver: no host-to-device copy ran")
    check(fake.violations() == 0, f"fake driver: misuse recorded: {fake.last_violation()}")
    check(fake.live_device_allocations() == 0, "fake driver: device memory still allocated")
    print(
        f"fake driver: {len(got)} tensors to cuda over {library.name}, "
        f"{fake.h2d_copies()} copies ({fake.h2d_bytes()} bytes), 0 violations"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fake-driver", type=Path, required=True, help="the fake driver's .so")
    parser.add_argument(
        "--require-no-toolchain",
        action="store_true",
        help="fail when a compiler, CMake or pybind11 can be found (scripts/wheel_smoke.sh)",
    )
    args = parser.parse_args(argv)
    # Named before blob2gpu loads a driver: device="cuda" then runs on the fake.
    os.environ["BLOB2GPU_CUDA_DRIVER"] = str(args.fake_driver.resolve())
    try:
        if args.require_no_toolchain:
            check_no_toolchain()
        version = check_import()
        check_cli_version(version)
        with tempfile.TemporaryDirectory(prefix="blob2gpu-smoke-") as tmp:
            directory = Path(tmp) / "checkpoint"
            expected = write_checkpoint(directory)
            check_azurite_into_torch(directory, expected)
            check_fake_driver(directory, expected, args.fake_driver)
    except SmokeFailure as failure:
        print(f"smoke test FAILED: {failure}", file=sys.stderr)
        return 1
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
