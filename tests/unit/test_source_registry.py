"""Where bytes come from is one typed interface (sources/source.py), chosen by the URI's scheme:
every known form maps to its Source, and a new kind of storage is a Source subclass registered
for its scheme, loaded through the one load sequence without any caller knowing its kind."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import blob2gpu
import pytest
import torch
from blob2gpu import _core
from blob2gpu.errors import InvalidArgument
from blob2gpu.sources import source as source_module
from blob2gpu.sources.azure.source import AzureSource
from blob2gpu.sources.feeding import FeedStats, Fetch
from blob2gpu.sources.local import LocalRangeReader, LocalSource
from blob2gpu.sources.plan import ShardPlan, ShardRef
from blob2gpu.sources.source import Source, register, source_class
from conftest import as_bytes, random_tensor
from conftest import checkpoint_bytes as expected
from support.in_memory import feed_from_memory


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        ("az://models/llama/", AzureSource),
        ("https://acct.blob.core.windows.net/models/llama", AzureSource),
        ("http://127.0.0.1:10000/devstoreaccount1/models/llama", AzureSource),
        ("abfss://models@acct.dfs.core.windows.net/llama", AzureSource),
        ("wasbs://models@acct.blob.core.windows.net/llama", AzureSource),
        ("/srv/models/llama", LocalSource),
        ("relative/llama/model.safetensors.index.json", LocalSource),
        ("file:///srv/models/llama", LocalSource),
        ("C:/models/llama", LocalSource),  # a drive letter is no scheme
    ],
)
def test_every_uri_form_has_its_source(uri, kind):
    assert source_class(uri) is kind


def test_a_scheme_no_source_reads_is_refused_naming_what_is():
    with pytest.raises(InvalidArgument, match="'s3://' is not a source blob2gpu reads"):
        source_class("s3://bucket/llama")


class _Feeder:
    """Hands the session each shard held in memory, on a thread (as a network feeder would)."""

    def __init__(self, session: _core.LoadSession, plan: ShardPlan, data: dict[str, bytes]):
        self._session, self._plan, self._data = session, plan, data
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            for index, ref in enumerate(self._plan.shards):
                feed_from_memory(self._session, index, memoryview(self._data[ref.path]), 4096)
        except BaseException as error:
            self.error = error
            self._session.abort("SourceReadError", str(error))

    def start(self) -> _Feeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._session.cancel()
        self._thread.join()

    def stats(self) -> FeedStats:
        return FeedStats(requests=len(self._plan.shards))


class MemorySource(Source):
    """A kind of storage of the test's own: shards held in memory, named mem://NAME."""

    kind = "memory"
    remote = True
    shards: ClassVar[dict[str, dict[str, bytes]]] = {}

    def resolve(self) -> ShardPlan:
        self._data = self.shards[self.uri.removeprefix("mem://")]
        refs = tuple(ShardRef(name, name, len(data)) for name, data in sorted(self._data.items()))
        return ShardPlan(uri=self.uri, shards=refs)

    def read_manifest(self) -> None:
        return None

    @property
    def display_uri(self) -> str:
        return self.uri

    def read_into(self, ref: ShardRef, offset: int, view: memoryview) -> None:
        view[:] = self._data[ref.path][offset : offset + len(view)]

    def ranges(self, load=None, stopping=None) -> LocalRangeReader:
        return LocalRangeReader()

    def start(self, load, pipeline: _core.LoadPipeline) -> Fetch:
        session = load.start_fed(pipeline)
        return Fetch(session, load.plan, _Feeder(session, load.plan, self._data))


@pytest.fixture
def memory_scheme() -> Iterator[type[MemorySource]]:
    saved = dict(source_module._BY_SCHEME)
    register("mem")(MemorySource)
    try:
        yield MemorySource
    finally:
        source_module._BY_SCHEME.clear()
        source_module._BY_SCHEME.update(saved)
        MemorySource.shards.clear()


def test_a_new_kind_of_storage_is_a_registered_source(write_checkpoint, memory_scheme):
    directory = write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float32, (64, 100), s)} for s in range(3)]
    )
    memory_scheme.shards["llama"] = {
        p.name: p.read_bytes() for p in Path(directory).glob("*.safetensors")
    }
    with blob2gpu.open("mem://llama", framework="dlpack") as checkpoint:
        got = {n: as_bytes(t) for n, t in checkpoint.to_dict().items()}
        report = checkpoint.report
    assert got == expected(directory)
    assert (report.source, report.uri, report.requests) == ("memory", "mem://llama", 3)
    # A selection reads the headers through the same source.
    picked = blob2gpu.load("mem://llama", framework="dlpack", tensor_filter=lambda n: n < "s1")
    assert {n: as_bytes(t) for n, t in picked.items()} == {"s0.w": expected(directory)["s0.w"]}
