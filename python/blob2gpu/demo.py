"""The demo load: writes a small sharded checkpoint and loads it, printing the report.

The checkpoint is written here (no download), so the demo runs on any machine; it loads to the
first GPU when a CUDA driver is usable and to the CPU otherwise.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np

from . import _core

LAYER_SHAPES = {
    "attn.qkv.weight": (3, 1),
    "attn.out.weight": (1, 1),
    "mlp.up.weight": (4, 1),
    "mlp.down.weight": (1, 4),
    "norm.weight": (1,),
}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write `tensors` (all float16 here) as one safetensors file, header padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, array in tensors.items():
        header[name] = {
            "dtype": "F16",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def write_demo_checkpoint(
    directory: Path, total_mb: int = 256, shards: int = 4, hidden: int = 1024
) -> Path:
    """Write a float16 checkpoint of about `total_mb` MB in `shards` shards with an index.

    Returns the directory.
    """
    directory.mkdir(parents=True, exist_ok=True)
    per_layer = sum(np.prod([d * hidden for d in s]) for s in LAYER_SHAPES.values()) * 2
    layers = max(shards, int(total_mb * 1e6 // per_layer))
    rng = np.random.default_rng(0)
    weight_map: dict[str, str] = {}
    per_shard = -(-layers // shards)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for layer in range(s * per_shard, min(layers, (s + 1) * per_shard)):
            for suffix, shape in LAYER_SHAPES.items():
                full = tuple(d * hidden for d in shape)
                key = f"layers.{layer}.{suffix}"
                tensors[key] = rng.standard_normal(full, dtype=np.float32).astype(np.float16)
                weight_map[key] = name
        write_safetensors(directory / name, tensors, {"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    return directory


def main(device: str = "auto", total_mb: int = 256, directory: str | None = None) -> int:
    """Write the demo checkpoint, load it, print the summary and phase table. Returns 0."""
    import blob2gpu

    if device == "auto":
        device = "cuda" if _core.driver_info()["available"] else "cpu"
    with tempfile.TemporaryDirectory(prefix="blob2gpu-demo-") as tmp:
        path = write_demo_checkpoint(Path(directory or tmp), total_mb=total_mb)
        print(
            f"demo checkpoint: {path} ({sum(f.stat().st_size for f in path.iterdir()) / 1e6:.0f}"
            f" MB), loading to {device}"
        )
        with blob2gpu.open(str(path), device=device, framework="dlpack") as checkpoint:
            tensors = checkpoint.to_dict()
            report = checkpoint.report
        report.mark_first_token()
        print(report.summary())
        print(report.phase_table())
        if report.staging_slots:
            print(
                f"{len(tensors)} tensors; staging ring {report.staging_slots} x "
                f"{report.staging_slot_bytes >> 20} MiB, pinned={report.pinned}, "
                f"peak slots in flight={report.peak_slots_in_flight}"
            )
        else:
            print(f"{len(tensors)} tensors read straight into host memory (no staging)")
    return 0
