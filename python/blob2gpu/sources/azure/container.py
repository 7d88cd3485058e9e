"""One container's clients, opened once per load: with native_http on (the default), what the
core's reader needs for the listing, the index, the manifest, the ranges and the aux files
(native_clients.NativeHttp: the request signer of the credential, the range clients of the
endpoint); azure-storage-blob's ContainerClient (an HTTP pool sized for the prefetch
concurrency, timeouts, the SDK's own retries off so that every retry is ours to count and to
bound), made on first use: every request with native_http off, publishing and preflight."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import posixpath
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blob2gpu.documents import MANIFEST_MAX_BYTES
from blob2gpu.errors import (
    AccessDenied,
    BlobChanged,
    ChecksumMismatch,
    InvalidArgument,
    InvalidManifest,
    LocalWriteError,
)
from blob2gpu.integrity.manifest import Manifest, require_manifest
from blob2gpu.redaction import install_log_redaction, redact
from blob2gpu.settings import Settings
from blob2gpu.sources.azure.credentials import resolve_credential, sas_expiry
from blob2gpu.sources.azure.failures import archived_error
from blob2gpu.sources.azure.listing import BlobListing, ListedBlob, if_unchanged, list_checkpoint
from blob2gpu.sources.azure.location import BlobLocation, parse_blob_uri
from blob2gpu.sources.azure.native_clients import NativeHttp, RangeClients
from blob2gpu.sources.azure.native_requests import (
    RangeEndpoint,
    RangeMismatch,
    RequestSigner,
    range_endpoint,
)
from blob2gpu.sources.azure.retry import RetryPolicy

AUX_PART_BYTES = 8 << 20  # an aux file (tokenizer, config) is read in ranged GETs of this size
FETCH_AGAIN = "nothing was written for it: fetch again"  # after an aux file that changed


@dataclass
class BlobContainer:
    """A container client for one checkpoint location, with its retry policy."""

    location: BlobLocation
    make_client: Callable[[], Any] = field(repr=False)  # azure-storage-blob's ContainerClient
    retry: RetryPolicy
    credential_source: str  # how the credential was chosen (never the credential itself)
    # The core's reader for the load's GETs (listing, index, manifest, ranges); None: they go
    # through the SDK (native_http off).
    native: NativeHttp | None = field(default=None, repr=False)
    _sdk_client: Any = field(default=None, init=False, repr=False)
    _sdk_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)

    @property
    def client(self) -> Any:
        """azure-storage-blob's ContainerClient, made on first use: with native_http on, a load
        and fetch_aux never use it (no import of the SDK, no platform probe of its user agent),
        only publishing and preflight do. Raises InvalidArgument once the container is closed,
        or when azure-storage-blob cannot be imported or refuses the credential."""
        with self._sdk_lock:
            if self._closed:
                raise InvalidArgument(f"the client of {self.location.describe()} is closed")
            if self._sdk_client is None:
                self._sdk_client = self.make_client()
            return self._sdk_client

    @property
    def display_uri(self) -> str:
        loc = self.location
        return f"{loc.account_url}/{loc.container}/{loc.path}"

    def close(self) -> None:
        """Close the connections, unless they belong to a Loader's HttpSessions."""
        with self._sdk_lock:
            client, self._sdk_client, self._closed = self._sdk_client, None, True
        if client is not None:
            client.close()
        if self.native is not None:
            self.native.close()

    def __enter__(self) -> BlobContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_if_missing(self) -> bool:
        """Create the container when it does not exist (publishing into a new one); returns
        whether it was created. A credential that may not read the container's properties is
        taken to publish into an existing one. Raises AccessDenied (hint: create it or grant
        the permission) when the service refuses to create it."""
        from azure.core.exceptions import ResourceExistsError

        what = f"checking {self.location.describe()}"
        try:
            if self.retry.run(self.client.exists, what, None):
                return False
        except AccessDenied:
            return False  # e.g. a SAS that may write blobs only: the upload will say more

        def create() -> bool:
            try:
                self.client.create_container()
            except ResourceExistsError:
                return False  # created meanwhile (another publisher)
            return True

        try:
            return self.retry.run(create, f"creating {self.location.describe()}", None)
        except AccessDenied as e:
            hint = (
                f"create container '{self.location.container}' first (az storage container "
                "create), or grant this credential the right to create it (a SAS with "
                "srt=c and sp=c, or the 'Storage Blob Data Contributor' role)"
            )
            raise AccessDenied(
                f"{self.location.describe()} does not exist and this credential may not "
                f"create it ({e})",
                hint=hint,
            ) from None

    def list_checkpoint(self) -> BlobListing:
        """Resolve the URI to its shards (see listing.list_checkpoint)."""
        return list_checkpoint(self)

    def read_small_blob(self, name: str, etag: str | None, size: int) -> bytes:
        """The whole of blob `name` (an index, a manifest) as listed: `size` bytes, at version
        `etag` when given, through the retry policy; the core reads them with native_http on.
        Raises BlobChanged when the blob is not the listed one any more (another etag or
        size), else the typed storage error of a failed read."""
        if size == 0:
            return b""

        def read() -> bytes:
            try:
                data: bytes | bytearray
                if self.native is None:
                    options = {"etag": etag, "match_condition": if_unchanged()} if etag else {}
                    blob = self.client.get_blob_client(name)
                    data = blob.download_blob(**options).readall()
                    total = len(data)
                else:  # signed at each attempt: a fresh date, a token not expired
                    target, headers = self.native.signer.range_get(name, 0, size, etag)
                    data, total = self.native.get_range(target, headers, size)
                if total in (-1, size) and len(data) == size:
                    return bytes(data)  # the index or manifest: small
                now = f"{total} bytes now"
            except RangeMismatch as e:
                now = f"{e.total_size} bytes now" if e.total_size >= 0 else "another size now"
            except Exception as e:
                status = getattr(e, "status_code", None)
                if status not in (412, 416):
                    raise
                now = "another etag now" if status == 412 else "fewer bytes now"
            raise self._changed_since_listing(name, etag, f"{size} bytes then, {now}", "try again")

        return self.retry.run(read, f"reading {self.location.describe(name)}", name)

    def read_manifest(self, listing: BlobListing) -> Manifest | None:
        """The checkpoint's blob2gpu.manifest.json, or None when it has none. Raises
        InvalidManifest for a malformed one, or one larger than a manifest holds (unread)."""
        listed = listing.manifest
        if listed is None:
            return None
        where = self.location.describe(listed.name)
        if listed.size > MANIFEST_MAX_BYTES:  # refused before it is read
            raise InvalidManifest(
                f"manifest {where} is {listed.size} bytes, more than a manifest holds "
                f"({MANIFEST_MAX_BYTES >> 20} MiB): it is not one"
            )
        data = self.read_small_blob(listed.name, listed.etag, listed.size)
        return Manifest.from_json(data, where)

    def fetch_aux(self, dest: str | os.PathLike[str], verify: str = "auto") -> list[Path]:
        """Download the checkpoint's other files (config.json, tokenizer files, the index, ...)
        to `dest`; weights in other formats beside the shards (pytorch_model.bin, *.pth, ...)
        are left out.

        Each file streams to a temporary name, pinned to the etag seen at listing, and is renamed
        into place, so `dest` never holds half a file or one of a newer version. When the
        checkpoint's manifest lists a file, its size and SHA-256 are checked before the rename
        (`verify`: 'none' skips it; 'crc32c' and 'sha256' require the manifest). Returns the
        written paths. Raises BlobNotFound, AccessDenied, BlobArchived, StorageUnavailable,
        BlobChanged, ChecksumMismatch or ManifestMissing.
        """
        listing = self.list_checkpoint()
        archived = {aux.name: aux.archived for aux in listing.aux_blobs if aux.archived}
        if archived:  # refused before anything is written, not after half the files
            raise archived_error(self.location, archived, "fetching the checkpoint's files")
        manifest = None
        if verify != "none":
            directory = posixpath.dirname(listing.plan.shards[0].path) or "/"
            where = f"'{directory}' in {self.location.describe()}"
            manifest = require_manifest(self.read_manifest(listing), verify, where)
        out_dir = Path(dest)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LocalWriteError(f"cannot create '{out_dir}': {e.strerror}") from None
        written = []
        for aux in listing.aux_blobs:
            target = out_dir / posixpath.basename(aux.name)
            entry = manifest.files.get(target.name) if manifest is not None else None
            tmp, size, sha256 = self.retry.run(
                functools.partial(self._download_to_temp, aux, target),
                f"downloading {self.location.describe(aux.name)}",
                aux.name,
            )
            if entry is not None and (size, sha256) != (entry.size, entry.sha256):
                os.unlink(tmp)
                raise ChecksumMismatch(
                    f"{self.location.describe(aux.name)}: {size} bytes with SHA-256 {sha256}, "
                    f"the manifest says {entry.size} bytes with {entry.sha256}; nothing was "
                    "written for it"
                )
            try:
                os.replace(tmp, target)
            except OSError as e:
                os.unlink(tmp)
                raise LocalWriteError(f"cannot write '{target}': {e.strerror}") from e
            written.append(target)
        return written

    def _download_to_temp(self, aux: ListedBlob, target: Path) -> tuple[str, int, str]:
        """Stream one aux blob (its listed version) into a temporary file beside `target`;
        returns (temporary path, bytes, SHA-256 hex). The temporary file is gone if it fails;
        a local failure (disk full) is a LocalWriteError, never retried as a storage one."""
        try:
            fd, tmp = _new_file_beside(target)
        except OSError as e:
            raise LocalWriteError(f"cannot create a file in '{target.parent}': {e.strerror}") from e
        sha = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                for chunk in self._aux_chunks(aux):
                    sha.update(chunk)
                    size += len(chunk)
                    try:
                        view = memoryview(chunk)
                        while view:
                            view = view[f.write(view) :]
                    except OSError as e:
                        raise LocalWriteError(
                            f"writing '{target}' failed after {size - len(chunk)} bytes: "
                            f"{e.strerror}; nothing was written for it"
                        ) from e
                try:
                    os.fsync(f.fileno())  # the rename publishes whole bytes, even across a crash
                except OSError as e:
                    raise LocalWriteError(f"writing '{target}' failed: {e.strerror}") from e
        except BaseException as e:
            os.unlink(tmp)
            if getattr(e, "status_code", None) == 412 or isinstance(e, RangeMismatch):
                raise self._changed_since_listing(
                    aux.name, aux.etag, f"its etag is no longer {aux.etag}", FETCH_AGAIN
                ) from None
            raise
        return tmp, size, sha.hexdigest()

    def _aux_chunks(self, aux: ListedBlob) -> Iterator[bytes | bytearray]:
        """The bytes of `aux` at its listed etag, in parts: ranged GETs of AUX_PART_BYTES read
        by the core (native_http on), else azure-storage-blob's download stream. Raises the
        request's failure (412 when the etag no longer matches; RangeMismatch, another size)."""
        if self.native is None:
            stream = self.client.get_blob_client(aux.name).download_blob(
                etag=aux.etag, match_condition=if_unchanged()
            )
            yield from stream.chunks()
            return
        for start in range(0, aux.size, AUX_PART_BYTES):
            end = min(start + AUX_PART_BYTES, aux.size)
            target, headers = self.native.signer.range_get(aux.name, start, end, aux.etag)
            data, total = self.native.get_range(target, headers, end - start, first_byte=start)
            if total not in (-1, aux.size):
                raise self._changed_since_listing(
                    aux.name, aux.etag, f"{aux.size} bytes then, {total} now", FETCH_AGAIN
                )
            yield data

    def _changed_since_listing(
        self, name: str, etag: str | None, how: str, next_step: str
    ) -> BlobChanged:
        """Blob `name` is not the one listed (at `etag`) any more (`how`: what differs)."""
        return BlobChanged(
            f"{self.location.describe(name)} changed since it was listed ({how})",
            blob=name,
            etag=etag,
            hint=next_step,
        )


class HttpSessions:
    """HTTP connection pools a Loader keeps across its loads, one per pool size, and the core's
    range clients, one RangeClients per endpoint: a later load from the same account reuses the
    open (TLS) connections instead of connecting and handshaking again. close() closes every
    connection."""

    def __init__(self) -> None:
        self._sessions: dict[int, Any] = {}
        self._ranges: dict[tuple[RangeEndpoint, float, float, int], RangeClients] = {}
        self._lock = threading.Lock()
        self._closed = False

    def range_clients(
        self, endpoint: RangeEndpoint, connect_timeout: float, read_timeout: float, pool: int
    ) -> RangeClients:
        """The RangeClients of `endpoint` with these timeouts and `pool` connections each (made
        on first use)."""
        key = (endpoint, connect_timeout, read_timeout, pool)
        with self._lock:
            if key not in self._ranges:
                self._ranges[key] = RangeClients(endpoint, connect_timeout, read_timeout, pool)
            return self._ranges[key]

    def get(self, pool: int) -> Any:
        """The requests.Session with `pool` connections per host (made on first use). Raises
        InvalidArgument once closed."""
        with self._lock:
            if self._closed:
                raise InvalidArgument("these HTTP sessions are closed (their Loader is)")
            if pool not in self._sessions:
                self._sessions[pool] = _session(pool)
            return self._sessions[pool]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sessions, self._sessions = list(self._sessions.values()), {}
            ranges, self._ranges = list(self._ranges.values()), {}
        for session in sessions:
            session.close()
        for clients in ranges:
            clients.close()


def _session(pool: int) -> Any:
    """A requests.Session keeping up to `pool` connections per host, for 8 hosts (accounts)."""
    import requests

    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=pool, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def open_container(
    uri: str, settings: Settings, credential: Any = None, sessions: HttpSessions | None = None
) -> BlobContainer:
    """Open the clients of a Blob URI (azure-storage-blob's made at once only with native_http
    off); their connections come from `sessions` when given (and stay open there), else their
    own. Raises InvalidArgument for a bad URI, azure-storage-blob not installed, or (native_http
    on) a proxy or credential the core's reader cannot use."""
    try:
        sdk = importlib.util.find_spec("azure.storage.blob")
    except (ImportError, ValueError):  # a parent package missing; a module without a spec
        sdk = None
    if sdk is None:
        raise InvalidArgument(
            "Blob URIs need azure-storage-blob: pip install 'blob2gpu[azure]' (it is not installed)"
        )
    install_log_redaction()  # before the HTTP stack logs its first request
    location = parse_blob_uri(uri)
    chosen, how = resolve_credential(location, credential)
    sas = location.sas or (chosen if isinstance(chosen, str) else None)
    if sas:
        location = dataclasses.replace(location, sas_expiry=sas_expiry(sas))
    elif chosen is None:
        location = dataclasses.replace(location, anonymous=True)
    account_url = location.account_url + (f"?{location.sas}" if location.sas else "")

    sdk_credential = chosen
    if isinstance(chosen, Mapping) and "account_key" in chosen and not chosen.get("account_name"):
        sdk_credential = {**chosen, "account_name": location.account}  # as the signer takes it

    def make_client() -> Any:
        try:
            from azure.core.pipeline.transport import RequestsTransport
            from azure.storage.blob import ContainerClient
        except ImportError as e:
            raise InvalidArgument(
                f"Blob URIs need azure-storage-blob: pip install 'blob2gpu[azure]' ({e})"
            ) from None

        pool = settings.prefetch_concurrency + 4  # the feeder's GETs, listing and header reads
        transport = RequestsTransport(
            session=sessions.get(pool) if sessions is not None else _session(pool),
            session_owner=sessions is None,
            connection_timeout=settings.connect_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
        )
        try:
            return ContainerClient(
                account_url,
                location.container,
                credential=sdk_credential,
                transport=transport,
                retry_total=0,
                connection_timeout=settings.connect_timeout_seconds,
                read_timeout=settings.read_timeout_seconds,
            )
        except (ValueError, TypeError) as e:  # the SDK's word on a credential or URL it refuses
            raise InvalidArgument(
                f"azure-storage-blob cannot use the credential or URL of {location.describe()}: "
                f"{redact(str(e))}"
            ) from None

    retry = RetryPolicy(
        location,
        settings.retry_max_attempts,
        settings.retry_backoff_seconds,
        settings.retry_backoff_max_seconds,
        throttled_seconds=settings.retry_throttled_seconds,
    )
    native = None
    if settings.native_http:
        endpoint = range_endpoint(location)
        timeouts = (settings.connect_timeout_seconds, settings.read_timeout_seconds)
        connections = settings.prefetch_concurrency
        clients = (
            sessions.range_clients(endpoint, *timeouts, connections)
            if sessions is not None
            else RangeClients(endpoint, *timeouts, connections)
        )
        signer = RequestSigner(location, chosen, endpoint.base_path)
        native = NativeHttp(signer, clients, owned=sessions is None)
    container = BlobContainer(
        location=location,
        make_client=make_client,
        retry=retry,
        credential_source=how,
        native=native,
    )
    if native is None:
        container.client  # noqa: B018  (made now: every request of the load goes through it)
    return container


def _new_file_beside(target: Path) -> tuple[int, str]:
    """A file no one had, beside `target`, to write its bytes into before the rename: created
    as `target` itself would be (mode 0666 less the umask; mkstemp's 0600 would keep a serving
    container of another user from reading what an init container fetched), never through an
    existing name or link (O_EXCL). Raises OSError."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(100):
        tmp = str(target.parent / f".{target.name}.{secrets.token_hex(6)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside '{target}'")
