"""Tensor selections: load only some tensors of a checkpoint (a pipeline stage's layers, one rank's
experts), reading only their bytes.

A selection is `tensor_names=` (exact names) or `tensor_filter=` (a function of the name). With an
index (model.safetensors.index.json) the names are known before any byte is read: a missing name
fails at once and shards holding none of the wanted tensors are skipped whole. Without one, a
filter needs each shard's header first (one small read per shard, its only extra round trip), and
names given explicitly are checked once the headers have arrived.

The core then reads only the wanted tensors' bytes (whole manifest chunks when the checkpoint is
verified, so every byte read is checked) and its arenas hold only them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Mapping

from blob2gpu import _core
from blob2gpu.errors import InvalidArgument, InvalidIndex, TensorNotFound
from blob2gpu.sources import ShardPlan, ShardRef


@dataclasses.dataclass(frozen=True)
class Selection:
    """The tensors one load hands out; None names means 'every tensor'."""

    names: frozenset[str] | None
    requested: frozenset[str] = frozenset()  # given by name: each must exist

    @property
    def everything(self) -> bool:
        return self.names is None


EVERYTHING = Selection(None)


@dataclasses.dataclass(frozen=True)
class TensorMatch:
    """A tensor_filter selecting the union of exact `names` and names matching any glob of
    `patterns` (fnmatch, case-sensitive): what `blob2gpu load --tensor N --match G` asks for.
    select() checks it before any weight is read: every name must exist and every glob must
    match some tensor, else TensorNotFound naming them."""

    names: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = ()

    def __call__(self, name: str) -> bool:
        return name in self.names or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def check(self, every_name: Iterable[str], uri: str) -> None:
        """Raises TensorNotFound for names not in `every_name` and globs matching none of it."""
        every = set(every_name)
        missing = tuple(sorted(self.names - every))
        unmatched = tuple(
            p for p in self.patterns if not any(fnmatch.fnmatchcase(n, p) for n in every)
        )
        if not missing and not unmatched:
            return
        said = []
        if missing:
            said.append("no tensor " + ", ".join(repr(n) for n in missing[:5]))
        if unmatched:
            said.append("no tensor matching " + ", ".join(repr(p) for p in unmatched))
        raise TensorNotFound(
            f"'{uri}' has " + " and ".join(said),
            names=missing,
            patterns=unmatched,
        )


def selection_from_arguments(
    tensor_names: Iterable[str] | None, tensor_filter: Callable[[str], bool] | None
) -> tuple[frozenset[str] | None, Callable[[str], bool] | None]:
    """Checks the two arguments; returns (names, filter) with at most one set."""
    if tensor_names is not None and tensor_filter is not None:
        raise InvalidArgument("give tensor_names= or tensor_filter=, not both")
    if tensor_filter is not None and not callable(tensor_filter):
        raise InvalidArgument("tensor_filter must be a function of the tensor name -> bool")
    if tensor_names is None:
        return None, tensor_filter
    if isinstance(tensor_names, (str, bytes)):
        raise InvalidArgument("tensor_names takes a list of names, not one string")
    names = frozenset(tensor_names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise InvalidArgument(f"tensor_names must be strings, got {bad[0]!r}")
    return names, None


def select(
    plan: ShardPlan,
    tensor_names: frozenset[str] | None,
    tensor_filter: Callable[[str], bool] | None,
    read_header: Callable[[ShardRef], _core.ParsedHeader],
) -> tuple[ShardPlan, Selection]:
    """The plan to load (shards without a wanted tensor dropped when the index says so) and the
    selection. read_header(ref) returns a shard's parsed header (Source.read_header); it is
    called only for a filter on a checkpoint without an index. Raises TensorNotFound for a name
    the index does not know."""
    if tensor_names is None and tensor_filter is None:
        return plan, EVERYTHING
    weight_map = plan.weight_map
    if weight_map is None:
        if tensor_names is not None:
            return plan, Selection(tensor_names, requested=tensor_names)
        every = [t["name"] for ref in plan.shards for t in read_header(ref)["tensors"]]
        if isinstance(tensor_filter, TensorMatch):
            tensor_filter.check(every, plan.uri)
        found = {name for name in every if tensor_filter(name)}  # type: ignore[misc]
        return plan, Selection(frozenset(found))
    if tensor_names is not None:
        missing = sorted(tensor_names - weight_map.keys())
        if missing:
            raise TensorNotFound(
                f"'{plan.uri}' has no tensor {', '.join(repr(n) for n in missing[:5])}"
                + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
                + " (checked against its index)"
            )
        names = tensor_names
    else:
        if isinstance(tensor_filter, TensorMatch):
            tensor_filter.check(weight_map, plan.uri)
        names = frozenset(n for n in weight_map if tensor_filter(n))  # type: ignore[misc]
    wanted_shards = {weight_map[n] for n in names}
    shards = tuple(s for s in plan.shards if s.name in wanted_shards)
    selection = Selection(names, requested=tensor_names or frozenset())
    return dataclasses.replace(plan, shards=shards), selection


def selected_sizes(
    plan: ShardPlan,
    selection: Selection,
    read_header: Callable[[ShardRef], _core.ParsedHeader],
    chunk_bytes: int = 0,
) -> list[int]:
    """Bytes each shard of the plan holds for the selection (its tensors, plus the whole manifest
    chunks around each when verified: an upper bound), from the shards' headers."""
    sizes = []
    for ref in plan.shards:
        header = read_header(ref)
        sizes.append(
            sum(
                t["end"] - t["begin"] + 2 * chunk_bytes
                for t in header["tensors"]
                if t["name"] in (selection.names or ())
            )
        )
    return sizes


def check_found(selection: Selection, shard_of: Mapping[str, str], plan: ShardPlan) -> None:
    """The checks of a whole load against what its shards held (`shard_of`: each tensor's
    shard): with an index, InvalidIndex for a wanted tensor it names that no shard held or one
    another shard held; without, TensorNotFound for names asked for that no shard held."""
    weight_map = plan.weight_map
    if weight_map is None:
        missing = sorted(selection.requested - set(shard_of))
        if missing:
            raise TensorNotFound(
                f"'{plan.uri}' has no tensor {', '.join(repr(n) for n in missing[:5])}"
                + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            )
        return
    wanted = selection.names
    missing = [n for n in weight_map if n not in shard_of and (wanted is None or n in wanted)]
    misplaced = [n for n, shard in weight_map.items() if n in shard_of and shard_of[n] != shard]
    detail = []
    if missing:
        detail.append(f"missing from every shard: {', '.join(sorted(missing)[:5])}")
    if misplaced:
        n = sorted(misplaced)[0]
        detail.append(f"'{n}' is in '{shard_of[n]}' but the index says '{weight_map[n]}'")
    if detail:
        raise InvalidIndex(f"index of '{plan.uri}' disagrees with its shards: " + "; ".join(detail))
