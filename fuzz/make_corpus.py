"""Write the header fuzzer's seed corpus (fuzz/corpus/): small shards, valid and malformed.

Valid shards come from the real ``safetensors`` package (so the fuzzer starts from what the
reference writes) or, for dtypes it cannot write from numpy/torch, from json + struct. Malformed
ones each break one rule. Deterministic: rerunning rewrites the same bytes.

    python fuzz/make_corpus.py            # needs numpy, torch and safetensors
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

CORPUS = Path(__file__).resolve().parent / "corpus"
MAX_BYTES = 4096


def arange(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    count = int(np.prod(shape)) if shape else 1
    return (np.arange(count) % 100).astype(dtype).reshape(shape)


def with_safetensors(save, tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.safetensors"
        save(tensors, str(path), metadata=metadata)
        return path.read_bytes()


def by_hand(header: dict | str | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A shard written with json + struct; `length` overrides the declared header length."""
    if isinstance(header, dict):
        text = json.dumps(header, separators=(",", ":")).encode()
    elif isinstance(header, str):
        text = header.encode()
    else:
        text = header
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def seeds() -> dict[str, bytes]:
    return {
        # --- valid ---
        "valid_f32.safetensors": with_safetensors(
            save_numpy, {"weight": arange((2, 3), np.float32)}
        ),
        "valid_numpy_dtypes.safetensors": with_safetensors(
            save_numpy,
            {
                "f16": arange((3,), np.float16),
                "f64": arange((2,), np.float64),
                "i8": arange((5,), np.int8),
                "u8": arange((4,), np.uint8),
                "i64": arange((1, 2), np.int64),
                "u16": arange((3,), np.uint16),
                "c64": arange((2,), np.complex64),
                "flag": arange((3,), np.bool_),
            },
        ),
        "valid_torch_dtypes.safetensors": with_safetensors(
            save_torch,
            {
                "bf16": torch.arange(4, dtype=torch.float32).to(torch.bfloat16),
                "e4m3": torch.arange(3, dtype=torch.float32).to(torch.float8_e4m3fn),
                "e5m2": torch.arange(2, dtype=torch.float32).to(torch.float8_e5m2),
                "i32": torch.arange(2, dtype=torch.int32),
            },
        ),
        "valid_empty_tensors.safetensors": with_safetensors(
            save_numpy,
            {
                "empty": np.zeros((0,), np.float32),
                "empty_2d": np.zeros((3, 0), np.int16),
                "scalar": np.array(7, dtype=np.int32),
            },
        ),
        "valid_metadata.safetensors": with_safetensors(
            save_numpy,
            {"model.layers.0.mlp.up_proj.weight": arange((4, 2), np.float16)},
            metadata={"format": "pt", "note": 'caf\u00e9 \u2603 \\ "quoted"'},
        ),
        "valid_no_tensors.safetensors": with_safetensors(save_numpy, {}),
        "valid_sub_byte.safetensors": by_hand(
            {
                "__metadata__": {"k": "v"},
                "f4": entry("F4", [2, 2], 0, 2),
                "f6": entry("F6_E2M3", [4], 2, 5),
                "e8m0": entry("F8_E8M0", [1], 5, 6),
            },
            bytes(6),
        ),
        # --- malformed: one rule broken each ---
        "bad_short_file.safetensors": b"\x05\x00\x00",
        "bad_length_past_end.safetensors": by_hand('{"a":1}', length=1000),
        "bad_not_json.safetensors": by_hand(
            '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]', bytes(4)
        ),
        "bad_not_utf8.safetensors": by_hand(
            b'{"\xff\xfe": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0"
        ),
        "bad_unknown_dtype.safetensors": by_hand({"a": entry("F12", [1], 0, 4)}, bytes(4)),
        "bad_size_mismatch.safetensors": by_hand({"a": entry("F32", [2], 0, 4)}, bytes(4)),
        "bad_overlap.safetensors": by_hand(
            {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}, bytes(6)
        ),
        "bad_duplicate.safetensors": by_hand(
            '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            '"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
            bytes(2),
        ),
        "bad_huge_shape.safetensors": by_hand(
            {"a": entry("F64", [2**62, 2**62], 0, 8), "__metadata__": {"x": 1}}, bytes(8)
        ),
    }


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    for old in CORPUS.iterdir():
        old.unlink()
    for name, data in seeds().items():
        assert len(data) < MAX_BYTES, (name, len(data))
        (CORPUS / name).write_bytes(data)
    print(f"wrote {len(seeds())} seeds to {CORPUS}")


if __name__ == "__main__":
    main()
