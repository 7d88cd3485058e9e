"""Azure Blob Storage: names, credentials, listing, and the ranged-GET feeder."""
