"""Local files: a .safetensors file, a directory of shards, or a model.safetensors.index.json,
each optionally as a file:// URL. The core reads them itself, on its own threads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from blob2gpu import _core
from blob2gpu.documents import INDEX_MAX_BYTES, clip, parse_json, read_regular_file
from blob2gpu.errors import InvalidIndex, SourceReadError, SourceUnavailable
from blob2gpu.integrity.manifest import Manifest, read_local_manifest
from blob2gpu.sources.feeding import FeedStats, Fetch
from blob2gpu.sources.plan import ShardPlan, ShardRef, unread_weights_note
from blob2gpu.sources.source import Source, register

if TYPE_CHECKING:
    import threading

    from blob2gpu.loading.prepare import PreparedLoad

INDEX_NAME = "model.safetensors.index.json"


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(uri)


def _ref(path: Path) -> ShardRef:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise SourceUnavailable(
            f"shard '{path.name}': cannot stat '{path}': {e.strerror}"
        ) from None
    return ShardRef(name=path.name, path=str(path), size=size)


def _is_file(path: Path) -> bool:
    """Whether `path` is a regular file (after symlinks); False for a name the system refuses
    (too long: an index may name anything)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _from_index(index_path: Path) -> ShardPlan:
    raw = read_regular_file(index_path, INDEX_MAX_BYTES, InvalidIndex, "index", SourceUnavailable)
    doc = parse_json(raw, InvalidIndex, f"index '{clip(index_path.name)}'")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InvalidIndex(
            f"index '{index_path.name}' has no 'weight_map' of tensor name to shard file name"
        )
    files: list[str] = []
    for shard in weight_map.values():
        if shard not in files:
            files.append(shard)
    refs = []
    for name in sorted(files):
        shard_path = index_path.parent / name
        if os.sep in name or name.startswith(".") or not _is_file(shard_path):
            raise SourceUnavailable(
                f"index '{index_path.name}' names shard '{clip(name)}', which is not in "
                f"'{index_path.parent}'"
            )
        refs.append(_ref(shard_path))
    return ShardPlan(uri=str(index_path), shards=tuple(refs), weight_map=dict(weight_map))


def resolve_local(uri: str) -> ShardPlan:
    """Resolve a local checkpoint. Returns a ShardPlan; raises SourceUnavailable or InvalidIndex."""
    path = _local_path(uri)
    if path.is_dir():
        index = path / INDEX_NAME
        if index.is_file():
            return _from_index(index)
        shards = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file())
        if not shards:
            raise SourceUnavailable(
                f"no .safetensors files and no {INDEX_NAME} in '{path}'"
                + unread_weights_note(p.name for p in path.iterdir())
            )
        return ShardPlan(uri=str(path), shards=tuple(_ref(p) for p in shards))
    if path.name.endswith(".index.json"):
        return _from_index(path)
    if not path.exists():
        raise SourceUnavailable(f"checkpoint '{uri}' does not exist")
    return ShardPlan(uri=str(path), shards=(_ref(path),))


class LocalRangeReader:
    """Reads byte ranges of local shards into memory the caller owns (a fan-out's part of the
    bytes): one read at a time, as long as asked; nothing to count or to cancel."""

    parallel = 1

    def piece_bytes(self) -> int:
        return 1 << 62

    def stop(self) -> None:
        pass

    def stats(self, plan: ShardPlan) -> FeedStats:
        return FeedStats()

    def read_into(self, ref: ShardRef, offset: int, view: memoryview) -> None:
        """Fill `view` with bytes [offset, offset + len(view)) of the file `ref` names; raises
        SourceUnavailable when it cannot be opened, SourceReadError when it ends early."""
        try:
            f = open(ref.path, "rb", buffering=0)
        except OSError as e:
            raise SourceUnavailable(
                f"shard '{ref.name}': cannot open {ref.path}: {e.strerror}", shard=ref.name
            ) from None
        with f:
            f.seek(offset)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise SourceReadError(
                        f"shard '{ref.name}' ended at byte {offset + done} of {ref.path}, "
                        f"{ref.size} were listed: the file changed during the load",
                        shard=ref.name,
                        offset=offset + done,
                    )
                done += n


@register("", "file")
class LocalSource(Source):
    """A checkpoint on local disk (see the module)."""

    _plan: ShardPlan | None = None

    def resolve(self) -> ShardPlan:
        self._plan = resolve_local(self.uri)
        return self._plan

    def read_manifest(self) -> Manifest | None:
        assert self._plan is not None, "resolve() first"
        return read_local_manifest(os.path.dirname(self._plan.shards[0].path))

    @property
    def display_uri(self) -> str:
        return self._plan.uri if self._plan is not None else self.uri

    def read_into(self, ref: ShardRef, offset: int, view: memoryview) -> None:
        LocalRangeReader().read_into(ref, offset, view)

    def ranges(
        self, load: PreparedLoad | None = None, stopping: threading.Event | None = None
    ) -> LocalRangeReader:
        return LocalRangeReader()

    def start(self, load: PreparedLoad, pipeline: _core.LoadPipeline) -> Fetch:
        return Fetch(load.start_local(pipeline), load.plan)
