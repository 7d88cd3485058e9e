"""A local Azurite blob service (the npm package `azurite`), for the demo and the tests: in
memory, on a free loopback port, with --skipApiVersionCheck (the SDK may be newer); optionally
over HTTPS (a certificate and key in PEM files) and accepting OAuth bearer tokens (Azurite's
basic check: lifetime, issuer and audience, not the signature)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blob2gpu.sources.azure.location import DEVELOPMENT_ACCOUNT as ACCOUNT
from blob2gpu.sources.azure.location import DEVELOPMENT_ACCOUNT_KEY as ACCOUNT_KEY

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient

INSTALL_HINT = "npm install --prefix .azurite azurite@3.37.0"


def find_azurite(search: tuple[Path, ...] = ()) -> str | None:
    """The azurite-blob launcher: $AZURITE_BLOB, <dir>/.azurite for each dir in `search` and the
    current directory, or PATH; None when there is none."""
    candidates = [os.environ.get("AZURITE_BLOB")]
    for d in (*search, Path.cwd()):
        candidates.append(str(d / ".azurite" / "node_modules" / ".bin" / "azurite-blob"))
    candidates.append(shutil.which("azurite-blob"))
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Azurite:
    """One Azurite blob service process on 127.0.0.1; stop() ends it (state is in memory)."""

    def __init__(
        self,
        launcher: str | None = None,
        timeout: float = 60.0,
        tls: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        oauth: bool = False,
        port: int | None = None,
    ) -> None:
        """tls: (certificate, key) PEM files to serve HTTPS with; oauth: accept bearer tokens
        (Azurite takes them over HTTPS only); port: where to listen (else a free port)."""
        launcher = launcher or find_azurite()
        if launcher is None:
            raise FileNotFoundError(f"azurite-blob not found; install it with: {INSTALL_HINT}")
        self.port = port or _free_port()
        self.scheme = "https" if tls else "http"
        self.certificate = str(tls[0]) if tls else None  # self-signed: its own CA bundle
        self._workdir = Path(tempfile.mkdtemp(prefix=f"azurite-{self.port}-"))
        self._log = (self._workdir / "azurite.log").open("wb")
        options = ["--cert", str(tls[0]), "--key", str(tls[1])] if tls else []
        options += ["--oauth", "basic"] if oauth else []
        self._process = subprocess.Popen(
            [
                launcher,
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--inMemoryPersistence",
                "--skipApiVersionCheck",
                "--silent",
                *options,
            ],
            cwd=self._workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                out = (self._workdir / "azurite.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"azurite exited with {self._process.returncode}: {out}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"azurite did not listen on port {self.port} within {timeout:.0f} s")

    @property
    def pid(self) -> int:
        return self._process.pid

    def endpoint(self, port: int | None = None) -> str:
        """The path-style blob endpoint, e.g. http://127.0.0.1:PORT/devstoreaccount1."""
        return f"{self.scheme}://127.0.0.1:{port or self.port}/{ACCOUNT}"

    def connection_string(self, port: int | None = None) -> str:
        return (
            f"DefaultEndpointsProtocol={self.scheme};AccountName={ACCOUNT};"
            f"AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.endpoint(port)};"
        )

    def service(self) -> BlobServiceClient:
        from azure.storage.blob import BlobServiceClient

        verify: dict[str, Any] = {"connection_verify": self.certificate} if self.certificate else {}
        return BlobServiceClient.from_connection_string(self.connection_string(), **verify)

    def upload_directory(self, container: str, directory: Path, prefix: str) -> None:
        """Upload every file of `directory` under `prefix/` (creating the container if needed)."""
        client = self.service().get_container_client(container)
        if not client.exists():
            client.create_container()
        for f in sorted(Path(directory).iterdir()):
            if f.is_file():
                with f.open("rb") as fh:
                    client.upload_blob(
                        f"{prefix}/{f.name}" if prefix else f.name,
                        fh,
                        overwrite=True,
                        max_concurrency=4,
                    )

    def stop(self) -> None:
        if self._process.poll() is None:
            # In memory, nothing to flush: a graceful stop only waits for idle keep-alive sockets.
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._log.close()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Azurite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
