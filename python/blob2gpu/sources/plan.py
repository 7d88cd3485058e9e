"""ShardPlan: the shards of one checkpoint, as a source resolved them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ShardRef:
    """One shard: the name errors and reports use, where it is, and its size in bytes."""

    name: str
    path: str
    size: int


@dataclass(frozen=True)
class ShardPlan:
    """The shards to load in order, and the index's weight map when the checkpoint has one."""

    uri: str
    shards: tuple[ShardRef, ...]
    weight_map: dict[str, str] | None = field(default=None)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)
