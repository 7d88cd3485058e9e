"""Where bytes come from: a typed Source per kind of storage (sources/source.py says what a source
is), chosen by the URI's scheme. Local files are read by the core's threads (pread, no GIL);
Azure Blob Storage is sources/azure; the node's NVMe cache wraps a source (cache/source.py).
"""

from __future__ import annotations

from blob2gpu.sources import local
from blob2gpu.sources.azure import source as azure
from blob2gpu.sources.plan import ShardPlan, ShardRef
from blob2gpu.sources.source import Connections, Source, open_source, source_class

__all__ = [
    "Connections",
    "ShardPlan",
    "ShardRef",
    "Source",
    "azure",
    "local",
    "open_source",
    "source_class",
]
