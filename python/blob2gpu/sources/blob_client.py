"""One container's client, built once per load: credentials, an HTTP pool sized for the
prefetch concurrency, timeouts, and retries owned by blob2gpu (the SDK's own are off, so every
retry is ours to count and to bound)."""

from __future__ import annotations

import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument
from ..manifest import Manifest
from .azure_blob import (
    BlobListing,
    BlobLocation,
    list_checkpoint,
    parse_blob_uri,
    resolve_credential,
)
from .blob_feeder import RetryPolicy


@dataclass
class BlobContainer:
    """A container client for one checkpoint location, with its retry policy."""

    location: BlobLocation
    client: Any  # azure.storage.blob.ContainerClient
    retry: RetryPolicy
    credential_source: str  # how the credential was chosen (never the credential itself)

    @property
    def display_uri(self) -> str:
        loc = self.location
        return f"{loc.account_url}/{loc.container}/{loc.path}"

    def list_checkpoint(self) -> BlobListing:
        """Resolve the URI to its shards (see azure_blob.list_checkpoint)."""
        return list_checkpoint(self.client, self.location, self.retry.run)

    def read_manifest(self, listing: BlobListing) -> Manifest | None:
        """The checkpoint's blob2gpu.manifest.json, or None when it has none."""
        name = listing.manifest_blob
        if name is None:
            return None
        data = self.retry.run(
            lambda: self.client.get_blob_client(name).download_blob().readall(),
            f"reading {self.location.describe(name)}",
            name,
        )
        return Manifest.from_json(data, self.location.describe(name))

    def fetch_aux(self, dest: str | os.PathLike[str]) -> list[Path]:
        """Download the checkpoint's other files (config.json, tokenizer files, ...) to `dest`.

        Each file is written to a temporary name and renamed, so `dest` never holds half a file.
        Returns the written paths. Raises BlobNotFound, AccessDenied or StorageUnavailable.
        """
        listing = self.list_checkpoint()
        out_dir = Path(dest)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name, _size in listing.aux_blobs:
            target = out_dir / posixpath.basename(name)
            blob = self.client.get_blob_client(name)
            data = self.retry.run(
                lambda b=blob: b.download_blob().readall(),
                f"downloading {self.location.describe(name)}",
                name,
            )
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{target.name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
            written.append(target)
        return written


def open_container(uri: str, settings: Any, credential: Any = None) -> BlobContainer:
    """Build the client for a Blob URI. Raises InvalidArgument for a bad URI or a missing extra."""
    try:
        import requests
        from azure.core.pipeline.transport import RequestsTransport
        from azure.storage.blob import ContainerClient
    except ImportError as e:
        raise InvalidArgument(
            f"Blob URIs need azure-storage-blob: pip install 'blob2gpu[azure]' ({e})"
        ) from None
    location = parse_blob_uri(uri)
    chosen, how = resolve_credential(location, credential)
    session = requests.Session()
    pool = settings.prefetch_concurrency + 4
    adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=pool, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    transport = RequestsTransport(
        session=session,
        session_owner=True,
        connection_timeout=settings.connect_timeout_seconds,
        read_timeout=settings.read_timeout_seconds,
    )
    account_url = location.account_url + (f"?{location.sas}" if location.sas else "")
    client = ContainerClient(
        account_url,
        location.container,
        credential=chosen,
        transport=transport,
        retry_total=0,
        connection_timeout=settings.connect_timeout_seconds,
        read_timeout=settings.read_timeout_seconds,
    )
    retry = RetryPolicy(
        location,
        settings.retry_max_attempts,
        settings.retry_backoff_seconds,
        settings.retry_backoff_max_seconds,
        throttled_seconds=settings.retry_throttled_seconds,
    )
    return BlobContainer(location=location, client=client, retry=retry, credential_source=how)
