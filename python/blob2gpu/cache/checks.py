"""What a cache entry's bytes are checked against: an authority from Blob, which the writers of the
cache directory cannot forge.

  manifest      the checkpoint's blob2gpu.manifest.json, read from Blob by the load: the CRC32C
                (or, under verify='sha256', the SHA-256) of every chunk, checked by the core per
                chunk as a hit is read, before any of the shard's tensors is handed out.
  content-md5   without a manifest, the blob's Content-MD5 from the listing: the core hashes a
                hit in file order as it reads it, and the last byte decides, before the shard is
                published (whole-blob: nothing of the shard is handed out earlier).
  none          neither: the entry's own record (cache/record.py) is all there is, which only
                tells a damaged disk from a good one. Such entries are read only from a
                directory no other user can write (CacheDirectory.shared is False).

Both checks run in the core as it reads the hit, not in a read-through before the load: the entry
is read once, its bytes never pass through Python, and the core hands a shard's tensors out only
once all its bytes have landed and passed (a streamed load included), so a whole-blob MD5 holds
back nothing that a per-chunk check would release earlier; what it costs is the MD5 itself, on
the core's threads. A failed check is repaired within the load (cache/source.py).

Outside a load (the fill's read-back, `cache warm`, `cache verify`) the same comparisons run here
over a file read once (hash_file).
"""

from __future__ import annotations

from dataclasses import dataclass

from blob2gpu import _core

CHUNK_BYTES = 4 << 20  # the chunking of an entry's record


@dataclass(frozen=True)
class BlobChecks:
    """What Blob says a shard's bytes are: the manifest's (chunk_bytes, CRC32C per chunk) and
    file SHA-256, or the blob's Content-MD5; all None when it says neither."""

    chunk_crc32c: tuple[int, tuple[int, ...]] | None = None
    sha256: str | None = None
    content_md5: bytes | None = None

    @property
    def authority(self) -> str | None:
        """'manifest', 'content-md5', or None when there is nothing to check against."""
        if self.chunk_crc32c is not None or self.sha256:
            return "manifest"
        if self.content_md5:
            return "content-md5"
        return None


@dataclass(frozen=True)
class FileDigest:
    """A file read once: its size, the CRC32C of each chunk, and the digests asked for."""

    size: int
    crc32c: tuple[int, ...]
    sha256: str | None = None
    md5: bytes | None = None


def hash_file(fd: int, chunk_bytes: int, sha256: bool = False, md5: bool = False) -> FileDigest:
    """Read the open file `fd` from offset 0 to its end (pread: the descriptor's offset does not
    move) and return its FileDigest: CRC32C per `chunk_bytes`, the SHA-256 and MD5 when asked.
    The core reads and hashes the whole file in one call without the GIL. Raises OSError."""
    size, crcs, sha, digest_md5 = _core.hash_file(fd, chunk_bytes, sha256=sha256, md5=md5)
    return FileDigest(size, tuple(crcs), sha, digest_md5)


def check_bytes(fd: int, size: int, checks: BlobChecks) -> str | None:
    """Read the file `fd` once and compare it with `checks` (which has an authority); None when
    they agree, else what differs. Raises OSError."""
    if checks.chunk_crc32c is not None:
        chunk_bytes, expected = checks.chunk_crc32c
        digest = hash_file(fd, chunk_bytes)
    else:
        digest = hash_file(fd, CHUNK_BYTES, sha256=bool(checks.sha256), md5=not checks.sha256)
    if digest.size != size:
        return f"{digest.size} bytes, {size} expected"
    if checks.chunk_crc32c is not None:
        if len(digest.crc32c) != len(expected):
            return f"{len(digest.crc32c)} chunks, the manifest has {len(expected)}"
        bad = next(
            (i for i, (a, b) in enumerate(zip(digest.crc32c, expected, strict=True)) if a != b),
            None,
        )
        if bad is not None:
            return f"chunk {bad} differs from the manifest's CRC32C"
        return None
    if checks.sha256:
        return None if digest.sha256 == checks.sha256 else "SHA-256 differs from the manifest"
    return None if digest.md5 == checks.content_md5 else "MD5 differs from the blob's Content-MD5"
