"""Filling a node's NVMe cache without loading anything (`blob2gpu cache warm`: a DaemonSet or a
node-prep job before pods land), and fetching a damaged entry again (`cache verify --repair`).
Both are the cache fill (cache/fill.py), listed and checked as a load lists and checks (loading/
prepare.py). Warming reads every entry already there through and checks it against Blob's
authority (the manifest, else the blob's Content-MD5; cache/checks.py), fetching a damaged one
again; a shard with neither is not warmed into a directory other users can write (no load would
read it from there)."""

from __future__ import annotations

import posixpath
from typing import Any

from blob2gpu.cache.fill import CacheFill, FillShard
from blob2gpu.cache.nvme import CacheEntry, NvmeCache
from blob2gpu.errors import InvalidArgument
from blob2gpu.loading.cache_plan import NO_AUTHORITY, cache_identity, shards_to_fill, start_fill
from blob2gpu.settings import ResolvedSettings
from blob2gpu.sources import ShardRef


def warm_cache(
    cache: NvmeCache, uri: str, settings: ResolvedSettings, credential: Any = None
) -> tuple[CacheFill, dict[str, str]]:
    """List the Blob checkpoint `uri` and start filling `cache`: each shard's entry already there
    is read and checked (its result's `cached`, or `repaired` and fetched again), the others
    fetched (their listed versions, checked against the manifest under the `verify` policy, else
    the Content-MD5); returns the fill job, and the shards not warmed and why (nothing from Blob
    to check them by, in a directory other users can write). Raises InvalidArgument for a URI
    that is not a Blob URI, and what listing raises (BlobNotFound, AccessDenied,
    ManifestMissing, ...); BlobArchived for an archived shard the cache does not hold."""
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
    shards = shards_to_fill(cache, location, source.plan, manifest, check_cached=True)
    refused = {}
    if cache.shared:
        refused = {s.name: NO_AUTHORITY for s in shards if s.checks.authority is None}
        shards = [s for s in shards if s.name not in refused]
    archived = {
        s.ref.path: s.ref.archived
        for s in shards
        if s.ref.archived and cache.lookup(s.key, s.identity) is None
    }
    if archived:
        raise archived_error(location, archived, "warming the cache")
    job = start_fill(cache, shards, request.uri, request.settings, credential)
    return job, refused


def refetch_entry(
    cache: NvmeCache, entry: CacheEntry, settings: ResolvedSettings
) -> tuple[CacheFill | None, str | None]:
    """Remove a damaged entry and start fetching its blob again, the version it held (its
    etag), from the account the environment names (else the public endpoint of its account);
    returns the fill job, or None and why it cannot be fetched again."""
    record = entry.record
    cache.remove(entry)
    if record is None or not record.etag:
        return None, "its record does not say which blob version it holds"
    uri = _entry_uri(record.account, record.container, record.blob)
    ref = ShardRef(posixpath.basename(record.blob), record.blob, record.size, record.etag)
    location = type("Location", (), {"account": record.account, "container": record.container})
    key, identity = cache_identity(location, ref)
    # The record is not a reference for the bytes: the fetch is pinned to the etag, and checked
    # against what it received.
    shard = FillShard(ref.name, key, identity, ref)
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
