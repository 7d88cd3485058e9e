"""An entry's record (entries/<key>.json): what its writer says it wrote, read as hostile input.

The record names the blob version the entry holds (account, container, blob, etag, size), so a
lookup can tell an entry of another version from the one it wants, and the CRC32C of every chunk
written, so `cache verify` can tell a damaged disk from a good one. It is never the reference a
load trusts the bytes by (cache/checks.py says what is): whoever can write the directory can
write a record. It is read bounded, parsed with every field checked, and any record that is not
exactly what a writer of this version makes is malformed: its entry is a miss.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

RECORD_VERSION = 1
MAX_RECORD_BYTES = 16 << 20  # 4 MiB chunks of a 5 TB blob, with room to spare
MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 1 << 30
IDENTITY = ("account", "container", "blob", "etag", "size")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class MalformedRecord(ValueError):
    """A record that no writer of this version makes; `why` says what is wrong with it."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True)
class EntryRecord:
    """A parsed, checked record."""

    account: str
    container: str
    blob: str
    etag: str | None
    size: int
    chunk_bytes: int
    crc32c: tuple[int, ...]
    sha256: str | None = None
    created: float = 0.0

    def identity(self) -> dict[str, Any]:
        """What the record says the entry holds, as lookups compare it."""
        return {k: getattr(self, k) for k in IDENTITY}

    def to_json(self) -> str:
        meta: dict[str, Any] = dict(
            self.identity(),
            version=RECORD_VERSION,
            chunk_bytes=self.chunk_bytes,
            crc32c=list(self.crc32c),
            created=self.created or time.time(),
        )
        if self.sha256:
            meta["sha256"] = self.sha256
        return json.dumps(meta)

    def as_dict(self) -> dict[str, Any]:
        """The record as its JSON says it (listings, `cache ls --json`)."""
        parsed: dict[str, Any] = json.loads(self.to_json())
        return parsed


def _int(meta: dict[str, Any], key: str, low: int, high: int) -> int:
    value = meta.get(key)
    if type(value) is not int:  # bool is an int subclass: refused too
        raise MalformedRecord(f"'{key}' is not an integer")
    if not low <= value <= high:
        raise MalformedRecord(f"'{key}' {value} is outside [{low}, {high}]")
    return value


def parse_record(raw: bytes) -> EntryRecord:
    """The record in `raw` (a sidecar's bytes, at most MAX_RECORD_BYTES); raises
    MalformedRecord saying what is wrong."""
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: a deeply nested document
        raise MalformedRecord(f"not JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise MalformedRecord("not a JSON object")
    if meta.get("version") != RECORD_VERSION or type(meta.get("version")) is not int:
        raise MalformedRecord("not a record of this version")
    for key in ("account", "container", "blob"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise MalformedRecord(f"'{key}' is not a name")
    etag = meta.get("etag")
    if etag is not None and not isinstance(etag, str):
        raise MalformedRecord("'etag' is not a string")
    size = _int(meta, "size", 0, 1 << 62)
    chunk_bytes = _int(meta, "chunk_bytes", MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
    crcs = meta.get("crc32c")
    if not isinstance(crcs, list):
        raise MalformedRecord("'crc32c' is not a list")
    chunks = -(-size // chunk_bytes)
    if len(crcs) != chunks:
        raise MalformedRecord(f"{len(crcs)} CRC32C values for {chunks} chunk(s)")
    if not all(type(c) is int and 0 <= c < 1 << 32 for c in crcs):
        raise MalformedRecord("a CRC32C value is not a 32-bit unsigned integer")
    sha256 = meta.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        raise MalformedRecord("'sha256' is not 64 hex digits")
    created = meta.get("created")
    if not (type(created) is float or (type(created) is int and abs(created) < 1 << 53)):
        created = 0.0
    return EntryRecord(
        account=meta["account"],
        container=meta["container"],
        blob=meta["blob"],
        etag=etag,
        size=size,
        chunk_bytes=chunk_bytes,
        crc32c=tuple(crcs),
        sha256=sha256,
        created=float(created),
    )
