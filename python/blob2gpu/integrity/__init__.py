"""Manifests (per-chunk CRC32C, per-file SHA-256) and publishing checkpoints with them."""
