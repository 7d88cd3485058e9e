"""Publishing a checkpoint to Azure Blob Storage with its integrity manifest, and writing the
manifest of a checkpoint already there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from blob2gpu import phrasing
from blob2gpu.documents import INDEX_NAME
from blob2gpu.errors import BlobNotFound, InvalidArgument, InvalidHeader
from blob2gpu.integrity.manifest import (
    DEFAULT_CHUNK_BYTES,
    MANIFEST_NAME,
    Manifest,
    hash_stream,
    manifest_for_directory,
)
from blob2gpu.settings import resolve
from blob2gpu.sources import ShardRef, source_class
from blob2gpu.sources.local import LocalSource


def _container(uri: str, credential: Any, settings: dict[str, Any]) -> Any:
    from blob2gpu.sources.azure.container import open_container

    if not source_class(uri).remote:
        raise InvalidArgument(f"'{uri}' is not a Blob URI (az://, https://, path-style http://)")
    return open_container(uri, resolve(settings), credential)


def publish(
    local_dir: str | os.PathLike[str],
    uri: str,
    credential: Any = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    **settings: Any,
) -> Manifest:
    """Upload every file of `local_dir` under the URI's prefix, then the manifest of them; a
    container that does not exist is created first.

    Nothing is uploaded unless the folder holds a whole safetensors checkpoint
    (check_checkpoint). The manifest goes last, so a manifest in storage means its files are all
    there. Returns the manifest. Raises InvalidArgument, SourceUnavailable or an InvalidHeader
    (check_checkpoint), AccessDenied (also when the container is missing and may not be created:
    its hint says what to do) or StorageUnavailable; InvalidArgument, uploading nothing, when the
    prefix already holds shards or an index the folder lacks.
    """
    directory = Path(local_dir)
    if not directory.is_dir():
        raise InvalidArgument(f"'{local_dir}' is not a directory")
    check_checkpoint(directory)
    manifest = manifest_for_directory(directory, chunk_bytes)
    with _container(uri, credential, settings) as container:
        container.create_if_missing()
        prefix = container.location.path.strip("/")
        _refuse_other_weights(container, prefix, set(manifest.files))
        for name in sorted(manifest.files):
            blob = f"{prefix}/{name}" if prefix else name

            def upload(path: Path = directory / name, blob: str = blob) -> None:
                with path.open("rb") as f:
                    container.client.upload_blob(blob, f, overwrite=True, max_concurrency=4)

            try:
                container.retry.run(upload, f"uploading {container.location.describe(blob)}", blob)
            except BlobNotFound as e:  # the container is missing, and we may not see or make it
                hint = (
                    f"create container '{container.location.container}' first (az storage "
                    "container create), or use a credential that may create it"
                )
                said = str(e).removesuffix(f"; {e.hint}")  # this hint instead of the URI check
                raise BlobNotFound(said, blob=blob, hint=hint) from None
        _upload_manifest(container, prefix, manifest)
        return manifest


def _refuse_other_weights(container: Any, prefix: str, publishing: set[str]) -> None:
    """Raise InvalidArgument when the prefix already holds shards or an index that the folder
    being published lacks: a load of the prefix would read them beside the new ones (the old
    index naming old shards, two variants of a tensor). Nothing is uploaded then."""
    from blob2gpu.sources.azure.listing import list_level

    level = f"{prefix}/" if prefix else None
    try:
        listed = container.retry.run(lambda: list_level(container, level), "listing", None)
    except BlobNotFound:  # no container (not made: may not be): nothing in it to refuse
        return
    others = sorted(
        name
        for b in listed
        if (name := b.name.rsplit("/", 1)[-1]) not in publishing
        and (name.endswith(".safetensors") or name == INDEX_NAME)
    )
    if others:
        shown = phrasing.first_of([repr(n) for n in others])
        raise InvalidArgument(
            f"not publishing to '{prefix or '/'}' in {container.location.describe()}: it "
            f"already holds {shown}, which this folder lacks and a load would read beside the "
            "new files; nothing was uploaded",
            hint="publish to a new prefix (a version of its own), or delete those blobs first",
        )


def check_checkpoint(directory: Path) -> None:
    """Check that `directory` holds a whole safetensors checkpoint before anything of it is
    uploaded: at least one shard (and, with an index, every shard it names), and each
    *.safetensors file's header valid and its length exactly the 8-byte prefix, the header and
    the data its offsets cover (the core's parser). Raises SourceUnavailable (no shards, a shard
    the index names is missing) or the InvalidHeader kind of a bad shard (HeaderTruncated,
    InvalidOffsets for a truncated one, ...), naming it."""
    source = LocalSource(str(directory), resolve())
    plan = source.resolve()  # no shards, or an index naming a missing one: raises
    names = {ref.name for ref in plan.shards}
    shards = [
        ShardRef(name=p.name, path=str(p), size=p.stat().st_size)
        for p in sorted(directory.iterdir())
        if p.name.endswith(".safetensors") and p.is_file() and p.name not in names
    ]
    for ref in (*plan.shards, *shards):
        try:
            source.read_header(ref)
        except InvalidHeader as e:
            failure = e
        else:
            continue
        raise type(failure)(
            f"not publishing '{directory}': {failure.message}; nothing was uploaded",
            shard=failure.shard or ref.name,
            offset=failure.offset,
        )


def write_manifest(
    uri: str, credential: Any = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES, **settings: Any
) -> Manifest:
    """Compute the manifest of a checkpoint already in Blob Storage (downloading each shard and
    aux file once; weights in other formats beside them are left out) and upload it beside the
    shards. Returns it."""
    with _container(uri, credential, settings) as container:
        listing = container.list_checkpoint()
        names = [s.path for s in listing.plan.shards] + [
            a.name for a in listing.aux_blobs if not a.name.endswith(MANIFEST_NAME)
        ]
        manifest = Manifest(chunk_bytes=chunk_bytes)
        for name in names:

            def digest(name: str = name) -> Any:
                downloader = container.client.get_blob_client(name).download_blob(max_concurrency=4)

                def read_into(view: memoryview) -> int:
                    data = downloader.read(len(view))
                    view[: len(data)] = data
                    return len(data)

                return hash_stream(read_into, downloader.size, chunk_bytes)

            where = f"reading {container.location.describe(name)}"
            entry = container.retry.run(digest, where, name)
            manifest.files[name.rsplit("/", 1)[-1]] = entry
        _upload_manifest(container, os.path.dirname(listing.plan.shards[0].path), manifest)
        return manifest


def _upload_manifest(container: Any, directory: str, manifest: Manifest) -> None:
    """Upload `manifest` as MANIFEST_NAME in the blob folder `directory` ('' for the root)."""
    blob = f"{directory}/{MANIFEST_NAME}" if directory else MANIFEST_NAME
    container.retry.run(
        lambda: container.client.upload_blob(blob, manifest.to_json().encode(), overwrite=True),
        f"uploading {container.location.describe(blob)}",
        blob,
    )
