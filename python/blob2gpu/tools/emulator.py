"""A local Azurite blob service (the npm package `azurite`), for the demo, the tests and
`blob2gpu emulator`: in memory (or kept in a directory), on a free or given loopback port, with
--skipApiVersionCheck (the SDK may be newer) and without Azurite's telemetry; optionally over
HTTPS (a certificate and key in PEM files) and accepting OAuth bearer tokens (Azurite's basic
check: lifetime, issuer and audience, not the signature)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from blob2gpu.sources.azure.location import DEVELOPMENT_ACCOUNT as ACCOUNT
from blob2gpu.sources.azure.location import DEVELOPMENT_ACCOUNT_KEY as ACCOUNT_KEY

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient

AZURITE_PACKAGE = "azurite@3.37.0"
DEFAULT_PORT = 10000  # Azurite's own, and UseDevelopmentStorage=true's


def user_azurite_dir() -> Path:
    """Where the demo installs Azurite for this user, found from any directory:
    $XDG_DATA_HOME/blob2gpu/azurite, else ~/.local/share/blob2gpu/azurite."""
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(data) / "blob2gpu" / "azurite"


def find_azurite(search: tuple[Path, ...] = ()) -> str | None:
    """The azurite-blob launcher: $AZURITE_BLOB, <dir>/.azurite for each dir in `search` and the
    current directory, user_azurite_dir(), or PATH; None when there is none."""
    candidates = [os.environ.get("AZURITE_BLOB")]
    prefixes = [d / ".azurite" for d in (*search, Path.cwd())] + [user_azurite_dir()]
    candidates += [str(p / "node_modules" / ".bin" / "azurite-blob") for p in prefixes]
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
        location: str | os.PathLike[str] | None = None,
    ) -> None:
        """tls: (certificate, key) PEM files to serve HTTPS with; oauth: accept bearer tokens
        (Azurite takes them over HTTPS only); port: where to listen (else a free port);
        location: a directory to keep the blobs in across restarts (else in memory)."""
        launcher = launcher or find_azurite()
        if launcher is None:
            raise FileNotFoundError(missing())
        self.port = port or _free_port()
        self.location = Path(location) if location is not None else None
        self.scheme = "https" if tls else "http"
        self.certificate = str(tls[0]) if tls else None  # self-signed: its own CA bundle
        self._workdir = Path(tempfile.mkdtemp(prefix=f"azurite-{self.port}-"))
        self._log = (self._workdir / "azurite.log").open("wb")
        options = ["--cert", str(tls[0]), "--key", str(tls[1])] if tls else []
        options += ["--oauth", "basic"] if oauth else []
        # Azurite refuses --location beside --inMemoryPersistence (it exits at once).
        options += (
            ["--location", str(location)] if location is not None else ["--inMemoryPersistence"]
        )
        self._process = subprocess.Popen(
            [
                launcher,
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--skipApiVersionCheck",
                "--disableTelemetry",
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

    def exited(self) -> int | None:
        """Azurite's exit status once it has exited on its own, else None."""
        return self._process.poll()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines Azurite printed."""
        text = (self._workdir / "azurite.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self._process.poll() is None:
            if self.location is not None:  # its blobs' metadata is saved as it closes
                os.killpg(self._process.pid, signal.SIGINT)
                try:
                    self._process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
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


def missing() -> str | None:
    """What running Azurite lacks (the azurite-blob launcher), said with how to install it; None
    when it is found."""
    if find_azurite() is not None:
        return None
    return (
        f"azurite-blob was found neither in $AZURITE_BLOB, ./.azurite, {user_azurite_dir()} nor "
        f"on PATH; install it with: npm install --prefix {user_azurite_dir()} {AZURITE_PACKAGE} "
        "(or npm install -g azurite)"
    )


def serve(port: int = DEFAULT_PORT, location: str | None = None, out: TextIO | None = None) -> int:
    """Run Azurite on 127.0.0.1:`port` (0: a free port) until interrupted (Ctrl-C, SIGTERM),
    saying on `out` where it listens and the connection string to use; blobs in memory, or kept
    in the directory `location`. Returns 0 once stopped.

    Raises SourceUnavailable when azurite-blob is not installed, does not start (the port in
    use, say) or exits by itself, naming the fix or what it said."""
    from blob2gpu.errors import SourceUnavailable

    out = out or sys.stdout
    if (lacking := missing()) is not None:
        raise SourceUnavailable(lacking)
    if port:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError as e:
                raise SourceUnavailable(
                    f"port {port} on 127.0.0.1 is in use ({e.strerror}; another Azurite?): "
                    "stop it, or pick another port with --port N (--port 0: a free one)"
                ) from None
    if location is not None:
        Path(location).mkdir(parents=True, exist_ok=True)
    try:
        azurite = Azurite(port=port or None, location=location)
    except RuntimeError as e:
        raise SourceUnavailable(f"Azurite did not start: {e}") from None
    stopping = threading.Event()  # SIGTERM (a container's stop, kill) stops Azurite first
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    exited: str | None = None
    try:
        print(_how_to_use(azurite, location), file=out, flush=True)
        while not stopping.wait(0.5):
            if (code := azurite.exited()) is not None:
                last = (azurite.log_tail().strip().splitlines() or ["(nothing)"])[-1]
                exited = f"Azurite exited by itself with {code}; its last line: {last}"
                break
    except KeyboardInterrupt:
        pass
    finally:
        azurite.stop()
        signal.signal(signal.SIGTERM, previous)
    if exited is not None:
        raise SourceUnavailable(exited)
    print("Azurite stopped.", file=out, flush=True)
    return 0


def _how_to_use(azurite: Azurite, location: str | None) -> str:
    """Where `azurite` listens, the connection string to use and a first publish and load."""
    kept = f"kept in {location}" if location else "in memory: gone when it stops"
    lines = [
        f"Azurite (blob service) listens at {azurite.endpoint()} (blobs {kept})",
        "Use it from another shell:",
        f"  export AZURE_STORAGE_CONNECTION_STRING='{azurite.connection_string()}'",
        "  blob2gpu publish ./my-model az://models/my-model",
        "  blob2gpu load az://models/my-model",
    ]
    if azurite.port == DEFAULT_PORT:
        lines.append("(on port 10000, AZURE_STORAGE_CONNECTION_STRING=UseDevelopmentStorage=true)")
    lines.append("Ctrl-C stops it.")
    return "\n".join(lines)
