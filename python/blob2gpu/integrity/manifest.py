"""The integrity manifest, written at publish time beside the shards as blob2gpu.manifest.json:
per file its size, SHA-256, and the CRC32C and SHA-256 of each fixed-size chunk. Loads verify
every chunk as it lands (in the core, before its copy to the device): by CRC32C (verify='auto' or
'crc32c'), or by SHA-256 (verify='sha256', for tamper evidence). The whole-file SHA-256 checks
files at publish time and in `blob2gpu cache verify`.

    {"format": "blob2gpu-manifest", "version": 1, "chunk_bytes": 4194304,
     "files": {"model-00001-of-00002.safetensors":
               {"size": 123, "sha256": "…", "crc32c": [305419896, …], "sha256_chunks": ["…"]}}}

"sha256_chunks" is optional (manifests written before it existed lack it; verify='sha256' then
asks for a new one).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blob2gpu import _core, phrasing
from blob2gpu.documents import (
    MANIFEST_MAX_BYTES,
    clip,
    clipped_repr,
    parse_json,
    read_regular_file,
)
from blob2gpu.errors import InvalidManifest, ManifestMissing

MANIFEST_NAME = "blob2gpu.manifest.json"
FORMAT = "blob2gpu-manifest"
VERSION = 1
DEFAULT_CHUNK_BYTES = 4 << 20


@dataclass
class FileEntry:
    """One file: its size, SHA-256 (hex), and the CRC32C and SHA-256 (hex) of each chunk."""

    size: int
    sha256: str
    crc32c: list[int]
    sha256_chunks: list[str] | None = None


@dataclass
class Manifest:
    """Checksums of a checkpoint's files, chunked at `chunk_bytes`."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    files: dict[str, FileEntry] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "chunk_bytes": self.chunk_bytes,
                "files": {
                    name: {"size": e.size, "sha256": e.sha256, "crc32c": e.crc32c}
                    | ({"sha256_chunks": e.sha256_chunks} if e.sha256_chunks is not None else {})
                    for name, e in sorted(self.files.items())
                },
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> Manifest:
        """Parse and validate a manifest; raises InvalidManifest naming `source` and the problem
        (a document nesting more than documents.MAX_DEPTH deep is not one)."""
        doc = parse_json(text, InvalidManifest, f"manifest '{source}'")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise InvalidManifest(f"'{source}' is not a blob2gpu manifest (format {FORMAT!r})")
        if doc.get("version") != VERSION:
            raise InvalidManifest(
                f"manifest '{source}' has version {clipped_repr(doc.get('version'))}; this "
                f"blob2gpu reads version {VERSION}",
                hint="upgrade blob2gpu",
            )
        chunk = doc.get("chunk_bytes")
        files = doc.get("files")
        if not isinstance(chunk, int) or chunk <= 0 or not isinstance(files, dict):
            raise InvalidManifest(f"manifest '{source}' lacks chunk_bytes or files")
        manifest = cls(chunk_bytes=chunk)
        for name, entry in files.items():
            try:
                size, sha, crcs = entry["size"], entry["sha256"], entry["crc32c"]
                shas = entry.get("sha256_chunks")
                ok = (
                    isinstance(size, int)
                    and size >= 0
                    and isinstance(sha, str)
                    and len(sha) == 64
                    and isinstance(crcs, list)
                    and len(crcs) == -(-size // chunk)
                    and all(isinstance(c, int) and 0 <= c < 1 << 32 for c in crcs)
                    and (
                        shas is None
                        or (
                            isinstance(shas, list)
                            and len(shas) == len(crcs)
                            and all(_is_hex_digest(d) for d in shas)
                        )
                    )
                )
            except (KeyError, TypeError):
                ok = False
            if not ok:
                raise InvalidManifest(
                    f"manifest '{source}': the entry of '{clip(name)}' is malformed "
                    "(size, sha256, one crc32c and at most one sha256 per chunk)"
                )
            manifest.files[name] = FileEntry(
                size, sha, list(crcs), list(shas) if shas is not None else None
            )
        return manifest

    def checksums_for(
        self, name: str, size: int, algorithm: str = "crc32c"
    ) -> _core.ChunkChecksums | None:
        """The chunk checksums the core checks `name` against: its CRCs, or with
        algorithm='sha256' its per-chunk SHA-256 digests; None when the manifest lacks `name`.
        Raises InvalidManifest when the sizes disagree, or when SHA-256 is asked of an entry
        without chunk digests."""
        entry = self.files.get(name)
        if entry is None:
            return None
        if entry.size != size:
            raise InvalidManifest(
                f"'{name}' has {size} bytes but the manifest says {entry.size}: "
                "the checkpoint changed after it was published"
            )
        if algorithm == "sha256":
            if entry.sha256_chunks is None:
                raise InvalidManifest(
                    f"verify='sha256' but the manifest entry of '{name}' has no per-chunk SHA-256 "
                    "(an older manifest)",
                    hint="write a new one with `blob2gpu manifest URI`",
                )
            digests = [bytes.fromhex(d) for d in entry.sha256_chunks]
            return _core.ChunkChecksums(self.chunk_bytes, sha256=digests)
        return _core.ChunkChecksums(self.chunk_bytes, crc32c=entry.crc32c)


def _is_hex_digest(value: Any) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def hash_stream(
    read_into: Callable[[memoryview], int], size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> FileEntry:
    """Checksum `size` bytes read chunk by chunk with read_into(view) -> bytes read (0 at end).
    CRC32C and SHA-256 run in the core without the GIL. Raises OSError if the stream ends early."""
    sha = _core.Sha256()
    crcs = []
    chunk_shas = []
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    done = 0
    while done < size:
        want = min(chunk_bytes, size - done)
        got = 0
        while got < want:
            n = read_into(view[got:want])
            if not n:
                raise OSError(f"stream ended after {done + got} of {size} bytes")
            got += n
        crcs.append(_core.crc32c(view[:want]))
        chunk_sha = _core.Sha256()
        chunk_sha.update(view[:want])
        chunk_shas.append(chunk_sha.hexdigest())
        sha.update(view[:want])
        done += want
    return FileEntry(size=size, sha256=sha.hexdigest(), crc32c=crcs, sha256_chunks=chunk_shas)


def hash_file(path: str | os.PathLike[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> FileEntry:
    """The manifest entry of a local file."""
    with open(path, "rb", buffering=0) as f:
        return hash_stream(f.readinto, os.fstat(f.fileno()).st_size, chunk_bytes)


def manifest_for_directory(
    directory: str | os.PathLike[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Manifest:
    """A manifest of every file in `directory` (not recursive; the manifest itself excluded)."""
    manifest = Manifest(chunk_bytes=chunk_bytes)
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and path.name != MANIFEST_NAME:
            manifest.files[path.name] = hash_file(path, chunk_bytes)
    return manifest


def read_local_manifest(directory: str | os.PathLike[str]) -> Manifest | None:
    """The manifest beside local shards, or None when there is none. Raises InvalidManifest
    for one that is no regular file (a FIFO, a device), larger than documents.MANIFEST_MAX_BYTES,
    unreadable or malformed."""
    path = Path(directory) / MANIFEST_NAME
    if _core.stat_paths([os.fsencode(path)], follow_symlinks=False)[0].error in (
        errno.ENOENT,
        errno.ENOTDIR,
    ):
        return None
    data = read_regular_file(path, MANIFEST_MAX_BYTES, InvalidManifest, "manifest")
    return Manifest.from_json(data, str(path))


def require_manifest(manifest: Manifest | None, verify: str, where: str) -> Manifest | None:
    """`manifest` as it is, unless `verify` needs one ('crc32c', 'sha256') and there is none:
    then ManifestMissing naming `where` and how to publish one."""
    if manifest is None and verify in ("crc32c", "sha256"):
        raise ManifestMissing(
            f"verify='{verify}' but {where} has no {MANIFEST_NAME}",
            hint="publish it with `blob2gpu publish` or `blob2gpu manifest`",
        )
    return manifest


def core_checksums(
    manifest: Manifest | None, shards: Any, algorithm: str = "crc32c"
) -> list[_core.ChunkChecksums | None] | None:
    """Per shard, the chunk checksums the core checks it against (by `algorithm`: crc32c or
    sha256), or None without a manifest. Raises InvalidManifest for a shard the manifest lacks:
    a manifest vouches for every shard a load reads, or the checkpoint changed after it was
    published (a shard added or replaced, a second checkpoint published over the prefix)."""
    if manifest is None:
        return None
    checksums = [manifest.checksums_for(s.name, s.size, algorithm) for s in shards]
    unlisted = [s.name for s, c in zip(shards, checksums, strict=True) if c is None]
    if unlisted:
        raise InvalidManifest(
            f"{MANIFEST_NAME} does not list "
            f"{phrasing.first_of([repr(n) for n in unlisted], noun='shards')}: "
            "the checkpoint changed after it was published",
            hint="publish it again (`blob2gpu publish`), or load it unchecked (verify='none')",
        )
    return checksums
