"""Repairing a damaged NVMe cache entry within the load that finds it.

A cache hit is checked as the core reads it (loading/cache_plan.py): against the manifest per
chunk, or the blob's Content-MD5 over the whole blob, before any tensor of the shard is handed
out. When a check fails (or the entry cannot be read, or its header is not a safetensors header),
the core fails its session with an error naming the shard. The Checkpoint then keeps what that
session completed (the shards handed out, and those published but not yet taken), closes it,
removes the entry's data (its record stays, so `blob2gpu cache verify --repair` sees the entry
until a fetch replaces it), and starts a new session for the shards not handed out yet, the
damaged one fetched from Blob and written through (loading.prepare.continue_load). Any number of
entries are repaired so, one new session each; the report's cache_repaired lists them. When the
fetch from Blob fails too, the load's error names the entry and `cache verify --repair`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blob2gpu.errors import (
    Blob2GpuError,
    ChecksumMismatch,
    InvalidHeader,
    SourceReadError,
    SourceUnavailable,
)

if TYPE_CHECKING:
    from blob2gpu.loading.cache_plan import CachePlan
    from blob2gpu.sources import ShardPlan

# What a damaged, malformed, unreadable or replaced entry makes the core raise for its shard.
REPAIRABLE = (ChecksumMismatch, InvalidHeader, SourceReadError, SourceUnavailable)


def damaged_hit(cache: CachePlan, plan: ShardPlan, error: BaseException) -> int | None:
    """The index of the cache hit that `error` (the core's, naming its shard) condemns, or None
    when it concerns no hit of this session."""
    if not isinstance(error, REPAIRABLE) or error.shard is None:
        return None
    for index in cache.hits:
        if plan.shards[index].name == error.shard:
            return index
    return None


def what_was_wrong(error: Blob2GpuError) -> str:
    """The error that condemned an entry, as the report says it (its kind and first line)."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def unrepaired(error: BaseException, shard: str, entry_key: str) -> BaseException:
    """`error`, raised where the shard whose cache entry `entry_key` failed its check could not be
    fetched again (storage unreachable, ...), saying so and how to repair the entry later."""
    if not isinstance(error, Blob2GpuError):
        return error
    hint = (
        f"shard '{shard}' was to be fetched again from Blob because its NVMe cache entry "
        f"{entry_key} failed its check (its data was removed); once storage is reachable, "
        "`blob2gpu cache verify --repair` (or the next load) fetches it again"
    )
    message = f"{error.message or error}; {hint}"
    changed = error.evolve(hint=hint)
    if isinstance(changed, ChecksumMismatch):
        changed.cache_entry = entry_key
    changed.message = message
    changed.args = (message,)
    return changed
