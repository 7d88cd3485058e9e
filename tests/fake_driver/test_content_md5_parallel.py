"""Content-MD5 (a Blob checkpoint without a manifest, its shards read from the NVMe cache) is one
sequential hash per shard: the io threads read each such shard's chunks one after another and
hash shards side by side, instead of all of them queueing behind one shard's hash at the speed of
one core. Its bytes arrive in order, so none is copied aside to wait for the hash."""

from __future__ import annotations

import hashlib

import pytest
from blob2gpu import _core, errors
from conftest import sparse_checkpoint

SHARDS, SHARD_BYTES, SLOT = 4, 16 << 20, 1 << 20


def md5_of(path) -> bytes:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.digest()


def load(device: str, paths, digests):
    pipeline = _core.LoadPipeline(
        device,
        staging_slots=8,
        staging_slot_bytes=SLOT,
        copy_streams=2,
        io_threads=SHARDS,
        use_pinned_host_fallback=True,
    )
    try:
        sources = [
            _core.ShardSource(p.name, size=p.stat().st_size, path=str(p), content_md5=d)
            for p, d in zip(paths, digests, strict=True)
        ]
        session = pipeline.start_local(sources)
        try:
            while session.next_shard() is not None:
                pass
            session.wait_landed()
            return session.stats()
        finally:
            session.close()
    finally:
        pipeline.close()


@pytest.fixture
def md5_shards(tmp_path):
    paths = [
        sparse_checkpoint(
            tmp_path / f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors", SHARD_BYTES, f"huge.{i}"
        )
        for i in range(SHARDS)
    ]
    return paths, [md5_of(p) for p in paths]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_shards_are_hashed_side_by_side_in_order(request, device, md5_shards):
    if device == "cuda":
        request.getfixturevalue("fake_driver")
    stats = load(device if device == "cpu" else "cuda:0", *md5_shards)
    assert stats.verified_bytes == SHARDS * md5_shards[0][0].stat().st_size
    assert stats.peak_md5_shards >= 2  # one hash per shard, several shards at once
    assert stats.md5_parked_bytes == 0  # each shard's chunks arrived in order


def test_a_wrong_content_md5_still_fails_the_shard(fake_driver, md5_shards):
    paths, digests = md5_shards
    digests = [*digests[:-1], bytes(16)]
    with pytest.raises(errors.ChecksumMismatch, match=paths[-1].name):
        load("cuda:0", paths, digests)
