"""The tests' Azurite emulator (tests/support/azurite.py, the npm package under .azurite/) for the
benchmarks that need a Blob endpoint, a checkpoint uploaded to it, and a read SAS for it."""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from harness import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tests"))

from support.azurite import ACCOUNT, ACCOUNT_KEY, Azurite  # type: ignore[import-not-found]

__all__ = ["Azurite", "container_sas", "start", "upload"]


def start(tls_dir: Path | None = None, tls_names: tuple[str, ...] = ()) -> tuple[Azurite, str]:
    """Returns a started in-memory Azurite and its CA bundle ('' over HTTP).

    With `tls_dir` it serves HTTPS with a self-signed certificate written there (valid for
    127.0.0.1, localhost and `tls_names`), which this process and its children trust as a user
    trusts a private CA (REQUESTS_CA_BUNDLE)."""
    if tls_dir is None:
        return Azurite(), ""
    from support.tls import self_signed_certificate  # type: ignore[import-not-found]

    tls = self_signed_certificate(tls_dir, tls_names)
    os.environ["REQUESTS_CA_BUNDLE"] = str(tls[0])
    return Azurite(tls=tls), str(tls[0])


def upload(az: Azurite, container: str, directory: Path, prefix: str) -> float:
    """Uploads every file of `directory` under `prefix/` (creating the container); returns the
    seconds it took."""
    t0 = time.perf_counter()
    az.upload_directory(container, directory, prefix)
    return time.perf_counter() - t0


def container_sas(container: str, hours: float = 12) -> str:
    """Returns a read SAS for `container` of the emulator's account."""
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    return generate_container_sas(
        ACCOUNT,
        container,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=hours),
    )
