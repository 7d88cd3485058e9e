"""What a Blob URI resolves to: one level of the container listed, the shards chosen (by the
index when there is one), each pinned to the etag and size seen here, and the other files beside
them (config, tokenizer, the manifest).

With native_http on (the default) the listing's pages and the index are read by the core's
RangeClient without the GIL (Python signs the requests and parses the XML, one call each);
with it off, by azure-storage-blob. Both give the same ListedBlobs."""

from __future__ import annotations

import base64
import binascii
import posixpath
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from blob2gpu.documents import INDEX_MAX_BYTES, INDEX_NAME, clip
from blob2gpu.errors import BlobNotFound, InvalidArgument, InvalidIndex, SourceUnavailable
from blob2gpu.integrity.manifest import MANIFEST_NAME
from blob2gpu.sources.azure.failures import archived_reason
from blob2gpu.sources.azure.location import BlobLocation
from blob2gpu.sources.plan import (
    CONVERT_FIRST,
    ShardPlan,
    ShardRef,
    index_weight_map,
    is_other_weight_file,
    unread_weights_note,
)

if TYPE_CHECKING:
    from blob2gpu.sources.azure.container import BlobContainer
    from blob2gpu.sources.azure.native_clients import NativeHttp

LIST_PAGE_ENTRIES = 1000  # entries asked for per page of the listing
LIST_PAGE_MAX_BYTES = 8 << 20  # a page of LIST_PAGE_ENTRIES is ~1 MiB of XML; more is refused


@dataclass(frozen=True)
class ListedBlob:
    """One blob of a listed level, as the service described it."""

    name: str  # the blob's full name
    size: int
    etag: str
    content_md5: bytes | None  # the 16 bytes of its Content-MD5, when it has one
    archived: str | None  # why the service refuses its bytes now (failures.archived_reason)


@dataclass
class BlobListing:
    """What a Blob URI resolved to: the plan, and the other files beside the weights."""

    plan: ShardPlan
    # The non-weight files beside the shards: config, tokenizer, the index, ... (other weight
    # formats left out).
    aux_blobs: list[ListedBlob]
    manifest: ListedBlob | None = None  # blob2gpu.manifest.json beside the shards, if any


def list_checkpoint(container: BlobContainer) -> BlobListing:
    """List the checkpoint at the container's location; every request goes through its retry
    policy. Raises BlobNotFound, AccessDenied, InvalidIndex, SourceUnavailable (naming the
    missing shard) or StorageUnavailable."""
    location, retry = container.location, container.retry
    path = location.path.rstrip("/")
    if is_other_weight_file(path):  # a URI naming a pytorch_model.bin: not a folder of shards
        raise InvalidArgument(
            f"{location.describe(path)} is not safetensors: blob2gpu loads safetensors only",
            hint=CONVERT_FIRST,
        )
    if path.endswith(".safetensors") or path.endswith(".index.json"):
        directory = posixpath.dirname(path)
    else:
        directory = path
    by_name = {
        b.name: b
        for b in retry.run(
            lambda: list_level(container, f"{directory}/" if directory else None),
            "listing",  # the error names the container (the place): not twice
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
            weight_map = _read_index(container, by_name[index])
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
        b
        for n, b in by_name.items()
        if n not in weights and not n.endswith(".safetensors") and not is_other_weight_file(n)
    ]
    manifest_name = posixpath.join(directory, MANIFEST_NAME) if directory else MANIFEST_NAME
    plan = ShardPlan(
        uri=container.display_uri,
        shards=tuple(_shard_ref(by_name[n]) for n in shard_names),
        weight_map=weight_map,
    )
    return BlobListing(plan=plan, aux_blobs=aux, manifest=by_name.get(manifest_name))


def list_level(container: BlobContainer, prefix: str | None) -> list[ListedBlob]:
    """The blobs directly under `prefix`, folders left out.

    One level only: a checkpoint's shards, index and aux files sit side by side, and a container
    (or a prefix holding other runs' folders) may hold far more blobs below."""
    if container.native is not None:
        blobs, folders = _list_level_native(container.native, prefix)
    else:
        blobs, folders = _list_level_sdk(container.client, prefix)
    # A hierarchical-namespace account (ADLS Gen2) lists each folder as an empty blob too.
    return [b for b in blobs if not (b.size == 0 and b.name in folders)]


def _list_level_native(native: NativeHttp, prefix: str | None) -> tuple[list[ListedBlob], set[str]]:
    """(blobs, folder names without their '/') of one level, page by page through the core."""
    blobs: list[ListedBlob] = []
    folders: set[str] = set()
    marker: str | None = None
    markers: set[str] = set()
    while True:
        target, headers = native.signer.list_get(prefix, marker, LIST_PAGE_ENTRIES)
        page = native.get_document(target, headers, LIST_PAGE_MAX_BYTES)
        marker = parse_list_page(page, blobs, folders)
        if not marker:
            return blobs, folders
        if marker in markers:  # a server that would have it listed forever
            raise SourceUnavailable(f"the listing sent page marker '{clip(marker)}' twice")
        markers.add(marker)


def parse_list_page(page: bytes, blobs: list[ListedBlob], folders: set[str]) -> str | None:
    """Add the blobs and folders of one page of List Blobs' XML to `blobs` and `folders`;
    returns the marker of the next page (None: this was the last). Raises ConnectionError (a
    transient failure: the answer was cut or garbled on its way) for a page that is not the
    service's listing."""
    if b"<!DOCTYPE" in page or b"<!ENTITY" in page:  # the service declares none: no expansion
        raise ConnectionError("the listing declares a DTD, which the service never sends")
    try:
        root = ElementTree.fromstring(page)
    except ElementTree.ParseError as e:
        raise ConnectionError(f"the listing is not well-formed XML ({e})") from None
    entries = root.find("Blobs")
    if root.tag != "EnumerationResults" or entries is None:
        raise ConnectionError(f"the listing is not List Blobs' XML (a <{clip(root.tag)}>)")
    for entry in entries:
        name = _entry_name(entry)
        if entry.tag == "BlobPrefix":
            folders.add(name.rstrip("/"))
        elif entry.tag == "Blob":
            blobs.append(_listed_blob(name, entry.find("Properties")))
    return root.findtext("NextMarker") or None


def _entry_name(entry: ElementTree.Element) -> str:
    """An entry's name, percent-decoded when the service encoded it (a name holding characters
    XML 1.0 cannot carry)."""
    element = entry.find("Name")
    if element is None or not element.text:
        raise ConnectionError("the listing has an entry without a name")
    text = element.text
    return unquote(text) if element.get("Encoded") == "true" else text


def _listed_blob(name: str, properties: ElementTree.Element | None) -> ListedBlob:
    """The ListedBlob of a <Blob> whose <Properties> are `properties`."""
    size = properties.findtext("Content-Length") if properties is not None else None
    etag = properties.findtext("Etag") if properties is not None else None
    if properties is None or not etag or size is None or not size.isascii() or not size.isdigit():
        raise ConnectionError(f"the listing's blob '{clip(name)}' has no size or etag")
    md5_text = properties.findtext("Content-MD5")
    try:
        md5 = base64.b64decode(md5_text, validate=True) if md5_text else None
    except (binascii.Error, ValueError):
        md5 = None  # as the SDK's: a Content-MD5 that is not base64 is no checksum
    return ListedBlob(
        name=name,
        size=int(size),
        etag=etag,
        content_md5=md5 if md5 is not None and len(md5) == 16 else None,
        archived=archived_reason(
            properties.findtext("AccessTier"), properties.findtext("ArchiveStatus")
        ),
    )


def _list_level_sdk(container_client: Any, prefix: str | None) -> tuple[list[ListedBlob], set[str]]:
    """(blobs, folder names without their '/') of one level, through azure-storage-blob."""
    from azure.storage.blob import BlobPrefix

    blobs: list[ListedBlob] = []
    folders: set[str] = set()
    for item in container_client.walk_blobs(name_starts_with=prefix, delimiter="/"):
        if isinstance(item, BlobPrefix):
            folders.add(item.name.rstrip("/"))
            continue
        md5 = getattr(item.content_settings, "content_md5", None)
        blobs.append(
            ListedBlob(
                name=item.name,
                size=int(item.size),
                etag=item.etag,
                content_md5=bytes(md5) if md5 and len(md5) == 16 else None,
                archived=archived_reason(item.blob_tier, getattr(item, "archive_status", None)),
            )
        )
    return blobs, folders


def _shard_ref(blob: ListedBlob) -> ShardRef:
    """The ShardRef of a listed blob: its size and etag as listed, its MD5 when it has one."""
    return ShardRef(
        name=posixpath.basename(blob.name),
        path=blob.name,
        size=blob.size,
        etag=blob.etag,
        content_md5=blob.content_md5,
        archived=blob.archived,
    )


def _read_index(container: BlobContainer, index: ListedBlob) -> dict[str, str]:
    """The weight map of the listed index blob `index`, read at its listed version. Raises
    InvalidIndex (also for one larger than documents.INDEX_MAX_BYTES, before it is read), or the
    typed storage error the retry policy raises for a failed read."""
    if index.size > INDEX_MAX_BYTES:
        raise InvalidIndex(
            f"index '{clip(index.name)}' is {index.size} bytes, more than an index holds "
            f"({INDEX_MAX_BYTES >> 20} MiB): it is not one"
        )
    raw = container.read_small_blob(index.name, index.etag, index.size)
    return index_weight_map(raw, index.name, file_names_only=True)


def _indexed_shards(
    location: BlobLocation,
    directory: str,
    index: str,
    weight_map: dict[str, str],
    by_name: dict[str, ListedBlob],
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
