"""Where bytes come from. A source turns a URI into a ShardPlan: the shards to load, in order.

Local files are read by the core's threads (pread, no GIL); Azure Blob Storage arrives as its own
source module.
"""

from __future__ import annotations

from blob2gpu.sources.local import resolve_local
from blob2gpu.sources.plan import ShardPlan, ShardRef

__all__ = ["ShardPlan", "ShardRef", "resolve"]


def resolve(uri: str) -> ShardPlan:
    """Resolve a checkpoint URI to the shards to load.

    Accepts a ``.safetensors`` file, a directory of shards, a ``model.safetensors.index.json``, each
    optionally as a ``file://`` URL. Raises SourceUnavailable when nothing loadable is there,
    InvalidIndex for a malformed index, InvalidArgument for a URI form this build cannot read.
    """
    return resolve_local(uri)
