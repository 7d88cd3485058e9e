"""The NVMe cache's read-back of an entry (publish, `cache verify`, `cache warm`) is one core call
without the GIL: _core.hash_file reads and hashes the whole file (CRC32C per chunk, SHA-256, MD5)
and the writer's copy of a staging slot's range is made without the GIL (_core.copied). Each is
checked against the reference hashes, and by its count of GIL returns (never a timing)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from blob2gpu import _core
from blob2gpu.cache.checks import hash_file


def _file(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "entry.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    return fd


SIZES_AND_CHUNKS = [
    (size, chunk)
    for size in (0, 1, 1 << 20, (5 << 20) + 3)
    for chunk in (4096, 1 << 20, (3 << 20) + 17, 1 << 40)
] + [(1000, 1), (1000, 3)]  # a chunk shorter than anything: a CRC per byte or three


@pytest.mark.parametrize(("size", "chunk"), SIZES_AND_CHUNKS)
def test_hash_file_equals_the_reference_hashes(tmp_path, size, chunk):
    data = os.urandom(size)
    fd = _file(tmp_path, data)
    try:
        os.lseek(fd, 7 if size > 7 else 0, os.SEEK_SET)
        digest = hash_file(fd, chunk, sha256=True, md5=True)
        assert os.lseek(fd, 0, os.SEEK_CUR) == (7 if size > 7 else 0)  # pread: offset kept
    finally:
        os.close(fd)
    assert digest.size == size
    assert digest.crc32c == tuple(_core.crc32c(data[i : i + chunk]) for i in range(0, size, chunk))
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.md5 == hashlib.md5(data, usedforsecurity=False).digest()


def test_hash_file_computes_only_what_is_asked(tmp_path):
    fd = _file(tmp_path, b"x" * 100)
    try:
        digest = hash_file(fd, 64)
    finally:
        os.close(fd)
    assert (digest.size, len(digest.crc32c), digest.sha256, digest.md5) == (100, 2, None, None)


def test_hash_file_reads_a_whole_entry_with_one_return_of_the_gil(tmp_path):
    fd = _file(tmp_path, os.urandom(16 << 20))
    try:
        before = _core.gil_reacquisitions()
        hash_file(fd, 1 << 20, sha256=True, md5=True)  # 16 chunks: one call, one return
        assert _core.gil_reacquisitions() - before == 1
    finally:
        os.close(fd)


def test_hash_file_raises_oserror_for_a_failed_read(tmp_path):
    fd = _file(tmp_path, b"abc")
    os.close(fd)
    with pytest.raises(OSError) as info:
        hash_file(fd, 1 << 20)
    assert info.value.errno == 9  # EBADF
    directory = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(OSError):  # EISDIR
            hash_file(directory, 1 << 20)
    finally:
        os.close(directory)
    with pytest.raises(ValueError):
        _core.hash_file(0, 0)


def test_copied_copies_a_buffer_with_one_return_of_the_gil_for_large_ones():
    large = os.urandom(8 << 20)
    before = _core.gil_reacquisitions()
    out = _core.copied(memoryview(large)[1:])
    assert _core.gil_reacquisitions() - before == 1
    assert isinstance(out, bytearray) and out == large[1:]
    small = b"0123456789"
    before = _core.gil_reacquisitions()
    assert _core.copied(small) == bytearray(small)
    assert _core.gil_reacquisitions() == before
