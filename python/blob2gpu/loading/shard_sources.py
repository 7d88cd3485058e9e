"""The shards of a plan as the core starts a load from them: one _core.ShardSource each."""

from __future__ import annotations

from collections.abc import Sequence

from blob2gpu import _core
from blob2gpu.sources.plan import ShardRef


def shard_sources(
    shards: Sequence[ShardRef],
    checksums: Sequence[_core.ChunkChecksums | None] | None = None,
    paths: Sequence[str] | None = None,
    content_md5: Sequence[bytes | None] | None = None,
) -> list[_core.ShardSource]:
    """One ShardSource per shard, in order: its name and size, its checksums, the local file the
    core reads (paths[i]; '' or no `paths`: a shard the caller fetches) and the Content-MD5 to
    check it by. Each list, when given, has one entry per shard. Raises ValueError when a list
    has another length, and InvalidArgument for a Content-MD5 that is not 16 bytes."""
    count = len(shards)
    for given in (checksums, paths, content_md5):
        if given is not None and len(given) != count:
            raise ValueError(f"{len(given)} per-shard entries for {count} shards")
    return [
        _core.ShardSource(
            ref.name,
            size=ref.size,
            path=paths[i] if paths is not None else "",
            checksums=checksums[i] if checksums is not None else None,
            content_md5=content_md5[i] if content_md5 is not None else None,
        )
        for i, ref in enumerate(shards)
    ]
