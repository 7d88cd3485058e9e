"""ShardPlan: the shards of one checkpoint, as a source resolved them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ShardRef:
    """One shard: the name errors and reports use, where it is, and its size in bytes."""

    name: str
    path: str  # a local path, or the blob name
    size: int
    etag: str | None = None  # blobs: the etag seen at listing; every range is pinned to it
    content_md5: bytes | None = None  # blobs: the Content-MD5 property, when the blob has one
    archived: str | None = None  # blobs: why the service refuses its bytes now (Archive tier)


@dataclass(frozen=True)
class ShardPlan:
    """The shards to load in order, and the index's weight map when the checkpoint has one."""

    uri: str
    shards: tuple[ShardRef, ...]
    weight_map: dict[str, str] | None = field(default=None)
    location: Any = None  # a BlobLocation for Blob checkpoints, None for local files

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)
