"""Checksums of the integrity manifest: CRC32C per chunk and SHA-256 per file.

CRC32C must be the value Azure Storage and the ``crc32c`` package compute (checked against that
package when it is installed, against a pure-Python CRC and published vectors otherwise), on every
size and alignment that exercises the hardware path's head, three-way blocks and tail; the portable
code must agree with it. SHA-256 must equal ``hashlib.sha256`` however the input is split. Both take
any buffer (bytes, bytearray, memoryview, numpy arrays) in place.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable

import numpy as np
import pytest
from blob2gpu import _core

try:
    import crc32c as crc32c_package
except ImportError:  # the published vectors and the pure-Python CRC below still check the values
    crc32c_package = None

KiB = 1024
MiB = 1024 * KiB


def _python_crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _python_crc32c_table()


def python_crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C written from its definition, byte by byte (slow: small inputs only)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = (crc >> 8) ^ _TABLE[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFFFFFF


def reference_crc32c(data: bytes) -> int:
    if crc32c_package is not None:
        return crc32c_package.crc32c(data)
    assert len(data) <= 64 * KiB, "the pure-Python reference is for small inputs"
    return python_crc32c(data)


CRC_FUNCTIONS = [
    pytest.param(_core.crc32c, id="best"),
    pytest.param(_core.crc32c_portable, id="portable"),
]
SHA_IMPLEMENTATIONS = [pytest.param(False, id="best"), pytest.param(True, id="portable")]

# Around the hardware path's boundaries: 8-byte words, 3 x 256-byte and 3 x 8 KiB blocks.
BLOCK_EDGES = [3 * 256 - 1, 3 * 256, 3 * 256 + 1, 3 * 8 * KiB - 1, 3 * 8 * KiB, 3 * 8 * KiB + 1]
LARGE_SIZES = [KiB, 4 * KiB - 1, 4 * KiB, *BLOCK_EDGES, 2 * 3 * 8 * KiB + 3 * 256 + 13]
LARGE_SIZES += [64 * KiB + 5, MiB, MiB + 7, 3 * MiB + 1, 8 * MiB]


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --- CRC32C -----------------------------------------------------------------------------------
@pytest.mark.parametrize("crc", CRC_FUNCTIONS)
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"123456789", 0xE3069283),
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
    ids=["empty", "123456789", "zeros", "ones", "ascending", "descending"],
)
def test_crc32c_published_vectors(crc: Callable[..., int], data: bytes, expected: int) -> None:
    # RFC 3720 (iSCSI) B.4 and the check value of CRC-32/ISCSI.
    assert crc(data) == expected


def test_crc32c_pure_python_reference_matches_published_vectors() -> None:
    assert python_crc32c(b"123456789") == 0xE3069283
    assert python_crc32c(bytes(range(32))) == 0x46DD794E


@pytest.mark.parametrize("crc", CRC_FUNCTIONS)
def test_crc32c_small_buffers_at_every_alignment(crc: Callable[..., int]) -> None:
    backing = random_bytes(70 + 16, seed=1)
    for offset in range(16):
        for size in range(71):
            view = memoryview(backing)[offset : offset + size]
            assert crc(view) == reference_crc32c(bytes(view)), (offset, size)


@pytest.mark.parametrize("crc", CRC_FUNCTIONS)
@pytest.mark.parametrize("size", LARGE_SIZES)
def test_crc32c_large_buffers(crc: Callable[..., int], size: int) -> None:
    data = random_bytes(size + 7, seed=size)
    for offset in (0, 3, 7):
        view = memoryview(data)[offset : offset + size]
        if crc32c_package is not None or size <= 64 * KiB:
            assert crc(view) == reference_crc32c(bytes(view)), offset
        assert crc(view) == _core.crc32c_portable(view), offset


def test_crc32c_hardware_and_portable_agree_on_random_buffers() -> None:
    rng = random.Random(2)
    for _ in range(300):
        size = rng.choice([rng.randrange(0, 2 * KiB), rng.randrange(0, 200 * KiB)])
        data = rng.randbytes(size)
        seed_crc = rng.getrandbits(32)
        assert _core.crc32c(data, seed_crc) == _core.crc32c_portable(data, seed_crc), size


def test_crc32c_folding_boundaries_agree_with_the_portable_code() -> None:
    # The carry-less folding path takes 256-byte steps from 512 bytes on, then 16-byte steps,
    # then single bytes: every remainder around those edges, from any alignment and seed.
    data = random_bytes(8 * KiB + 64, seed=9)
    for size in (*range(496, 530), *range(760, 790), 1024 + 15, 4096 + 255, 8 * KiB):
        for offset in (0, 1, 13):
            view = memoryview(data)[offset : offset + size]
            for seed in (0, 0xFFFFFFFF, 0x12345678):
                assert _core.crc32c(view, seed) == _core.crc32c_portable(view, seed), (size, seed)


def test_crc32c_reports_which_path_runs() -> None:
    assert isinstance(_core.crc32c_hardware(), bool)
    if crc32c_package is not None and hasattr(crc32c_package, "hardware_based"):
        # Same CPU, same instruction set: both should find the CRC instructions, or neither.
        assert _core.crc32c_hardware() == crc32c_package.hardware_based


@pytest.mark.parametrize("crc", CRC_FUNCTIONS)
def test_crc32c_chains_across_split_points(crc: Callable[..., int]) -> None:
    data = random_bytes(100 * KiB + 3, seed=3)
    whole = crc(data)
    for cut in (0, 1, 7, 8, 9, 767, 768, 4095, 24577, 50_000, len(data) - 1, len(data)):
        assert crc(data[cut:], crc(data[:cut])) == whole, cut
    # Many small pieces of odd sizes.
    rng = random.Random(4)
    running, position = 0, 0
    while position < len(data):
        step = rng.randrange(1, 3000)
        running = crc(data[position : position + step], running)
        position += step
    assert running == whole


def test_crc32c_combine_joins_chunk_crcs() -> None:
    data = random_bytes(300 * KiB, seed=5)
    for cut in (0, 1, 13, 4096, 100_000, len(data)):
        a, b = data[:cut], data[cut:]
        assert _core.crc32c_combine(_core.crc32c(a), _core.crc32c(b), len(b)) == _core.crc32c(data)
    chunks = [data[i : i + 64 * KiB] for i in range(0, len(data), 64 * KiB)]
    total = 0
    for chunk in chunks:
        total = _core.crc32c_combine(total, _core.crc32c(chunk), len(chunk))
    assert total == _core.crc32c(data)


def test_crc32c_reads_numpy_arrays_and_views_in_place() -> None:
    array = np.random.default_rng(6).standard_normal((257, 33), dtype=np.float32)
    raw = array.tobytes()
    expected = _core.crc32c_portable(raw)
    assert _core.crc32c(array) == expected
    assert _core.crc32c(memoryview(array)) == expected
    assert _core.crc32c(array.view(np.uint8)) == expected
    assert _core.crc32c(bytearray(raw)) == expected
    assert _core.crc32c(array[10:20]) == _core.crc32c(raw[10 * 33 * 4 : 20 * 33 * 4])
    readonly = array.copy()
    readonly.flags.writeable = False
    assert _core.crc32c(readonly) == expected


def test_crc32c_rejects_what_is_not_a_contiguous_buffer() -> None:
    with pytest.raises(TypeError):
        _core.crc32c("text is not bytes")
    with pytest.raises((BufferError, ValueError)):
        _core.crc32c(np.zeros((8, 8), dtype=np.uint8)[:, ::2])
    with pytest.raises((BufferError, ValueError)):
        _core.crc32c(memoryview(bytes(64))[::2])


@pytest.mark.parametrize("bad", [-1, 2**32])
def test_crc32c_seed_must_be_a_32_bit_crc(bad: int) -> None:
    with pytest.raises(TypeError):
        _core.crc32c(b"abc", bad)


def test_crc32c_gives_the_same_answer_from_many_threads() -> None:
    data = np.random.default_rng(7).integers(0, 256, 4 * MiB, dtype=np.uint8)
    expected = _core.crc32c_portable(data)
    results: list[int] = []

    def work() -> None:
        results.extend(_core.crc32c(data) for _ in range(5))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 20


# --- SHA-256 ----------------------------------------------------------------------------------
def sha256(data: object, portable: bool) -> _core.Sha256:
    digest = _core.Sha256(portable=portable)
    digest.update(data)
    return digest


@pytest.mark.parametrize("portable", SHA_IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        (
            b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        ),
        (b"a" * 1_000_000, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"),
    ],
    ids=["empty", "abc", "two-blocks", "million-a"],
)
def test_sha256_fips_vectors(portable: bool, message: bytes, expected: str) -> None:
    # FIPS 180-4 examples (NIST CSRC) and the million-'a' vector.
    assert sha256(message, portable).hexdigest() == expected


@pytest.mark.parametrize("portable", SHA_IMPLEMENTATIONS)
def test_sha256_small_buffers_at_every_alignment(portable: bool) -> None:
    backing = random_bytes(200 + 16, seed=8)
    for offset in range(16):
        for size in range(201):  # every padding case: 55, 56, 63, 64, 119, 120, ...
            view = memoryview(backing)[offset : offset + size]
            expected = hashlib.sha256(view).digest()
            assert sha256(view, portable).digest() == expected, (offset, size)


@pytest.mark.parametrize("portable", SHA_IMPLEMENTATIONS)
@pytest.mark.parametrize("size", LARGE_SIZES)
def test_sha256_large_buffers(portable: bool, size: int) -> None:
    data = random_bytes(size + 5, seed=size)[5:]
    assert sha256(data, portable).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("portable", SHA_IMPLEMENTATIONS)
def test_sha256_incremental_updates_with_odd_split_points(portable: bool) -> None:
    data = random_bytes(300 * KiB + 17, seed=9)
    expected = hashlib.sha256(data).digest()
    rng = random.Random(10)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(data)), rng.randrange(1, 40)))
        digest = _core.Sha256(portable=portable)
        for begin, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            digest.update(memoryview(data)[begin:end])
        assert digest.digest() == expected, cuts
    # One byte at a time across several block boundaries, and empty updates in between.
    digest = _core.Sha256(portable=portable)
    for i in range(300):
        digest.update(data[i : i + 1])
        digest.update(b"")
    assert digest.digest() == hashlib.sha256(data[:300]).digest()


def test_sha256_digest_does_not_end_the_stream() -> None:
    digest = _core.Sha256(b"hello ")
    reference = hashlib.sha256(b"hello ")
    assert digest.hexdigest() == reference.hexdigest()
    digest.update(b"world")
    reference.update(b"world")
    assert digest.digest() == reference.digest()
    assert digest.digest() == reference.digest()  # reading it twice changes nothing


def test_sha256_reads_numpy_arrays_and_memoryviews() -> None:
    array = np.random.default_rng(11).integers(0, 2**31, (123, 45), dtype=np.int64)
    expected = hashlib.sha256(array.tobytes()).hexdigest()
    assert _core.Sha256(array).hexdigest() == expected
    assert _core.Sha256(memoryview(array)).hexdigest() == expected
    assert _core.Sha256(bytearray(array.tobytes())).hexdigest() == expected
    with pytest.raises(TypeError):
        _core.Sha256().update("text is not bytes")
    with pytest.raises((BufferError, ValueError)):
        _core.Sha256().update(array[:, ::3])


def test_sha256_describes_itself() -> None:
    assert _core.Sha256.name == "sha256"
    assert _core.Sha256.digest_size == 32
    assert _core.Sha256.block_size == 64
    assert _core.Sha256(portable=True).hardware is False
    assert _core.Sha256().hardware == _core.sha256_hardware()


def test_sha256_shared_between_threads_stays_consistent() -> None:
    # Identical chunks: whatever order the threads take the lock in, the digest is the same, and
    # an unlocked race would corrupt it.
    chunk = np.random.default_rng(12).integers(0, 256, MiB + 13, dtype=np.uint8)
    digest = _core.Sha256()

    def work() -> None:
        for _ in range(4):
            digest.update(chunk)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert digest.digest() == hashlib.sha256(chunk.tobytes() * 16).digest()
