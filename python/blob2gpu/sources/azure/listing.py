"""What a Blob URI resolves to: one level of the container listed, the shards chosen (by the
index when there is one), each pinned to the etag and size seen here, and the other files beside
them (config, tokenizer, the manifest)."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blob2gpu.documents import INDEX_MAX_BYTES, clip, parse_json
from blob2gpu.errors import BlobNotFound, InvalidIndex, SourceUnavailable
from blob2gpu.sources.azure.failures import archived_reason
from blob2gpu.sources.azure.location import BlobLocation
from blob2gpu.sources.plan import (
    ShardPlan,
    ShardRef,
    is_other_weight_file,
    unread_weights_note,
)

if TYPE_CHECKING:
    from blob2gpu.sources.azure.retry import RetryPolicy

INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "blob2gpu.manifest.json"


@dataclass(frozen=True)
class AuxBlob:
    """A non-weight file beside the shards (config.json, tokenizer files, the index, ...)."""

    name: str  # the blob's full name
    size: int
    etag: str
    archived: str | None = None  # why the service refuses its bytes now (Archive tier)


@dataclass
class BlobListing:
    """What a Blob URI resolved to: the plan, and the other files beside the weights."""

    plan: ShardPlan
    aux_blobs: list[AuxBlob]  # config, tokenizer, ... files (other weight formats left out)
    manifest_blob: str | None = None  # blob2gpu.manifest.json beside the shards, if any
    manifest_bytes: int = 0  # its size as listed


def list_checkpoint(
    container_client: Any, location: BlobLocation, retry: RetryPolicy
) -> BlobListing:
    """List the checkpoint at `location`; every request goes through `retry`. Raises
    BlobNotFound, AccessDenied, InvalidIndex, SourceUnavailable (naming the missing shard) or
    StorageUnavailable."""
    path = location.path.rstrip("/")
    if path.endswith(".safetensors") or path.endswith(".index.json"):
        directory = posixpath.dirname(path)
    else:
        directory = path
    by_name = {
        b.name: b
        for b in retry.run(
            lambda: _list_level(container_client, f"{directory}/" if directory else None),
            f"listing {location.describe()}",
            None,
        )
    }
    weight_map = None
    if path.endswith(".safetensors"):
        if path not in by_name:
            raise BlobNotFound(f"{location.describe(path)} does not exist")
        shard_names = [path]
    else:
        index = path if path.endswith(".index.json") else posixpath.join(directory, INDEX_NAME)
        if path.endswith(".index.json") and index not in by_name:
            raise BlobNotFound(f"{location.describe(index)} does not exist")
        if index in by_name:
            weight_map = _read_index(container_client, location, retry, by_name[index])
            shard_names = _indexed_shards(location, directory, index, weight_map, by_name)
        else:
            shard_names = sorted(n for n in by_name if n.endswith(".safetensors"))
            if not shard_names:
                raise BlobNotFound(
                    f"no .safetensors blobs and no {INDEX_NAME} under "
                    f"'{directory or '/'}' in {location.describe()}"
                    + unread_weights_note(posixpath.basename(n) for n in by_name)
                )
    weights = set(shard_names)
    aux = [
        AuxBlob(n, int(b.size), b.etag, archived_reason(b))
        for n, b in by_name.items()
        if n not in weights and not n.endswith(".safetensors") and not is_other_weight_file(n)
    ]
    manifest_name = posixpath.join(directory, MANIFEST_NAME) if directory else MANIFEST_NAME
    plan = ShardPlan(
        uri=f"{location.account_url}/{location.container}/{location.path}",
        shards=tuple(_shard_ref(by_name[n]) for n in shard_names),
        weight_map=weight_map,
    )
    manifest = by_name.get(manifest_name)
    return BlobListing(
        plan=plan,
        aux_blobs=aux,
        manifest_blob=manifest_name if manifest is not None else None,
        manifest_bytes=int(manifest.size) if manifest is not None else 0,
    )


def _list_level(container_client: Any, prefix: str | None) -> list[Any]:
    """The blobs directly under `prefix` (the SDK's BlobProperties), folders left out.

    One level only: a checkpoint's shards, index and aux files sit side by side, and a container
    (or a prefix holding other runs' folders) may hold far more blobs below."""
    from azure.storage.blob import BlobPrefix

    listed = list(container_client.walk_blobs(name_starts_with=prefix, delimiter="/"))
    folders = {b.name.rstrip("/") for b in listed if isinstance(b, BlobPrefix)}
    # A hierarchical-namespace account (ADLS Gen2) lists each folder as an empty blob too.
    return [
        b
        for b in listed
        if not isinstance(b, BlobPrefix) and not (b.size == 0 and b.name in folders)
    ]


def _shard_ref(blob: Any) -> ShardRef:
    """The ShardRef of a listed blob: its size and etag as listed, its MD5 when it has one."""
    md5 = getattr(blob.content_settings, "content_md5", None)
    return ShardRef(
        name=posixpath.basename(blob.name),
        path=blob.name,
        size=int(blob.size),
        etag=blob.etag,
        content_md5=bytes(md5) if md5 and len(md5) == 16 else None,
        archived=archived_reason(blob),
    )


def _read_index(
    container_client: Any, location: BlobLocation, retry: RetryPolicy, index: Any
) -> dict[str, str]:
    """The weight map of the listed index blob `index`, read at its listed version. Raises
    InvalidIndex (also for one larger than documents.INDEX_MAX_BYTES, before it is read), or the
    typed storage error `retry` raises for a failed read."""
    if int(index.size) > INDEX_MAX_BYTES:
        raise InvalidIndex(
            f"index '{clip(index.name)}' is {int(index.size)} bytes, more than an index holds "
            f"({INDEX_MAX_BYTES >> 20} MiB): it is not one"
        )
    raw = retry.run(
        lambda: (
            container_client.get_blob_client(index.name)
            .download_blob(etag=index.etag, match_condition=if_unchanged())
            .readall()
        ),
        f"reading {location.describe(index.name)}",
        index.name,
    )
    return _parse_index(raw, index.name)


def _indexed_shards(
    location: BlobLocation,
    directory: str,
    index: str,
    weight_map: dict[str, str],
    by_name: dict[str, Any],
) -> list[str]:
    """The blob names of the shards the index names, in file-name order. Raises
    SourceUnavailable naming a shard the listing does not hold."""
    shard_names = []
    for f in sorted(set(weight_map.values())):
        name = posixpath.join(directory, f) if directory else f
        if name not in by_name:
            raise SourceUnavailable(
                f"index '{index}' names shard '{clip(f)}', which is not in "
                f"{location.describe()} under '{directory or '/'}'"
            )
        shard_names.append(name)
    return shard_names


def if_unchanged() -> Any:
    """The SDK's match condition for If-Match on the etag passed beside it."""
    from azure.core import MatchConditions

    return MatchConditions.IfNotModified


def _parse_index(raw: bytes, name: str) -> dict[str, str]:
    doc = parse_json(raw, InvalidIndex, f"index '{clip(name)}'")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v and not v.startswith(".")
        for k, v in weight_map.items()
    ):
        raise InvalidIndex(f"index '{name}' has no 'weight_map' of tensor name to shard file name")
    return dict(weight_map)
