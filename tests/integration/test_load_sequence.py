"""One load sequence: every way of loading goes through loading.prepare, and a new way of fetching
is a FetchStrategy given to Loader.start: it gets a prepared load (every check already run) and
only decides who fetches which bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import blob2gpu
import pytest
import torch
from blob2gpu.cache.nvme import NvmeCache
from blob2gpu.loading.request import LoadRequest
from blob2gpu.sources.feeding import Fetch
from conftest import as_bytes, random_tensor, sparse_checkpoint, upload_directory
from conftest import checkpoint_bytes as expected
from support.in_memory import feed_from_memory


class FromMemory:
    """A strategy of the test's own: every shard read whole into host memory by Python, then fed
    to the core through the one feeding protocol (as the fan-out does with a group's bytes)."""

    uses_node_cache = False

    def __init__(self) -> None:
        self.prepared: Any = None

    def shards_to_read(self, listed: Any, selected: Any) -> Any:
        return selected

    def start(self, prepared: Any, pipeline: Any) -> Fetch:
        self.prepared = prepared
        session = prepared.start_fed(pipeline)
        for index, ref in enumerate(prepared.plan.shards):
            data = memoryview(Path(ref.path).read_bytes())
            feed_from_memory(session, index, data, chunk=4096)
        return Fetch(session, prepared.plan)


class Refused:
    """A strategy whose start fails, after the load was prepared."""

    uses_node_cache = True

    def shards_to_read(self, listed: Any, selected: Any) -> Any:
        return selected

    def start(self, prepared: Any, pipeline: Any) -> Fetch:
        raise RuntimeError("the strategy could not start")


def request(loader: blob2gpu.Loader, uri: str, **settings: Any) -> LoadRequest:
    return loader.request(uri, overrides=settings)


def test_a_strategy_of_its_own_loads_through_the_one_sequence(write_checkpoint):
    directory = write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float32, (64, 100), s)} for s in range(3)]
    )
    strategy = FromMemory()
    with blob2gpu.Loader() as loader:
        with loader.start(request(loader, str(directory)), strategy) as checkpoint:
            got = {n: as_bytes(t) for n, t in checkpoint.to_dict().items()}
            report = checkpoint.report
    assert got == expected(directory)
    assert report.tensors == 3 and report.phases["model_load_complete"] is not None
    assert [s.name for s in strategy.prepared.plan.shards] == [
        p.name for p in sorted(directory.glob("*.safetensors"))
    ]


def test_a_strategy_gets_a_load_the_checks_already_refused(tmp_path):
    # The memory-fit check runs before any strategy starts: a 4 TiB (sparse) shard never
    # reaches it.
    shard = sparse_checkpoint(tmp_path / "huge.safetensors", 4 << 40)
    strategy = FromMemory()
    with blob2gpu.Loader() as loader, pytest.raises(blob2gpu.errors.InsufficientHostMemory):
        loader.start(request(loader, str(shard)), strategy)
    assert strategy.prepared is None


def test_the_fit_check_counts_on_no_more_than_the_host_memory_limit(write_checkpoint):
    # host_memory_limit_bytes keeps room for the rest of a pod below what the machine and the
    # process's cgroup leave.
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (256, 256), 1)}])
    with pytest.raises(blob2gpu.errors.InsufficientHostMemory) as info:
        blob2gpu.load(str(directory), host_memory_limit_bytes=65536)
    assert "but host_memory_limit_bytes allows 0.07 MB" in str(info.value)
    assert "raise host_memory_limit_bytes" in str(info.value)
    got = blob2gpu.load(str(directory), host_memory_limit_bytes="1MiB")  # 256 KiB x 1.1 fits
    assert list(got) == ["w"]


def test_the_fit_check_counts_on_the_room_under_the_process_s_cgroup_limit(
    write_checkpoint, tmp_path, monkeypatch
):
    # A pod's memory limit is not in /proc/meminfo: the check reads it from the process's cgroup
    # (here a cgroup v2 tree laid out in a directory, as the kernel shows it).
    from blob2gpu.loading import host_memory

    pod = tmp_path / "cgroup" / "kubepods" / "pod1"
    pod.mkdir(parents=True)
    (pod / "memory.max").write_text("1048576\n")
    (pod / "memory.current").write_text("983040\n")
    (pod / "memory.stat").write_text("anon 917504\ninactive_file 65536\n")
    (tmp_path / "self-cgroup").write_text("0::/kubepods/pod1\n")
    monkeypatch.setattr(host_memory, "CGROUP_ROOT", tmp_path / "cgroup")
    monkeypatch.setattr(host_memory, "PROC_CGROUP", tmp_path / "self-cgroup")
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (256, 256), 1)}])
    with pytest.raises(blob2gpu.errors.InsufficientHostMemory) as info:
        blob2gpu.load(str(directory))  # 256 KiB x 1.1 against 128 KiB left of the 1 MiB limit
    assert "but 0.13 MB is left under this process's memory limit (1.05 MB, " in str(info.value)
    assert str(pod / "memory.max") in str(info.value)
    assert "raise the container's memory limit" in str(info.value)
    (pod / "memory.current").write_text("131072\n")  # 960 KiB left: it fits
    assert list(blob2gpu.load(str(directory))) == ["w"]


def test_a_load_that_cannot_start_releases_its_cache_locks(
    write_checkpoint, azurite, container, blob_env, tmp_path
):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (32, 32), 1)}])
    upload_directory(azurite, container, directory, "m")
    cache_dir = tmp_path / "nvme"
    uri = f"az://{container}/m"
    settings = {"local_nvme_cache_enabled": True, "cache_dir": str(cache_dir)}
    with blob2gpu.Loader(**settings) as loader:
        with pytest.raises(RuntimeError, match="could not start"):
            loader.start(request(loader, uri), Refused())
    locks = list((cache_dir / "locks").glob("*.lock"))
    assert locks  # preparing took the shard's entry lock ...
    cache = NvmeCache(str(cache_dir))
    for path in locks:  # ... and gave it back
        lock = cache.lock(path.stem)
        assert lock.try_acquire()
        lock.release()
    got = blob2gpu.load(uri, **settings)
    assert {n: as_bytes(t) for n, t in got.items()} == expected(directory)


def test_every_entry_point_makes_one_request_by_keyword(write_checkpoint, monkeypatch):
    # Loader.request() makes the one LoadRequest of every entry point, in canonical form; the
    # type itself is built by keyword only.
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (8, 8), 1)}])
    monkeypatch.setenv("MODEL_SOURCE_URI", str(directory))
    with blob2gpu.Loader(verify="auto") as loader:
        made = loader.request(tensor_names=["w"], overrides={"verify": "none"})
        assert (made.uri, made.device, made.tensor_names) == (str(directory), "cpu", {"w"})
        assert (made.settings.verify, loader.settings.verify) == ("none", "auto")
        with pytest.raises(blob2gpu.errors.InvalidArgument, match="must be given to Loader"):
            loader.request(overrides={"staging_slots": 4})
        with pytest.raises(TypeError):
            LoadRequest(str(directory), loader.settings)  # type: ignore[misc]
        assert list(loader.start(made).to_dict()) == ["w"]


def _functions_holding(uri: str, **kwargs: Any) -> list[str]:
    """blob2gpu's functions that are handed `uri` itself (as an argument or a local when called)
    while blob2gpu.open(uri) starts: the walk a reader makes from api.open to where the URI is
    parsed into a Source."""
    import sys

    held: list[str] = []

    def watch(frame: Any, event: str, arg: object) -> None:
        code = frame.f_code
        if event != "call" or "blob2gpu" not in code.co_filename:
            return
        if any(isinstance(v, str) and v == uri for v in frame.f_locals.values()):
            name = f"{code.co_filename.rsplit('blob2gpu/', 1)[-1]}:{code.co_name}"
            if name not in held:
                held.append(name)

    sys.setprofile(watch)
    try:
        checkpoint = blob2gpu.open(uri, **kwargs)
    finally:
        sys.setprofile(None)
    with checkpoint:
        checkpoint.to_dict()
    return held


@pytest.mark.parametrize("where", ["local", "blob"])
def test_a_uri_is_parsed_once_near_the_entry_point(write_checkpoint, blob_env, container, where):
    """From api.open the URI passes through a few functions to the Source its scheme names,
    which parses it once; past that, the load holds the Source and its plan, never the string
    (issue 27: 23 such functions before the Source interface)."""
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (4, 4))}])
    uri = str(directory)
    if where == "blob":
        upload_directory(blob_env, container, directory, "m")
        uri = f"az://{container}/m"
    held = _functions_holding(uri)
    assert held[0] == "api.py:open"
    assert len(held) <= 11, held
