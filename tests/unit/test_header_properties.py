"""Header parsing, property-tested: what hypothesis writes round-trips, what it breaks is refused.

Valid shards (random names, every safetensors dtype, shapes with zeros and scalars, metadata, any
key order, any JSON spacing) written as real files parse to exactly the entries written, and the
reference ``safetensors`` package reads the same files the same way. Shards broken at the byte
level (flips, truncations, insertions, deletions) or at the JSON level (wrong types, offsets off by
some, unknown dtypes, missing fields) either still parse into a header that keeps the layout rules
or raise a subclass of ``blob2gpu.errors.InvalidHeader`` naming the shard: never anything else.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from blob2gpu import _core, errors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

SHARD = "shard"
BITS = {row["name"]: row["bits"] for row in _core.dtype_table()}
PROPERTY_SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- generating valid shards ------------------------------------------------------------------
names = st.text(st.characters(exclude_categories=["Cs"]), max_size=12).filter(
    lambda n: n != "__metadata__"
)
shapes = st.lists(st.integers(0, 5), max_size=4)
metadata = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=4)


def numel(shape: list[int]) -> int:
    return math.prod(shape)


def byte_size(dtype: str, shape: list[int]) -> int:
    return numel(shape) * BITS[dtype] // 8


@st.composite
def tensor_specs(draw: st.DrawFn) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, shape) in data-region order; sub-byte tensors get a whole number of bytes."""
    specs = []
    for name in draw(st.lists(names, max_size=8, unique=True)):
        dtype = draw(st.sampled_from(sorted(BITS)))
        shape = draw(shapes)
        if numel(shape) * BITS[dtype] % 8:
            shape = [*shape, 4]  # 4 x 4 bits and 4 x 6 bits are whole bytes
        specs.append((name, dtype, shape))
    return specs


@st.composite
def shards(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """A valid shard's bytes, and what parsing it must give."""
    specs = draw(tensor_specs())
    entries, offset = [], 0
    for name, dtype, shape in specs:
        size = byte_size(dtype, shape)
        entries.append(
            (name, {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]})
        )
        offset += size
    # The JSON key order is independent of the data order; __metadata__ goes anywhere.
    keyed = draw(st.permutations(entries))
    meta = draw(metadata)
    if meta is not None:
        keyed.insert(draw(st.integers(0, len(keyed))), ("__metadata__", meta))
    text = json.dumps(
        dict(keyed),
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
        indent=draw(st.sampled_from([None, 1])),
    ).encode()
    text += b" " * draw(st.sampled_from([0, -len(text) % 8]))  # safetensors pads to 8 bytes
    data = bytes(i % 251 for i in range(offset))
    # Sorted by offsets; zero-size tensors at one offset keep their order in the JSON.
    json_rank = {name: i for i, (name, _) in enumerate(keyed)}
    ordered = sorted(
        (e for e in keyed if e[0] != "__metadata__"),
        key=lambda e: (*e[1]["data_offsets"], json_rank[e[0]]),
    )
    expected = {
        "header_bytes": len(text),
        "data_offset": 8 + len(text),
        "data_bytes": offset,
        "tensors": [
            {
                "name": name,
                "dtype": e["dtype"],
                "shape": tuple(e["shape"]),
                "begin": e["data_offsets"][0],
                "end": e["data_offsets"][1],
            }
            for name, e in ordered
        ],
        "metadata": meta or {},
    }
    return struct.pack("<Q", len(text)) + text + data, expected


def check_invariants(header: dict[str, Any], file_size: int) -> None:
    """The layout rules any header the parser accepts must keep."""
    assert header["data_offset"] == 8 + header["header_bytes"] <= file_size
    assert header["data_bytes"] == file_size - header["data_offset"]
    position = 0
    seen: set[str] = set()
    for t in header["tensors"]:
        assert t["name"] not in seen
        seen.add(t["name"])
        assert t["begin"] == position, "sorted and contiguous from 0"
        assert all(d >= 0 for d in t["shape"])
        assert t["end"] - t["begin"] == byte_size(t["dtype"], list(t["shape"]))
        assert numel(list(t["shape"])) * BITS[t["dtype"]] % 8 == 0
        position = t["end"]
    assert position == header["data_bytes"], "the tensors cover the data region exactly"
    assert all(isinstance(v, str) for v in header["metadata"].values())


def parse_or_refuse(data: bytes) -> None:
    """Parse mutated bytes: a header that keeps the rules, or InvalidHeader naming the shard."""
    try:
        header = _core.parse_header(data, file_size=None, shard=SHARD)
    except errors.InvalidHeader as e:
        assert str(e).startswith(f"shard '{SHARD}'"), str(e)
        return
    check_invariants(header, len(data))


# --- valid shards round-trip ------------------------------------------------------------------
@settings(PROPERTY_SETTINGS, max_examples=150)
@given(shards())
def test_valid_shards_round_trip(shard: tuple[bytes, dict[str, Any]]) -> None:
    raw, expected = shard
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(raw)
        header = _core.parse_header(path.read_bytes(), file_size=path.stat().st_size, shard=SHARD)
        assert header == expected
        check_invariants(header, len(raw))
        # The reference reads the same file the same way.
        with safe_open(str(path), framework="numpy") as f:
            assert sorted(f.keys()) == sorted(t["name"] for t in expected["tensors"])
            assert (f.metadata() or {}) == expected["metadata"]
            for t in expected["tensors"]:
                assert tuple(f.get_slice(t["name"]).get_shape()) == t["shape"]


def test_parse_header_gives_the_documented_fields() -> None:
    raw = b'{"a":{"dtype":"F4","shape":[2,3],"data_offsets":[0,3]},"__metadata__":{"k":"v"}}'
    header = _core.parse_header(struct.pack("<Q", len(raw)) + raw + bytes(3))
    assert header == {
        "header_bytes": len(raw),
        "data_offset": 8 + len(raw),
        "data_bytes": 3,
        "tensors": [{"name": "a", "dtype": "F4", "shape": (2, 3), "begin": 0, "end": 3}],
        "metadata": {"k": "v"},
    }


# --- broken shards are refused, never crash ---------------------------------------------------
@st.composite
def byte_mutations(draw: st.DrawFn) -> bytes:
    raw, _ = draw(shards())
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(TOKENS))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "length" and len(data) >= 8:
            declared = struct.unpack_from("<Q", data)[0]
            delta = draw(st.sampled_from([-8, -1, 1, 8, 2**32, 2**63]))
            struct.pack_into("<Q", data, 0, (declared + delta) % 2**64)
    return bytes(data)


TOKENS = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"\\", b"-1", b"1e3", b"null", b"\\ud800"]


@settings(PROPERTY_SETTINGS, max_examples=400)
@given(byte_mutations())
def test_byte_level_mutations_parse_or_raise_invalid_header(data: bytes) -> None:
    parse_or_refuse(data)


def wrong_value() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**65), 2**65),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=4),
        st.lists(st.integers(-3, 2**64), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
    )


@st.composite
def json_mutations(draw: st.DrawFn) -> bytes:
    """A valid shard whose header dict is broken one field at a time, then written back."""
    raw, _ = draw(shards())
    n = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    for _ in range(draw(st.integers(1, 3))):
        names = [k for k in header if k != "__metadata__"]
        kind = draw(st.sampled_from(["field", "offsets", "dtype", "shape", "drop", "metadata"]))
        if kind == "metadata":
            header["__metadata__"] = draw(wrong_value())
            continue
        if not names:
            header[draw(st.text(max_size=3))] = draw(wrong_value())
            continue
        entry = header[draw(st.sampled_from(names))]
        if not isinstance(entry, dict):
            continue
        if kind == "field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "x"]))] = draw(
                wrong_value()
            )
        elif kind == "offsets" and isinstance(entry.get("data_offsets"), list):
            i = draw(st.integers(0, len(entry["data_offsets"])))
            delta = draw(st.sampled_from([-1, 1, 2, 8, 2**64]))
            if i < len(entry["data_offsets"]):
                entry["data_offsets"][i] += delta
            else:
                entry["data_offsets"].append(delta)
        elif kind == "dtype":
            entry["dtype"] = draw(st.sampled_from([*sorted(BITS), "f32", "F12", "", "BF16 "]))
        elif kind == "shape" and isinstance(entry.get("shape"), list):
            entry["shape"] = draw(
                st.lists(st.integers(-1, 2**64) | st.sampled_from([2**31, 2**62]), max_size=5)
            )
        elif kind == "drop":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
    text = json.dumps(header)
    if header and draw(st.integers(0, 9)) == 0:  # a key twice, which a dict cannot hold
        key = draw(st.sampled_from(sorted(header)))
        text = f"{text[:-1]}, {json.dumps(key)}: {json.dumps(header[key])}}}"
    text = text.encode()
    data_size = len(data) + draw(st.sampled_from([0, 0, 0, -1, 1]))
    return struct.pack("<Q", len(text)) + text + bytes(max(data_size, 0))


@settings(PROPERTY_SETTINGS, max_examples=400)
@given(json_mutations())
def test_json_level_mutations_parse_or_raise_invalid_header(data: bytes) -> None:
    parse_or_refuse(data)


@pytest.mark.parametrize("size", range(0, 9))
def test_every_short_prefix_is_header_truncated(size: int) -> None:
    raw = struct.pack("<Q", 2) + b"{}"
    with pytest.raises(errors.HeaderTruncated):
        _core.parse_header(raw[:size])
