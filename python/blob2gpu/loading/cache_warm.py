"""Filling a node's NVMe cache without loading anything (`blob2gpu cache warm`: a DaemonSet or a
node-prep job before pods land), and fetching a damaged entry again (`cache verify --repair`).
Both are the cache fill (cache/fill.py) of the shards the cache lacks, listed and checked as a
load lists and checks them (loading/prepare.py)."""

from __future__ import annotations

import posixpath
from typing import Any

from blob2gpu.cache.fill import CacheFill, FillShard
from blob2gpu.cache.nvme import CacheEntry, NvmeCache
from blob2gpu.errors import InvalidArgument
from blob2gpu.loading.cache_plan import cache_identity, shards_to_fill, start_fill
from blob2gpu.settings import ResolvedSettings
from blob2gpu.sources import ShardRef


def warm_cache(
    cache: NvmeCache, uri: str, settings: ResolvedSettings, credential: Any = None
) -> tuple[CacheFill, int]:
    """List the Blob checkpoint `uri` and start filling `cache` with the shards it lacks (their
    listed versions, checked against the manifest under the `verify` policy); returns the fill
    job and how many shards were already cached. Raises InvalidArgument for a URI that is not a
    Blob URI, and what listing raises (BlobNotFound, AccessDenied, ManifestMissing, ...);
    BlobArchived for an archived shard the cache does not hold."""
    from blob2gpu.loading.prepare import read_manifest, resolve_source
    from blob2gpu.loading.request import LoadRequest
    from blob2gpu.sources.azure.container import HttpSessions
    from blob2gpu.sources.azure.failures import archived_error
    from blob2gpu.sources.azure.location import is_blob_uri

    if not is_blob_uri(uri):
        raise InvalidArgument(
            f"cache warm fills the cache of a Blob checkpoint (az://, https://), not '{uri}': "
            "local files are read from where they are"
        )
    request = LoadRequest.make(uri, "cpu", "dlpack", credential, settings, {}, None, None)
    http = HttpSessions()
    try:
        source = resolve_source(request, lambda: http)
        manifest = read_manifest(request, source, source.plan)
    finally:
        http.close()
    location = source.container.location
    missing = shards_to_fill(cache, location, source.plan, manifest)
    archived = {f.ref.path: f.ref.archived for f in missing if f.ref.archived}
    if archived:
        raise archived_error(location, archived, "warming the cache")
    job = start_fill(cache, missing, request.uri, request.settings, credential)
    return job, len(source.plan.shards) - len(missing)


def refetch_entry(
    cache: NvmeCache, entry: CacheEntry, settings: ResolvedSettings
) -> tuple[CacheFill | None, str | None]:
    """Remove a damaged entry and start fetching its blob again, the version it held (its
    etag), from the account the environment names (else the public endpoint of its account);
    returns the fill job, or None and why it cannot be fetched again."""
    meta = entry.meta
    cache.remove(entry)
    fields = ("account", "container", "blob", "etag", "size")
    if not all(meta.get(k) for k in fields):
        return None, "its metadata does not say which blob it holds"
    uri = _entry_uri(meta["account"], meta["container"], meta["blob"])
    ref = ShardRef(posixpath.basename(meta["blob"]), meta["blob"], int(meta["size"]), meta["etag"])
    location = type("Location", (), {"account": meta["account"], "container": meta["container"]})
    key, identity = cache_identity(location, ref)
    sha256 = meta.get("sha256")
    shard = FillShard(ref.name, key, identity, ref, sha256 if isinstance(sha256, str) else None)
    return start_fill(cache, [shard], uri, settings), None


def _entry_uri(account: str, container: str, blob: str) -> str:
    """The blob's URI: az:// when the environment's account is the entry's (its endpoint, an
    emulator's included, and credential come from there), else the account's public endpoint."""
    from blob2gpu.sources.azure.location import parse_blob_uri

    try:
        if parse_blob_uri(f"az://{container}/{blob}").account == account:
            return f"az://{container}/{blob}"
    except InvalidArgument:
        pass
    return f"https://{account}.blob.core.windows.net/{container}/{blob}"
