"""The transport adapter's contract with azure-storage-blob (sources/azure/transport.py, the only
code that touches the SDK's internals): the internals it relies on are there, and a real ranged
GET through it lands the blob's bytes, with the newest azure-storage-blob (the one installed) and
with the oldest pyproject.toml admits (installed apart under tests/.build/ by pip, from PyPI, and
imported first in a subprocess). A failure names the SDK release and what it lacks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
PROBE = TESTS / "support" / "transport_probe.py"


def oldest_declared() -> str:
    """The lowest azure-storage-blob release the package's `azure` extra admits (>=X)."""
    pyproject = (REPO / "pyproject.toml").read_text()
    extra = re.search(r"^azure\s*=\s*\[(.*)\]", pyproject, re.MULTILINE)
    assert extra, "pyproject.toml has no `azure` extra"
    floor = re.search(r"azure-storage-blob\s*>=\s*([0-9][0-9.]*)", extra.group(1))
    assert floor, f"the `azure` extra sets no lower bound on azure-storage-blob: {extra.group(0)}"
    return floor.group(1)


@pytest.fixture(scope="module")
def oldest_sdk() -> Path:
    """A directory holding the oldest admitted azure-storage-blob and its dependencies (made once,
    kept under tests/.build/)."""
    release = oldest_declared()
    target = TESTS / ".build" / f"azure-storage-blob-{release}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    try:
        pip = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-input",
                "--disable-pip-version-check",
                "--no-warn-conflicts",
                "--target",
                str(staging),
                f"azure-storage-blob=={release}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert pip.returncode == 0, (
            f"pip could not install azure-storage-blob=={release} (the lowest pyproject.toml "
            f"admits) into {staging}:\n{pip.stdout}{pip.stderr}"
        )
        (staging / ".complete").write_text(release)
        try:
            staging.rename(target)
        except OSError:  # another run made it meanwhile: keep that one
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def run_probe(sdk: Path | None, container: str | None = None, azurite=None) -> dict:
    """Run tests/support/transport_probe.py with `sdk` (a directory) imported first, or with the
    installed SDK when None; returns its report."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if sdk is not None:
        env["PYTHONPATH"] = str(sdk)
    if azurite is not None:
        env["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string()
    command = [sys.executable, str(PROBE)] + ([container] if container else [])
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, f"the probe failed:\n{out.stdout}{out.stderr}"
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if sdk is not None:  # the probe really imported the old release, not the installed one
        assert Path(report["sdk_path"]).is_relative_to(sdk), report
        assert report["sdk"].startswith(oldest_declared()), report
    return report


def lacking(report: dict) -> str:
    return (
        f"azure-storage-blob {report['sdk']} ({report['versions']}) lacks what "
        "blob2gpu/sources/azure/transport.py relies on:\n  "
        + "\n  ".join(report["missing"])
        + "\nadapt transport.py to this release, or raise the azure-storage-blob floor in "
        "pyproject.toml past it"
    )


@pytest.fixture(params=["newest", "oldest"])
def sdk(request: pytest.FixtureRequest) -> Path | None:
    """The installed azure-storage-blob (None: nothing put first), then the oldest admitted."""
    return None if request.param == "newest" else request.getfixturevalue("oldest_sdk")


def test_the_sdk_has_every_internal_the_transport_uses(sdk):
    report = run_probe(sdk)
    assert not report["missing"], lacking(report)


def test_a_ranged_get_through_the_transport_lands_the_blobs_bytes(sdk, azurite, container):
    report = run_probe(sdk, container, azurite)
    assert not report["missing"], lacking(report)
    assert not report["problems"], (
        f"ranged GETs through transport.py with azure-storage-blob {report['sdk']} "
        f"({report['versions']}) misbehaved:\n  " + "\n  ".join(report["problems"])
    )


def test_the_contract_check_names_what_is_missing(monkeypatch):
    """missing_internals() reports a piece the SDK lost, by name, instead of raising."""
    import azure.storage.blob._generated.models as generated
    from support.transport_probe import installed_versions, missing_internals

    monkeypatch.delattr(generated, "ModifiedAccessConditions")
    missing = missing_internals()
    assert len(missing) == 1 and "ModifiedAccessConditions" in missing[0], missing
    assert "azure-storage-blob" in installed_versions()


def test_no_other_module_names_an_sdk_private():
    package = REPO / "python" / "blob2gpu"
    # (`_pipeline` is not on the list: blob2gpu's own LoadPipeline attributes share the name.)
    private = re.compile(r"\b_generated\b|\._client\b|\._fp\b|\binternal_response\b")
    named = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "transport.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not named, "only sources/azure/transport.py may name SDK internals:\n" + "\n".join(named)
