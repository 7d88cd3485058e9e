"""Local files: a .safetensors file, a directory of shards, or a model.safetensors.index.json,
each optionally as a file:// URL. The core reads them itself, on its own threads."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from blob2gpu import _core
from blob2gpu.documents import INDEX_MAX_BYTES, INDEX_NAME, clip, file_bytes
from blob2gpu.errors import InvalidIndex, SourceUnavailable
from blob2gpu.integrity.manifest import Manifest, read_local_manifest
from blob2gpu.sources.feeding import FeedStats, Fetch
from blob2gpu.sources.plan import ShardPlan, ShardRef, index_weight_map, unread_weights_note
from blob2gpu.sources.source import Source, register

if TYPE_CHECKING:
    import threading

    from blob2gpu.loading.prepare import PreparedLoad


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(uri)


def _kinds(paths: list[Path]) -> list[_core.PathKind]:
    """stat of each path, by the core in one call (one return of the GIL for all of them); a
    name the system cannot take (a NUL in it) is an error there, never a different path. Names
    go as the file system's bytes: one that is not UTF-8 is still a name."""
    return _core.stat_paths([os.fsencode(p) for p in paths])


def _ref(path: Path, kind: _core.PathKind) -> ShardRef:
    if kind.error:
        raise SourceUnavailable(
            f"shard '{path.name}': cannot stat '{path}': {os.strerror(kind.error)}"
        )
    return ShardRef(name=path.name, path=str(path), size=kind.size)


def _from_index(index_path: Path, read: _core.SmallFile | None = None) -> ShardPlan:
    """The plan an index names; `read`: the index as read_small_files read it, when it was."""
    if read is None:
        read = _core.read_small_files([os.fsencode(index_path)], INDEX_MAX_BYTES)[0]
    raw = file_bytes(read, index_path, INDEX_MAX_BYTES, InvalidIndex, "index", SourceUnavailable)
    weight_map = index_weight_map(raw, index_path.name)
    names = sorted(set(weight_map.values()))
    for name in names:  # a name that leaves the directory is refused before anything is looked at
        if os.sep in name or name.startswith("."):
            raise _not_beside(index_path, name)
    paths = [index_path.parent / name for name in names]
    refs = []
    for name, shard_path, kind in zip(names, paths, _kinds(paths), strict=True):
        if not kind.regular:
            raise _not_beside(index_path, name)
        refs.append(_ref(shard_path, kind))
    return ShardPlan(uri=str(index_path), shards=tuple(refs), weight_map=weight_map)


def _not_beside(index_path: Path, name: str) -> SourceUnavailable:
    return SourceUnavailable(
        f"index '{index_path.name}' names shard '{clip(name)}', which is not in "
        f"'{index_path.parent}'"
    )


def resolve_local(uri: str) -> ShardPlan:
    """Resolve a local checkpoint. Returns a ShardPlan; raises SourceUnavailable or InvalidIndex."""
    path = _local_path(uri)
    # The common case first, one call of the core: a directory with its index.
    index = path / INDEX_NAME
    read = _core.read_small_files([os.fsencode(index)], INDEX_MAX_BYTES)[0]
    if read.regular:
        return _from_index(index, read)
    (kind,) = _kinds([path])
    if kind.directory:
        if read.error not in (0, errno.ENOENT):  # there, but unreadable: say why
            return _from_index(index, read)
        names = os.listdir(path)
        candidates = sorted(path / n for n in names if Path(n).suffix == ".safetensors")
        shards = [
            _ref(p, k) for p, k in zip(candidates, _kinds(candidates), strict=True) if k.regular
        ]
        if not shards:
            note = unread_weights_note(names)
            raise SourceUnavailable(f"no .safetensors files and no {INDEX_NAME} in '{path}'{note}")
        return ShardPlan(uri=str(path), shards=tuple(shards))
    if path.name.endswith(".index.json"):
        return _from_index(path)
    if kind.error in (errno.ENOENT, errno.ENOTDIR):
        raise SourceUnavailable(
            f"checkpoint '{uri}' does not exist",
            hint="check the path: a directory of .safetensors files, one such file or an "
            "index.json (a Blob checkpoint's URI starts with az:// or https://)",
        )
    return ShardPlan(uri=str(path), shards=(_ref(path, kind),))


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
        SourceUnavailable when it cannot be opened (or is no regular file), SourceReadError when
        a read fails or it ends early. The core reads it, in one call without the GIL."""
        _core.read_shard_range(os.fsencode(ref.path), ref.name, offset, view)


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
