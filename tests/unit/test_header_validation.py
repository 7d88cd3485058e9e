"""Header validation: the safetensors header is hostile input.

A shard whose header breaks the format's rules (the reference implementation's: size cap, UTF-8
JSON, known dtypes, shape x dtype == bytes, offsets tiling the data region exactly, no duplicate
names) fails with the typed error that names the diagnosis, and its message names the shard and,
where there is one, the tensor. Headers written by the real ``safetensors`` package parse to the
same entries that ``safetensors.safe_open`` reports.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import blob2gpu
import numpy as np
import pytest
import safetensors
import torch
from blob2gpu import _core, errors
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy_file
from safetensors.torch import save_file as save_torch_file

SHARD = "model-00002-of-00004.safetensors"
U64_MAX = 2**64 - 1


def shard_bytes(header: dict[str, Any] | str | bytes, data: bytes = b"") -> bytes:
    """A shard: little-endian u64 length, the header, then the data region.

    A dict is written as compact JSON; a str is written as UTF-8 as is (for headers a dict cannot
    express: duplicate keys, bad syntax); bytes are written untouched (for bad encodings).
    """
    if isinstance(header, dict):
        text = json.dumps(header, separators=(",", ":")).encode()
    elif isinstance(header, str):
        text = header.encode()
    else:
        text = header
    return struct.pack("<Q", len(text)) + text + data


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def one_tensor(name: str, value: Any, data: bytes = b"\0" * 4) -> bytes:
    """A shard holding one tensor entry `value` (well formed or not) over `data`."""
    return shard_bytes({name: value}, data)


GOOD = entry("F32", [1], 0, 4)


def malformed(raw: bytes, error: type[errors.InvalidHeader], *mentions: str, case_id: str) -> Any:
    return pytest.param(raw, error, mentions, id=case_id)


# Every row: the shard's bytes, the error it must raise, and what its message must mention
# besides the shard name.
MALFORMED = [
    # --- the 8-byte length prefix -------------------------------------------------------------
    malformed(b"", errors.HeaderTruncated, case_id="empty-file"),
    malformed(b"\x10\0\0\0", errors.HeaderTruncated, case_id="file-shorter-than-length-prefix"),
    malformed(
        struct.pack("<Q", 1000) + b"{}",
        errors.HeaderTruncated,
        "1000",
        "past the end of the file",
        case_id="length-points-past-end-of-file",
    ),
    malformed(
        struct.pack("<Q", 100_000_001) + b"{}",
        errors.HeaderTooLarge,
        "100000001",
        case_id="length-over-100MB-cap",
    ),
    malformed(
        struct.pack("<Q", U64_MAX) + b"{}",
        errors.HeaderTooLarge,
        case_id="length-is-u64-max",
    ),
    # --- encoding -----------------------------------------------------------------------------
    malformed(
        shard_bytes(b'{"w\xff":' + json.dumps(GOOD).encode() + b"}", b"\0" * 4),
        errors.HeaderNotUtf8,
        "UTF-8",
        case_id="invalid-utf8-byte-in-name",
    ),
    malformed(shard_bytes(b'{"\xc0\xaf":{}}'), errors.HeaderNotUtf8, case_id="overlong-utf8"),
    malformed(
        shard_bytes(b'{"\xed\xa0\x80":{}}'), errors.HeaderNotUtf8, case_id="utf8-encoded-surrogate"
    ),
    malformed(
        shard_bytes(b'{"\xf4\x90\x80\x80":{}}'),
        errors.HeaderNotUtf8,
        case_id="utf8-above-U+10FFFF",
    ),
    malformed(shard_bytes(b'{"\xe2\x82'), errors.HeaderNotUtf8, case_id="utf8-cut-mid-sequence"),
    # --- JSON syntax --------------------------------------------------------------------------
    malformed(shard_bytes(""), errors.HeaderNotJson, case_id="empty-header"),
    malformed(shard_bytes("        "), errors.HeaderNotJson, case_id="whitespace-only-header"),
    malformed(shard_bytes("{"), errors.HeaderNotJson, "byte", case_id="unterminated-object"),
    malformed(shard_bytes("{'w': 1}"), errors.HeaderNotJson, case_id="single-quoted-key"),
    malformed(
        shard_bytes('{"w":' + json.dumps(GOOD) + ",}", b"\0" * 4),
        errors.HeaderNotJson,
        case_id="trailing-comma",
    ),
    malformed(
        shard_bytes('{"w":' + json.dumps(GOOD) + "} x", b"\0" * 4),
        errors.HeaderNotJson,
        "after the end of the JSON value",
        case_id="garbage-after-the-object",
    ),
    malformed(
        shard_bytes('{"w":' + json.dumps(GOOD) + "}\0\0\0", b"\0" * 4),
        errors.HeaderNotJson,
        case_id="nul-padding-after-the-object",
    ),
    malformed(
        shard_bytes('{"a\nb":' + json.dumps(GOOD) + "}", b"\0" * 4),
        errors.HeaderNotJson,
        "control character",
        case_id="raw-newline-in-name",
    ),
    malformed(shard_bytes('{"a\\qb":{}}'), errors.HeaderNotJson, case_id="invalid-escape"),
    malformed(
        shard_bytes('{"\\ud800":{}}'), errors.HeaderNotJson, "surrogate", case_id="lone-surrogate"
    ),
    malformed(shard_bytes('{"\\u12":{}}'), errors.HeaderNotJson, case_id="short-unicode-escape"),
    malformed(
        shard_bytes('{"w":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}}', b"\0" * 4),
        errors.HeaderNotJson,
        "leading zero",
        case_id="number-with-leading-zero",
    ),
    malformed(
        shard_bytes('{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', b"\0" * 4),
        errors.HeaderNotJson,
        case_id="NaN-is-not-json",
    ),
    malformed(shard_bytes("\ufeff{}"), errors.HeaderNotJson, case_id="byte-order-mark"),
    malformed(shard_bytes("[" * 10_000), errors.HeaderNotJson, case_id="10000-nested-arrays"),
    malformed(
        shard_bytes('{"w":{"x":' + "[" * 10_000 + "]" * 10_000 + "}}"),
        errors.HeaderNotJson,
        "nesting",
        case_id="10000-nested-arrays-in-an-ignored-field",
    ),
    # --- the top level ------------------------------------------------------------------------
    malformed(shard_bytes("[]"), errors.HeaderNotJson, "array", case_id="header-is-json-array"),
    malformed(shard_bytes('"w"'), errors.HeaderNotJson, case_id="header-is-json-string"),
    malformed(shard_bytes("null"), errors.HeaderNotJson, case_id="header-is-json-null"),
    malformed(shard_bytes("42"), errors.HeaderNotJson, case_id="header-is-json-number"),
    # --- a tensor entry -----------------------------------------------------------------------
    malformed(
        one_tensor("layers.0.w", [0, 4]),
        errors.InvalidTensorEntry,
        "layers.0.w",
        case_id="entry-is-a-list",
    ),
    malformed(
        one_tensor("layers.0.w", {"shape": [1], "data_offsets": [0, 4]}),
        errors.InvalidTensorEntry,
        "layers.0.w",
        "dtype",
        case_id="entry-without-dtype",
    ),
    malformed(
        one_tensor("layers.0.w", {"dtype": "F32", "data_offsets": [0, 4]}),
        errors.InvalidTensorEntry,
        "layers.0.w",
        "shape",
        case_id="entry-without-shape",
    ),
    malformed(
        one_tensor("layers.0.w", {"dtype": "F32", "shape": [1]}),
        errors.InvalidTensorEntry,
        "layers.0.w",
        "data_offsets",
        case_id="entry-without-data-offsets",
    ),
    malformed(
        one_tensor("layers.0.w", entry(32, [1], 0, 4)),
        errors.InvalidTensorEntry,
        "layers.0.w",
        case_id="dtype-is-a-number",
    ),
    malformed(
        one_tensor("layers.0.w", {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}),
        errors.InvalidTensorEntry,
        "layers.0.w",
        case_id="shape-is-a-string",
    ),
    malformed(
        one_tensor("layers.0.w", {"dtype": "F32", "shape": [1], "data_offsets": [4]}),
        errors.InvalidTensorEntry,
        "layers.0.w",
        case_id="one-data-offset",
    ),
    malformed(
        one_tensor("layers.0.w", {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}),
        errors.InvalidTensorEntry,
        "layers.0.w",
        case_id="three-data-offsets",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F32", [1], -4, 0)),
        errors.InvalidTensorEntry,
        "layers.0.w",
        "-4",
        case_id="negative-data-offset",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F32", [1], 0, 4.0)),
        errors.InvalidTensorEntry,
        "layers.0.w",
        case_id="float-data-offset",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F32", [1], 0, "4")),
        errors.InvalidTensorEntry,
        "layers.0.w",
        case_id="string-data-offset",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F32", [1], 0, 2**64)),
        errors.InvalidTensorEntry,
        "layers.0.w",
        "18446744073709551616",
        case_id="data-offset-over-u64",
    ),
    malformed(
        shard_bytes(
            '{"layers.0.w":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            b"\0" * 4,
        ),
        errors.InvalidTensorEntry,
        "layers.0.w",
        "dtype",
        case_id="dtype-given-twice",
    ),
    # --- dtype --------------------------------------------------------------------------------
    malformed(
        one_tensor("layers.0.w", entry("F128", [1], 0, 4)),
        errors.UnknownDType,
        "layers.0.w",
        "F128",
        case_id="unknown-dtype",
    ),
    malformed(
        one_tensor("layers.0.w", entry("float32", [1], 0, 4)),
        errors.UnknownDType,
        "layers.0.w",
        case_id="framework-name-instead-of-dtype",
    ),
    malformed(
        one_tensor("layers.0.w", entry("f32", [1], 0, 4)),
        errors.UnknownDType,
        "layers.0.w",
        case_id="lower-case-dtype",
    ),
    # --- shape --------------------------------------------------------------------------------
    malformed(
        one_tensor("layers.0.w", entry("F32", [-1], 0, 4)),
        errors.InvalidShape,
        "layers.0.w",
        "-1",
        case_id="negative-dimension",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F32", [1.0], 0, 4)),
        errors.InvalidShape,
        "layers.0.w",
        case_id="float-dimension",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F32", ["1"], 0, 4)),
        errors.InvalidShape,
        "layers.0.w",
        case_id="string-dimension",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F32", [None], 0, 4)),
        errors.InvalidShape,
        "layers.0.w",
        case_id="null-dimension",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F32", [2**63], 0, 4)),
        errors.InvalidShape,
        "layers.0.w",
        case_id="dimension-over-int64",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F32", [10**30], 0, 4)),
        errors.InvalidShape,
        "layers.0.w",
        case_id="dimension-over-u64",
    ),
    malformed(
        one_tensor("layers.0.w", entry("U8", [2**32, 2**32], 0, 4)),
        errors.InvalidShape,
        "layers.0.w",
        case_id="element-count-overflows",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F64", [2**31, 2**31], 0, 4)),
        errors.InvalidShape,
        "layers.0.w",
        case_id="bit-count-overflows",
    ),
    # --- shape x dtype against the byte range -------------------------------------------------
    malformed(
        one_tensor("layers.0.w", entry("F32", [3, 4], 0, 40), b"\0" * 40),
        errors.TensorSizeMismatch,
        "layers.0.w",
        "[3, 4]",
        "48",
        "40",
        case_id="shape-times-dtype-larger-than-range",
    ),
    malformed(
        one_tensor("layers.0.w", entry("BF16", [3], 0, 8), b"\0" * 8),
        errors.TensorSizeMismatch,
        "layers.0.w",
        "6",
        "8",
        case_id="shape-times-dtype-smaller-than-range",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F4", [3], 0, 2), b"\0" * 2),
        errors.TensorSizeMismatch,
        "layers.0.w",
        "12 bits",
        case_id="F4-tensor-ends-mid-byte",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F6_E2M3", [3], 0, 3), b"\0" * 3),
        errors.TensorSizeMismatch,
        "layers.0.w",
        case_id="F6-tensor-ends-mid-byte",
    ),
    # --- offsets ------------------------------------------------------------------------------
    malformed(
        one_tensor("layers.0.w", entry("F32", [0], 4, 0)),
        errors.InvalidOffsets,
        "layers.0.w",
        case_id="range-ends-before-it-begins",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F32", [1], 4, 8), b"\0" * 8),
        errors.InvalidOffsets,
        "layers.0.w",
        case_id="first-tensor-not-at-offset-0",
    ),
    malformed(
        shard_bytes({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, b"\0" * 12),
        errors.InvalidOffsets,
        "'a'",
        "'b'",
        case_id="gap-between-tensors",
    ),
    malformed(
        shard_bytes({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, b"\0" * 12),
        errors.InvalidOffsets,
        "'a'",
        "'b'",
        "overlaps",
        case_id="overlapping-tensors",
    ),
    malformed(
        shard_bytes({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 0, 4)}, b"\0" * 4),
        errors.InvalidOffsets,
        "'a'",
        "'b'",
        case_id="two-tensors-share-a-range",
    ),
    malformed(
        shard_bytes({"a": entry("F32", [2], 0, 8), "z": entry("U8", [0], 4, 4)}, b"\0" * 8),
        errors.InvalidOffsets,
        "'z'",
        case_id="empty-tensor-inside-another",
    ),
    malformed(
        shard_bytes({"a": entry("F32", [1], 0, 4), "b": entry("F32", [2], 4, 12)}, b"\0" * 8),
        errors.InvalidOffsets,
        "'b'",
        "8",
        "12",
        case_id="last-tensor-past-end-of-file",
    ),
    malformed(
        one_tensor("layers.0.w", entry("F32", [1], 0, 4), b"\0" * 6),
        errors.InvalidOffsets,
        "2 trailing bytes",
        case_id="trailing-bytes-after-last-tensor",
    ),
    malformed(
        one_tensor("layers.0.w", entry("U8", [2**40], 0, 2**40)),
        errors.InvalidOffsets,
        "layers.0.w",
        case_id="offsets-far-out-of-range",
    ),
    malformed(
        shard_bytes({}, b"\0" * 4),
        errors.InvalidOffsets,
        "no tensors",
        case_id="no-tensors-but-data",
    ),
    # --- names --------------------------------------------------------------------------------
    malformed(
        shard_bytes(
            '{"layers.0.w":' + json.dumps(entry("F32", [1], 0, 4)) + ","
            '"layers.0.w":' + json.dumps(entry("F32", [1], 4, 8)) + "}",
            b"\0" * 8,
        ),
        errors.DuplicateTensor,
        "layers.0.w",
        case_id="same-tensor-name-twice",
    ),
    # --- __metadata__ -------------------------------------------------------------------------
    malformed(
        shard_bytes({"__metadata__": {"format": "pt", "step": 1000}, "w": GOOD}, b"\0" * 4),
        errors.InvalidMetadata,
        "step",
        case_id="metadata-value-is-a-number",
    ),
    malformed(
        shard_bytes({"__metadata__": {"format": None}, "w": GOOD}, b"\0" * 4),
        errors.InvalidMetadata,
        "format",
        case_id="metadata-value-is-null",
    ),
    malformed(
        shard_bytes({"__metadata__": {"nested": {"a": "b"}}, "w": GOOD}, b"\0" * 4),
        errors.InvalidMetadata,
        "nested",
        case_id="metadata-value-is-an-object",
    ),
    malformed(
        shard_bytes({"__metadata__": ["format", "pt"], "w": GOOD}, b"\0" * 4),
        errors.InvalidMetadata,
        case_id="metadata-is-a-list",
    ),
    malformed(
        shard_bytes({"__metadata__": "pt", "w": GOOD}, b"\0" * 4),
        errors.InvalidMetadata,
        case_id="metadata-is-a-string",
    ),
    malformed(
        shard_bytes('{"__metadata__":{"format":"pt","format":"np"}}'),
        errors.InvalidMetadata,
        "format",
        case_id="metadata-key-twice",
    ),
    malformed(
        shard_bytes('{"__metadata__":{},"__metadata__":{}}'),
        errors.InvalidMetadata,
        case_id="metadata-given-twice",
    ),
]

# Rows where blob2gpu is stricter than the reference, which accepts them: there a repeated
# __metadata__ key silently replaces the earlier value.
STRICTER_THAN_REFERENCE = {"metadata-key-twice"}

HEADER_ERRORS = [
    errors.HeaderTooLarge,
    errors.HeaderTruncated,
    errors.HeaderNotUtf8,
    errors.HeaderNotJson,
    errors.InvalidTensorEntry,
    errors.UnknownDType,
    errors.InvalidShape,
    errors.InvalidOffsets,
    errors.TensorSizeMismatch,
    errors.DuplicateTensor,
    errors.InvalidMetadata,
]


def assert_names_shard(message: str, shard: str = SHARD) -> None:
    assert message.startswith(f"shard '{shard}': "), message


@pytest.mark.parametrize(("raw", "error", "mentions"), MALFORMED)
def test_malformed_header_raises_its_diagnosis(
    raw: bytes, error: type[errors.InvalidHeader], mentions: tuple[str, ...]
) -> None:
    with pytest.raises(errors.InvalidHeader) as caught:
        _core.parse_header(raw, shard=SHARD)
    assert type(caught.value) is error, str(caught.value)
    message = str(caught.value)
    assert_names_shard(message)
    for text in mentions:
        assert text in message, message


@pytest.mark.parametrize(
    ("raw", "error", "mentions"),
    [case for case in MALFORMED if case.id not in STRICTER_THAN_REFERENCE],
)
def test_reference_implementation_rejects_it_too(
    raw: bytes, error: type[errors.InvalidHeader], mentions: tuple[str, ...]
) -> None:
    # Keeps the table honest: each row breaks a rule the format's own implementation enforces.
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises several unrelated types
        safetensors.deserialize(raw)


@pytest.mark.parametrize(("raw", "error", "mentions"), MALFORMED)
def test_loading_a_malformed_file_raises_its_diagnosis(
    tmp_path: Path, raw: bytes, error: type[errors.InvalidHeader], mentions: tuple[str, ...]
) -> None:
    path = tmp_path / SHARD
    path.write_bytes(raw)
    with pytest.raises(errors.InvalidHeader) as caught:
        blob2gpu.load(str(path), device="cpu", framework="numpy")
    assert type(caught.value) is error, str(caught.value)
    assert SHARD in str(caught.value)


@pytest.mark.parametrize("error", HEADER_ERRORS, ids=lambda cls: cls.__name__)
def test_header_errors_are_invalid_header_errors(error: type[Exception]) -> None:
    assert issubclass(error, errors.InvalidHeader)
    assert issubclass(error, errors.Blob2GpuError)


def test_unknown_dtype_message_lists_the_known_ones() -> None:
    with pytest.raises(errors.UnknownDType) as caught:
        _core.parse_header(one_tensor("w", entry("F128", [1], 0, 4)), shard=SHARD)
    for name in ("BF16", "F8_E4M3", "F4"):
        assert name in str(caught.value)


def test_size_mismatch_message_reads_as_a_diagnosis() -> None:
    raw = one_tensor("layers.0.w", entry("F32", [3, 4], 0, 40), b"\0" * 40)
    with pytest.raises(errors.TensorSizeMismatch) as caught:
        _core.parse_header(raw, shard="model-00002.safetensors")
    assert str(caught.value) == (
        "shard 'model-00002.safetensors': tensor 'layers.0.w': shape [3, 4] x F32 needs 48 bytes"
        f" but data_offsets [0, 40] hold 40; {errors.InvalidHeader.remedy}"  # then what to do
    )


def test_huge_tensor_name_is_clipped_in_the_message() -> None:
    name = "w" * 1_000_000
    with pytest.raises(errors.UnknownDType) as caught:
        _core.parse_header(one_tensor(name, entry("F128", [1], 0, 4)), shard=SHARD)
    assert len(str(caught.value)) < 2_000


# --- headers the format allows ---------------------------------------------------------------


def header_of(raw: bytes) -> dict[str, Any]:
    (length,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8 : 8 + length])


def assert_matches_safetensors(path: Path) -> dict[str, Any]:
    """Parses the file at `path` and checks it against safe_open (names, dtypes, shapes, metadata)
    and the raw JSON (offsets). Returns what blob2gpu parsed."""
    raw = path.read_bytes()
    parsed = _core.parse_header(raw, shard=path.name)
    header = header_of(raw)
    with safe_open(str(path), framework="numpy") as f:
        expected = {
            name: (
                f.get_slice(name).get_dtype(),
                list(f.get_slice(name).get_shape()),
                tuple(header[name]["data_offsets"]),
            )
            for name in f.keys()
        }
        expected_metadata = f.metadata() or {}
    got = {
        t["name"]: (t["dtype"], list(t["shape"]), (t["begin"], t["end"])) for t in parsed["tensors"]
    }
    assert got == expected
    assert len(parsed["tensors"]) == len(expected)
    spans = [(t["begin"], t["end"]) for t in parsed["tensors"]]
    assert spans == sorted(spans), "tensors come back in file order"
    assert parsed["metadata"] == expected_metadata
    (length,) = struct.unpack_from("<Q", raw)
    assert parsed["header_bytes"] == length
    assert parsed["data_offset"] == 8 + length
    assert parsed["data_bytes"] == len(raw) - 8 - length
    return parsed


NUMPY_DTYPES = [
    np.bool_,
    np.uint8,
    np.int8,
    np.uint16,
    np.int16,
    np.uint32,
    np.int32,
    np.uint64,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
]


def test_numpy_written_file_parses_like_safetensors_reads_it(tmp_path: Path) -> None:
    tensors: dict[str, np.ndarray] = {}
    for dtype in NUMPY_DTYPES:
        name = np.dtype(dtype).name
        tensors[f"{name}.matrix"] = np.ones((3, 5), dtype=dtype)
        tensors[f"{name}.scalar"] = np.array(1, dtype=dtype)
        tensors[f"{name}.empty"] = np.zeros((0, 7), dtype=dtype)
    path = tmp_path / "numpy.safetensors"
    save_numpy_file(tensors, str(path), metadata={"format": "np", "note": "¿ünïcödé? 😀"})
    parsed = assert_matches_safetensors(path)
    assert len(parsed["tensors"]) == 3 * len(NUMPY_DTYPES)
    assert parsed["metadata"]["note"] == "¿ünïcödé? 😀"


TORCH_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.uint16,
    torch.int16,
    torch.uint32,
    torch.int32,
    torch.uint64,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e8m0fnu,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float4_e2m1fn_x2,
]


def torch_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype.itemsize == 1 and dtype not in (torch.bool, torch.uint8, torch.int8):
        # The float8 and packed float4 types have no arithmetic on CPU: fill bytes, then view.
        return torch.full(shape, 0x11, dtype=torch.uint8).view(dtype)
    return torch.ones(shape, dtype=torch.float32).to(dtype)


def test_torch_written_file_parses_like_safetensors_reads_it(tmp_path: Path) -> None:
    tensors = {}
    for dtype in TORCH_DTYPES:
        name = str(dtype).removeprefix("torch.")
        tensors[f"{name}.matrix"] = torch_tensor(dtype, (4, 6))
        tensors[f"{name}.empty"] = torch_tensor(dtype, (2, 0))
        if dtype != torch.float4_e2m1fn_x2:  # a 0-dim packed pair has no safetensors shape
            tensors[f"{name}.scalar"] = torch_tensor(dtype, ())
    path = tmp_path / "torch.safetensors"
    save_torch_file(tensors, str(path), metadata={"format": "pt"})
    parsed = assert_matches_safetensors(path)
    dtypes = {t["dtype"] for t in parsed["tensors"]}
    assert dtypes == {
        "BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "BF16", "F32",
        "F64", "C64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4",
    }  # fmt: skip
    # Packed float4: torch's byte shape (4, 6) is 4 x 12 F4 values in 24 bytes.
    f4 = next(t for t in parsed["tensors"] if t["name"] == "float4_e2m1fn_x2.matrix")
    assert list(f4["shape"]) == [4, 12]
    assert f4["end"] - f4["begin"] == 24


# Float8 and sub-byte types built by hand, each shape a whole number of bytes.
HAND_BUILT = [
    pytest.param(dtype, shape, nbytes, id=f"{dtype}{shape}")
    for dtype, shape, nbytes in [
        ("F8_E4M3", [5], 5),
        ("F8_E5M2", [2, 3], 6),
        ("F8_E8M0", [7], 7),
        ("F8_E4M3FNUZ", [1, 1, 3], 3),
        ("F8_E5M2FNUZ", [4], 4),
        ("F6_E2M3", [4], 3),
        ("F6_E3M2", [2, 8], 12),
        ("F4", [3, 2], 3),
        ("F4", [0, 3], 0),
    ]
]


@pytest.mark.parametrize(("dtype", "shape", "nbytes"), HAND_BUILT)
def test_hand_built_narrow_float_header_parses_like_safetensors_reads_it(
    tmp_path: Path, dtype: str, shape: list[int], nbytes: int
) -> None:
    header = {
        "__metadata__": {"quant": dtype},
        "before": entry("U8", [2], 0, 2),
        "narrow": entry(dtype, shape, 2, 2 + nbytes),
        "after": entry("I16", [1], 2 + nbytes, 4 + nbytes),
    }
    path = tmp_path / f"{dtype}.safetensors"
    path.write_bytes(shard_bytes(header, b"\x7f" * (4 + nbytes)))
    parsed = assert_matches_safetensors(path)
    assert [t["name"] for t in parsed["tensors"]] == ["before", "narrow", "after"]


ACCEPTED = [
    pytest.param(
        shard_bytes({"__metadata__": None, "w": GOOD}, b"\0" * 4), ["w"], {}, id="null-metadata"
    ),
    pytest.param(shard_bytes({}), [], {}, id="no-tensors-no-data"),
    pytest.param(
        shard_bytes({"__metadata__": {"b": "2", "a": "1"}}),
        [],
        {"b": "2", "a": "1"},
        id="metadata-only",
    ),
    pytest.param(
        shard_bytes('\n\t {"w":' + json.dumps(GOOD) + "}" + " " * 13, b"\0" * 4),
        ["w"],
        {},
        id="whitespace-around-the-object",
    ),
    pytest.param(
        shard_bytes(
            {"w": {**GOOD, "quant": {"scheme": [1, 2.5, None, True]}, "note": "x"}}, b"\0" * 4
        ),
        ["w"],
        {},
        id="unknown-fields-in-an-entry-are-ignored",
    ),
    pytest.param(
        shard_bytes(
            {
                "a": entry("U8", [0], 0, 0),
                "b": entry("F32", [1], 0, 4),
                "c": entry("I8", [0, 9], 4, 4),
            },
            b"\0" * 4,
        ),
        ["a", "b", "c"],
        {},
        id="zero-size-tensors-share-offsets",
    ),
    pytest.param(
        shard_bytes(
            '{"caf\\u00e9":'
            + json.dumps(GOOD)
            + ',"\\ud83d\\ude00\\n":'
            + json.dumps(entry("U8", [0], 4, 4))
            + "}",
            b"\0" * 4,
        ),
        ["café", "😀\n"],
        {},
        id="escaped-names-are-decoded",
    ),
    pytest.param(
        one_tensor("w", entry("F32", [1], 0, 4) | {"shape": [1, 1, 1, 1, 1, 1, 1, 1]}),
        ["w"],
        {},
        id="many-unit-dimensions",
    ),
]


@pytest.mark.parametrize(("raw", "names", "metadata"), ACCEPTED)
def test_edge_of_the_format_is_accepted(raw: bytes, names: list[str], metadata: dict) -> None:
    parsed = _core.parse_header(raw, shard=SHARD)
    assert [t["name"] for t in parsed["tensors"]] == names
    assert list(parsed["metadata"].items()) == list(metadata.items())
    # The reference accepts the same file and finds the same tensors.
    assert sorted(name for name, _ in safetensors.deserialize(raw)) == sorted(names)


def test_header_alone_is_enough_given_the_file_size(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_numpy_file({"a": np.ones((16, 16), np.float32), "b": np.ones(3, np.int8)}, str(path))
    raw = path.read_bytes()
    (length,) = struct.unpack_from("<Q", raw)
    whole = _core.parse_header(raw, shard=path.name)
    prefix = _core.parse_header(raw[: 8 + length], file_size=len(raw), shard=path.name)
    assert prefix == whole


def test_file_size_shorter_than_the_offsets_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_numpy_file({"a": np.ones((16, 16), np.float32)}, str(path))
    raw = path.read_bytes()
    with pytest.raises(errors.InvalidOffsets) as caught:
        _core.parse_header(raw, file_size=len(raw) - 1, shard=path.name)
    assert_names_shard(str(caught.value), path.name)
    assert "'a'" in str(caught.value)


def test_many_tensors_parse_in_file_order() -> None:
    # Wide checkpoints have tens of thousands of entries; written in reverse to force the sort.
    count = 50_000
    header = {f"layers.{i}.w": entry("F16", [2], 4 * i, 4 * i + 4) for i in reversed(range(count))}
    parsed = _core.parse_header(shard_bytes(header, b"\0" * (4 * count)), shard=SHARD)
    assert [t["name"] for t in parsed["tensors"]] == [f"layers.{i}.w" for i in range(count)]
    assert parsed["data_bytes"] == 4 * count


def test_duplicate_found_among_many_tensors() -> None:
    count = 20_000
    entries = [f'"t{i}":' + json.dumps(entry("U8", [1], i, i + 1)) for i in range(count)]
    entries.append('"t1234":' + json.dumps(entry("U8", [1], count, count + 1)))
    raw = shard_bytes("{" + ",".join(entries) + "}", b"\0" * (count + 1))
    with pytest.raises(errors.DuplicateTensor) as caught:
        _core.parse_header(raw, shard=SHARD)
    assert "'t1234'" in str(caught.value)
