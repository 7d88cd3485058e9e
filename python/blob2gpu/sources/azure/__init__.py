"""Azure Blob Storage, one module per job: location.py (URIs, connection strings),
credentials.py, container.py (the client of one load), listing.py (URI -> shards), failures.py
(what a failed request means), retry.py (backoff), transport.py (the only code that touches
azure-storage-blob internals), range_reader.py (one ranged GET into caller memory) and feeder.py
(the concurrent ranged GETs of a load)."""
