"""ShardPlan: the shards of one checkpoint, as a source resolved them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from blob2gpu import phrasing
from blob2gpu.documents import clip, parse_json
from blob2gpu.errors import InvalidIndex

# Weights in formats other than safetensors, often published beside them (pytorch_model.bin,
# consolidated.pth, GGUF and ONNX exports): gigabytes that are neither loaded nor auxiliary.
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def is_other_weight_file(name: str) -> bool:
    """Whether a file holds weights in a format blob2gpu does not load (by its suffix)."""
    return name.lower().endswith(OTHER_WEIGHT_SUFFIXES)


def unread_weights_note(names: Iterable[str]) -> str:
    """For the error of a checkpoint without safetensors: which of `names` are weights in
    another format, that blob2gpu does not read them, and how to convert them ('' if none)."""
    others = sorted(n for n in names if is_other_weight_file(n))
    if not others:
        return ""
    shown = phrasing.first_of(others)
    said = f"; it holds {shown}, a format blob2gpu does not read (only safetensors)"
    return f"{said}: {CONVERT_FIRST}"


# What to do with weights of another format.
CONVERT_FIRST = (
    "convert it first, e.g. with transformers: model.save_pretrained(DIR, safe_serialization="
    "True), or torch.load the state dict and write it with safetensors.torch.save_file"
)


def index_weight_map(raw: bytes, name: str, file_names_only: bool = False) -> dict[str, str]:
    """The weight_map (tensor name -> shard file name) of index `name` whose bytes are `raw`;
    file_names_only: a shard name holding '/' or starting with '.' makes it no index. Raises
    InvalidIndex."""
    doc = parse_json(raw, InvalidIndex, f"index '{clip(name)}'")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str)
        and isinstance(v, str)
        and not (file_names_only and ("/" in v or v.startswith(".")))
        for k, v in weight_map.items()
    ):
        raise InvalidIndex(f"index '{name}' has no 'weight_map' of tensor name to shard file name")
    return dict(weight_map)


@dataclass(frozen=True)
class ShardRef:
    """One shard: the name errors and reports use, where it is, and its size in bytes."""

    name: str
    path: str  # a local path, or the blob name
    size: int
    etag: str | None = None  # blobs: the etag seen at listing; every range is pinned to it
    content_md5: bytes | None = None  # blobs: the Content-MD5 property, when the blob has one
    archived: str | None = None  # blobs: why the service refuses its bytes now (Archive tier)


@dataclass(frozen=True)
class ShardPlan:
    """The shards to load in order, and the index's weight map when the checkpoint has one."""

    uri: str
    shards: tuple[ShardRef, ...]
    weight_map: dict[str, str] | None = field(default=None)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)
