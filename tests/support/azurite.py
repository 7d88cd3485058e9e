"""A real Azurite blob service for the tests: npm package `azurite`, in memory, on a free loopback
port, with --skipApiVersionCheck (the SDK may be newer than the emulator)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ACCOUNT = "devstoreaccount1"
# Azurite's fixed, publicly documented development key: not a secret.
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def find_azurite() -> str:
    """Path of the azurite-blob launcher: $AZURITE_BLOB, the repo's .azurite/ (scripts/test.sh
    installs it there), or PATH. Raises RuntimeError saying how to install it."""
    candidates = [
        os.environ.get("AZURITE_BLOB"),
        str(REPO / ".azurite" / "node_modules" / ".bin" / "azurite-blob"),
        shutil.which("azurite-blob"),
    ]
    for c in candidates:
        if c and os.path.exists(c):
            return c
    raise RuntimeError(
        "azurite-blob not found: run ./scripts/test.sh (it installs the npm "
        "package into .azurite/) or set AZURITE_BLOB"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Azurite:
    """One Azurite blob service process; stop() ends it."""

    def __init__(self) -> None:
        self.port = free_port()
        self._workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"azurite-{self.port}"
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._log = (self._workdir / "azurite.log").open("wb")
        self._process = subprocess.Popen(
            [
                find_azurite(),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--inMemoryPersistence",
                "--skipApiVersionCheck",
                "--silent",
            ],
            cwd=self._workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                out = (self._workdir / "azurite.log").read_text(errors="replace")
                raise RuntimeError(f"azurite exited with {self._process.returncode}: {out}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("azurite did not start listening within 60 s")

    def endpoint(self, port: int | None = None) -> str:
        return f"http://127.0.0.1:{port or self.port}/{ACCOUNT}"

    def connection_string(self, port: int | None = None) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.endpoint(port)};"
        )

    def service(self):
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string())

    def stop(self) -> None:
        if self._process.poll() is None:
            # In memory, nothing to flush: a graceful stop only waits for idle keep-alive sockets.
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._log.close()
        shutil.rmtree(self._workdir, ignore_errors=True)
