"""The demo load: writes a small sharded checkpoint and loads it, printing the report.

The checkpoint is written here (no download), so the demo runs on any machine; it loads to the
first GPU when a CUDA driver is usable and to the CPU otherwise. With model='llama' it is a real
transformers Llama-architecture model (random weights from a local config, a byte-level tokenizer
built here), and the demo is a cold start: config and tokenizer fetched, the model built on the
meta device, the weights loaded into it, one token generated, every phase timed.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blob2gpu import _core
from blob2gpu.errors import InvalidArgument, SourceUnavailable

if TYPE_CHECKING:
    from blob2gpu.operations.report import LoadReport

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


def _layer_bytes(hidden: int) -> int:
    """Bytes of one demo layer (float16) of width `hidden`."""
    return int(sum(np.prod([d * hidden for d in s]) for s in LAYER_SHAPES.values())) * 2


def _width_for(layer_bytes: float) -> int:
    """The widest layer (a multiple of 8, at least 8) of at most `layer_bytes` bytes."""
    hidden = 8
    while _layer_bytes(hidden + 8) <= layer_bytes:
        hidden += 8
    return hidden


def write_demo_checkpoint(
    directory: Path, total_mb: int = 256, shards: int = 4, hidden: int = 1024
) -> Path:
    """Write a float16 checkpoint of about `total_mb` MB in `shards` shards with an index: as
    many layers of width `hidden` as fit, narrower layers when fewer than one per shard would.

    Returns the directory.
    """
    directory.mkdir(parents=True, exist_ok=True)
    hidden = min(hidden, _width_for(total_mb * 1e6 / shards))
    per_layer = _layer_bytes(hidden)
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


LLAMA_LAYER_MB = 6.3  # one decoder layer of the demo Llama in bf16
LLAMA_FIXED_MB = 0.5  # its embedding and output head (a byte-level vocabulary of 256)


def write_demo_llama(directory: Path, total_mb: int = 256) -> Path:
    """A Llama-architecture model of about total_mb MB (bf16, random weights, as many layers as
    fit) saved by transformers as shards with index, config.json and a byte-level tokenizer.
    Needs transformers, tokenizers and torch; reaches no hub. Returns the directory."""
    from blob2gpu.integrations.coldstart import _import_transformers

    transformers = _import_transformers()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    layers = max(1, round((total_mb - LLAMA_FIXED_MB) / LLAMA_LAYER_MB))
    config = transformers.LlamaConfig(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    directory.mkdir(parents=True, exist_ok=True)
    shard_mb = max(8, total_mb // 8)  # about eight shards
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=f"{shard_mb}MB")
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(directory)
    return directory


def main(
    device: str = "auto", total_mb: int = 256, source: str = "auto", model: str = "generated"
) -> int:
    """Write the demo checkpoint, serve it from a local Azurite (or read it from local files when
    Azurite or azure-storage-blob is missing), load it, print the summary and phase table.
    model='llama': a transformers Llama instead, cold-started to its first token.

    Returns 0. Raises InvalidArgument for an unknown model, or for 'llama' without transformers.
    """
    if model not in ("generated", "llama"):
        raise InvalidArgument(f"demo model '{model}' is not one of 'generated', 'llama'")
    import blob2gpu
    from blob2gpu.tools.emulator import Azurite

    no_gpu = ""  # a machine the auto device sends to the CPU says why
    if device == "auto":
        driver = _core.driver_info()
        device = "cuda" if driver["available"] else "cpu"
        if not driver["available"]:
            no_gpu = f" (no GPU: {driver['path']}: {driver['detail']})"
    if source == "auto":
        if (why_local := _azurite_missing()) is not None:
            print(f"reading local files: {why_local}")
        source = "azurite" if why_local is None else "local"
    elif source == "azurite" and (missing := _azurite_missing()) is not None:
        raise SourceUnavailable(f"--source azurite: {missing}", hint="or run with --source local")
    with tempfile.TemporaryDirectory(prefix="blob2gpu-demo-") as tmp:
        if model == "llama":
            return _llama_cold_start(Path(tmp), device, total_mb, source)
        path = write_demo_checkpoint(Path(tmp), total_mb=total_mb)
        size_mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
        shards = len(list(path.glob("*.safetensors")))
        if source == "azurite":
            with Azurite() as azurite:
                azurite.upload_directory("models", path, "demo")
                uri = f"{azurite.endpoint()}/models/demo"
                print(f"demo checkpoint: {size_mb:.0f} MB in {shards} shards, served by Azurite")
                print(f"  at {uri}")
                print(f"loading to {device}{no_gpu}")
                report = _load(blob2gpu, uri, device, credential=azurite.connection_string())
        else:
            print(f"demo checkpoint: {size_mb:.0f} MB in {shards} shards at {path} (local files)")
            print(f"loading to {device}{no_gpu}")
            report = _load(blob2gpu, str(path), device)
    print(report.summary())
    print(report.phase_table())
    print("next: `blob2gpu load PATH_OR_URI` on a checkpoint of yours, or `blob2gpu emulator`")
    print("  to serve yours from a local Blob service (README: A local Blob service)")
    return 0


def _azurite_missing() -> str | None:
    """What the Azurite source lacks (the azurite-blob launcher, azure-storage-blob), or None."""
    from blob2gpu.tools.emulator import missing

    try:
        import azure.storage.blob  # noqa: F401
    except ImportError:
        return "azure-storage-blob is not installed (pip install 'blob2gpu[azure]')"
    return missing()


def _llama_cold_start(tmp: Path, device: str, total_mb: int, source: str) -> int:
    from blob2gpu.integrations.coldstart import cold_start, describe
    from blob2gpu.tools.emulator import Azurite

    path = write_demo_llama(tmp / "llama", total_mb)
    size_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6
    shards = len(list(path.glob("*.safetensors")))
    print(f"demo model: a transformers Llama, {size_mb:.0f} MB of bf16 weights in {shards} shards")
    if source == "azurite":
        with Azurite() as azurite:
            azurite.upload_directory("models", path, "llama")
            uri = f"{azurite.endpoint()}/models/llama"
            print(f"  served by Azurite at {uri}; cold start on {device}")
            result = cold_start(
                uri, device=device, credential=_account_key(azurite.connection_string())
            )
    else:
        print(f"  at {path} (local files); cold start on {device}")
        result = cold_start(str(path), device=device)
    print(describe(result))
    print("(the token is random: so are the demo model's weights)")
    return 0


def _account_key(connection_string: str) -> dict[str, str]:
    from blob2gpu.sources.azure.location import parse_connection_string

    cs = parse_connection_string(connection_string)
    return {"account_name": cs["AccountName"], "account_key": cs["AccountKey"]}


def _load(blob2gpu: Any, uri: str, device: str, credential: str | None = None) -> LoadReport:
    account_key = _account_key(credential) if credential is not None else None
    with blob2gpu.open(uri, device=device, framework="dlpack", credential=account_key) as ckpt:
        tensors = ckpt.to_dict()
        report: LoadReport = ckpt.report
    if report.device != "cpu":
        print(
            f"{len(tensors)} tensors; staging ring {report.staging_slots} x "
            f"{report.staging_slot_bytes >> 20} MiB, pinned={report.pinned}, "
            f"peak slots in flight={report.peak_slots_in_flight}"
        )
    else:
        print(f"{len(tensors)} tensors written straight into host memory (no staging copy)")
    if report.source == "azure-blob":
        print(f"{report.requests} ranged GETs, {report.retries} retries")
    return report
