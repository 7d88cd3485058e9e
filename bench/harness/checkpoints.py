"""The checkpoints the benchmarks load.

`llama_checkpoint`: a Llama-shaped bf16 model (q/k/v/o, gate/up/down and two norms per layer,
embeddings, lm_head) split into shards with a `model.safetensors.index.json`, generated once from a
fixed seed and cached under bench/.data/, with a `bench_spec.json` that holds every tensor's shape
and checksum (and their sum) for checking what a contestant returns.

`random_checkpoint`: the fleet's random float16 shards (four tensors a shard) and the CRC32 digest
its loaders report back.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import DATA_DIR, GB, SEED, MiB
from harness.checksums import CHECKSUM_MASK, bytes_checksum

GENERATOR_VERSION = 2  # bump when the layout or contents change: cached checkpoints are rebuilt
INDEX_NAME = "model.safetensors.index.json"
SPEC_NAME = "bench_spec.json"

Layout = list[tuple[str, tuple[int, ...]]]  # (tensor name, shape), in file order


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder whose bf16 weights add up to about the requested size."""

    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    layers: int

    def tensors(self) -> Layout:
        """Returns every tensor's (name, shape) in the order a checkpoint stores them."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        out: Layout = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out


def numel(shape: Iterable[int]) -> int:
    """Returns the number of elements of a tensor of this shape."""
    n = 1
    for d in shape:
        n *= d
    return n


def choose_shape(total_bytes: int, shards: int) -> ModelShape:
    """Returns the model with the largest hidden size that still gives at least two layers per
    shard; raises SystemExit when even the smallest does not."""
    vocab = 32000
    for hidden in (4096, 2048, 1024, 512, 256, 128):
        intermediate = max(256, round(hidden * 8 / 3 / 256) * 256)
        kv_dim = hidden // 8
        per_layer = 2 * (
            2 * hidden * hidden + 2 * kv_dim * hidden + 3 * intermediate * hidden + 2 * hidden
        )
        fixed = 2 * (2 * vocab * hidden + hidden)
        layers = (total_bytes - fixed) // per_layer
        if layers >= 2 * shards:
            return ModelShape(hidden, intermediate, kv_dim, vocab, int(layers))
    raise SystemExit(f"--total-gb too small for {shards} shards")


def split_into_shards(tensors: Layout, shards: int) -> list[Layout]:
    """Returns consecutive runs of tensors, each run about total/shards bytes (bf16); raises
    SystemExit when a shard would be empty."""
    sizes = [2 * numel(s) for _, s in tensors]
    total = sum(sizes)
    out: list[Layout] = [[] for _ in range(shards)]
    cum = 0
    for (name, shape), size in zip(tensors, sizes, strict=True):
        out[min(shards - 1, int((cum + size / 2) * shards // total))].append((name, shape))
        cum += size
    if any(not s for s in out):
        raise SystemExit("internal error: an empty shard; use fewer --shards")
    return out


def llama_checkpoint(total_gb: float, shards: int) -> Path:
    """Returns the directory of the Llama-shaped checkpoint of about `total_gb` GB in `shards`
    shards, writing it first unless a current one is cached under bench/.data/.

    Tensor bytes are tiled from a 32 MiB pool of N(0, 0.02) bf16 values at a tensor-dependent
    offset and streamed to the file: no per-element Python, no whole-shard state dict."""
    target = DATA_DIR / f"llama-bf16-{total_gb:g}gb-{shards}shards"
    if (target / SPEC_NAME).exists():
        if read_spec(target).get("generator_version") == GENERATOR_VERSION:
            return target
    import torch

    shape = choose_shape(int(total_gb * GB), shards)
    layout = split_into_shards(shape.tensors(), shards)
    print(f"generating {target} (hidden={shape.hidden}, layers={shape.layers}) ...", flush=True)
    t0 = time.perf_counter()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    gen = torch.Generator().manual_seed(SEED)
    pool = torch.randn(16 * MiB, generator=gen).mul_(0.02).to(torch.bfloat16).view(torch.uint8)
    buf = torch.empty(max(2 * numel(d) for s in layout for _, d in s), dtype=torch.uint8)
    checksums: dict[str, int] = {}
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(layout):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        checksums.update(_write_shard(tmp / fname, shard, pool, buf, first_index=len(checksums)))
        weight_map.update(dict.fromkeys((name for name, _ in shard), fname))
    data_bytes = sum(2 * numel(d) for s in layout for _, d in s)
    index_json = {"metadata": {"total_size": data_bytes}, "weight_map": weight_map}
    (tmp / INDEX_NAME).write_text(json.dumps(index_json, indent=2))
    files = {p.name: p.stat().st_size for p in sorted(tmp.glob("*.safetensors"))}
    spec = {
        "generator_version": GENERATOR_VERSION,
        "seed": SEED,
        "shape": shape.__dict__,
        "shards": shards,
        "files": files,
        "file_bytes": sum(files.values()),
        "data_bytes": data_bytes,
        "tensors": len(weight_map),
        "checksum": sum(checksums.values()) & CHECKSUM_MASK,
        "shapes": {name: list(dims) for s in layout for name, dims in s},
        "checksums": checksums,
    }
    (tmp / SPEC_NAME).write_text(json.dumps(spec))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    print(
        f"  wrote {spec['file_bytes'] / GB:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True
    )
    return target


def _write_shard(
    path: Path, shard: Layout, pool: Any, buf: Any, first_index: int
) -> dict[str, int]:
    """Writes one safetensors file (header, then each tensor's bytes tiled from `pool` through
    `buf`); returns each tensor's checksum."""
    entries, pos = [], 0
    for name, dims in shard:
        n = 2 * numel(dims)
        entries.append((name, dims, pos, pos + n))
        pos += n
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, dims, a, b in entries:
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [a, b]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data region starts 8-aligned
    checksums: dict[str, int] = {}
    pool_n = pool.numel()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for index, (name, _dims, a, b) in enumerate(entries, first_index):
            n = b - a
            out = buf[:n]
            off = (index * 7919 * 2) % pool_n  # even: bf16 values stay whole
            filled = 0
            while filled < n:
                take = min(n - filled, pool_n - off)
                out[filled : filled + take].copy_(pool[off : off + take])
                filled += take
                off = 0
            checksums[name] = bytes_checksum(out)
            fh.write(memoryview(out.numpy()))
    return checksums


def read_spec(ckpt: Path) -> dict[str, Any]:
    """Returns the checkpoint's bench_spec.json."""
    return json.loads((ckpt / SPEC_NAME).read_text())


def spec_summary(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the spec without its per-tensor tables, as a run's JSON records it."""
    return {k: v for k, v in spec.items() if k not in ("checksums", "shapes")}


def shard_files(ckpt: Path) -> list[str]:
    """Returns the checkpoint's shard files, sorted."""
    return sorted(str(p) for p in ckpt.glob("*.safetensors"))


def warm_page_cache(files: Iterable[str]) -> float:
    """Reads every file once, so every contestant starts from the same (cached) state; returns
    the seconds it took."""
    t0 = time.perf_counter()
    view = memoryview(bytearray(16 << 20))
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t0


def mismatches(
    spec: Mapping[str, Any], tensors: Mapping[str, Any], checksum: Callable[[Any], int]
) -> str:
    """Returns '' when every tensor is present with its generated shape and checksum, else what is
    wrong (at most three tensors named)."""
    expected = spec["checksums"]
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(expected))[:3]
        return (
            f"got {len(tensors)} tensors, expected {len(expected)} "
            f"(missing {missing}, extra {extra})"
        )
    bad = []
    for name, t in tensors.items():
        shape = list(getattr(t, "shape", []))
        if shape != spec["shapes"][name]:
            bad.append(f"{name}: shape {shape} != {spec['shapes'][name]}")
        elif checksum(t) != expected[name]:
            bad.append(f"{name}: checksum differs")
        if len(bad) >= 3:
            break
    return "; ".join(bad)


def crc_digest(named_bytes: Iterable[tuple[str, bytes]]) -> int:
    """Returns the CRC32 of every tensor's bytes, chained in name order."""
    crc = 0
    for _, data in sorted(named_bytes, key=lambda item: item[0]):
        crc = zlib.crc32(data, crc)
    return crc


def random_checkpoint(
    directory: Path, total_mb: int, shards: int, seed: int = 7
) -> tuple[int, int]:
    """Writes `shards` safetensors files of random float16 tensors (about total_mb MB in all) and
    an index into `directory`; returns (bytes of every file, crc_digest of the tensors)."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    per_shard = total_mb * 1_000_000 // shards
    tensors_per_shard = 4
    cols = 1024
    rows = max(1, per_shard // tensors_per_shard // (2 * cols))
    weight_map: dict[str, str] = {}
    all_tensors: dict[str, Any] = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for t in range(tensors_per_shard):
            name = f"layers.{s * tensors_per_shard + t}.weight"
            raw = rng.integers(0, 256, size=rows * cols * 2, dtype=np.uint8)
            tensors[name] = raw.view(np.float16).reshape(rows, cols)
            weight_map[name] = file
        save_file(tensors, str(directory / file))
        all_tensors.update(tensors)
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    digest = crc_digest((name, t.tobytes()) for name, t in all_tensors.items())
    return sum(f.stat().st_size for f in directory.iterdir()), digest
