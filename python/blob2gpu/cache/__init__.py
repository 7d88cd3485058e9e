"""The node-local NVMe cache tier of Blob shards."""
