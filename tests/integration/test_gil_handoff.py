"""Handing tensors to Python costs at most one return of the GIL per wake of the consumer.

A loader lives in someone else's process, where other threads run Python: every time a _core call
gives the GIL up, taking it back can wait a whole switch interval behind them. So a call gives it
up only when it can block (csrc/bindings_gil.hpp), and _core.gil_reacquisitions() counts, per
thread, the times it was taken back. These tests bound that count, never a time: what has already
arrived is handed out (and exported through DLPack) with the GIL kept."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import blob2gpu
import pytest
import torch
from blob2gpu import _core
from blob2gpu.sources.feeding import RangeTask, feed_range
from conftest import random_tensor

SHARDS = 4
PER_SHARD = 64


class BusyThread:
    """One other thread of the process running plain Python, as in a serving engine."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        x = 0
        while not self._stop.is_set():
            for _ in range(1000):
                x += 1

    def __enter__(self) -> BusyThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def busy() -> Iterator[BusyThread]:
    with BusyThread() as thread:
        yield thread


@pytest.fixture
def many_tensors(write_checkpoint) -> Path:
    """SHARDS shards of PER_SHARD small tensors each: far more tensors than groups."""
    return write_checkpoint(
        [
            {
                f"s{s}.w{i}": random_tensor(torch.float32, (8, 16), seed=s * 1000 + i)
                for i in range(PER_SHARD)
            }
            for s in range(SHARDS)
        ]
    )


def wait_all_published(session: _core.LoadSession) -> None:
    """Returns once every shard of `session` was published (nothing is left to wait for)."""
    deadline = time.monotonic() + 60
    while session.stats().all_published_ns < 0:
        assert time.monotonic() < deadline, "the load never published every shard"
        time.sleep(0.005)


def local_session(directory: Path) -> tuple[_core.LoadPipeline, _core.LoadSession]:
    pipeline = _core.LoadPipeline("cpu", 2, 1 << 20, 1, 2, True)
    files = sorted(directory.glob("*.safetensors"))
    sources = [_core.ShardSource(f.name, size=f.stat().st_size, path=str(f)) for f in files]
    return pipeline, pipeline.start_local(sources)


def test_what_has_arrived_is_handed_out_and_exported_with_the_gil_kept(many_tensors, busy):
    pipeline, session = local_session(many_tensors)
    try:
        wait_all_published(session)
        before = _core.gil_reacquisitions()
        tensors = {}
        while (group := session.next_shard()) is not None:
            for view in group.tensors:
                tensors[view.name] = torch.from_dlpack(view)
        session.wait_landed()
        returns = _core.gil_reacquisitions() - before
    finally:
        session.close()
        pipeline.close()
    assert len(tensors) == SHARDS * PER_SHARD
    assert returns == 0


def test_a_load_beside_a_busy_thread_returns_the_gil_per_group_not_per_tensor(many_tensors, busy):
    before = _core.gil_reacquisitions()
    with blob2gpu.Loader() as loader:
        tensors = loader.load(str(many_tensors))
    returns = _core.gil_reacquisitions() - before
    assert len(tensors) == SHARDS * PER_SHARD
    # At most: the control plane's file reads (the host's memory figures, the index, the shards'
    # sizes, the manifest probe: a batch per call), waiting for the pipeline, starting the
    # session, one wait per group, closing the session and the pipeline.
    assert returns <= SHARDS + 8


@pytest.mark.parametrize("how", ["to_dict", "iterate", "stream"])
def test_a_checkpoint_hands_out_what_arrived_without_returning_the_gil(many_tensors, busy, how):
    with blob2gpu.open(str(many_tensors)) as checkpoint:
        wait_all_published(checkpoint._fetch.session)
        before = _core.gil_reacquisitions()
        if how == "to_dict":
            names = list(checkpoint.to_dict())
        elif how == "iterate":
            names = [name for name, _ in checkpoint]
        else:
            names = [name for name, _ in checkpoint.stream()]
        returns = _core.gil_reacquisitions() - before
    assert len(names) == SHARDS * PER_SHARD
    # Closing, which waits: the session (for its io tasks) and the pipeline of open()'s own
    # Loader (joins its io threads).
    assert returns <= 2


def test_short_calls_keep_the_gil(many_tensors):
    data = (many_tensors / "model-00001-of-00004.safetensors").read_bytes()
    pipeline, session = local_session(many_tensors)
    try:
        before = _core.gil_reacquisitions()
        _core.parse_header(data[: 8 + int.from_bytes(data[:8], "little")], len(data))
        _core.md5(b"x" * 1024)
        _core.crc32c(b"x" * 1024)
        session.stats()
        session.cancel()
        assert _core.gil_reacquisitions() == before
    finally:
        session.close()
        pipeline.close()


def test_calls_that_block_return_the_gil_and_count_on_their_own_thread(many_tensors):
    counts: list[int] = []

    def load_elsewhere() -> None:
        before = _core.gil_reacquisitions()
        pipeline, session = local_session(many_tensors)
        session.close()
        pipeline.close()
        counts.append(_core.gil_reacquisitions() - before)

    before = _core.gil_reacquisitions()
    thread = threading.Thread(target=load_elsewhere)
    thread.start()
    thread.join()
    assert _core.gil_reacquisitions() == before  # counted on the thread that made the calls
    assert counts == [4]  # make the pipeline, start the load, close both


def test_cuda_consumers_import_tensors_without_returning_the_gil(fake_driver, many_tensors):
    fake_driver.set_copy_delay_us(2000)  # copies still queued: each import queues a stream wait
    with blob2gpu.open(str(many_tensors), device="cuda", framework="dlpack") as checkpoint:
        views = checkpoint.to_dict()
        before = _core.gil_reacquisitions()
        capsules = [view.__dlpack__(stream=1, max_version=(1, 0)) for view in views.values()]
        returns = _core.gil_reacquisitions() - before
    assert len(capsules) == SHARDS * PER_SHARD
    assert returns == 0
    before = _core.gil_reacquisitions()
    next(iter(views.values())).to_host()  # a device-to-host copy waits: the GIL is given up
    assert _core.gil_reacquisitions() == before + 1


def test_a_feeder_gives_the_gil_up_for_a_staging_slot_only_when_it_must_wait(
    fake_driver, many_tensors
):
    files = sorted(many_tensors.glob("*.safetensors"))
    # More slots than ranges: no acquire() ever has to wait for one.
    pipeline = _core.LoadPipeline("cuda", 32, 1 << 16, 1, 1, False)
    session = pipeline.start_fed([_core.ShardSource(f.name, size=f.stat().st_size) for f in files])
    try:
        commits = 0
        before = _core.gil_reacquisitions()
        for index, file in enumerate(files):
            data = memoryview(file.read_bytes())
            tasks = [RangeTask(index, 0, min(1 << 14, len(data)), first=True)]
            while tasks:
                task = tasks.pop()
                source = data[task.start : task.end]

                def fill(view: memoryview, source: memoryview = source) -> None:
                    view[:] = source

                follow_ups = feed_range(session, task, fill, 1 << 14)
                assert follow_ups is not None
                commits += 1
                tasks += follow_ups
        returns = _core.gil_reacquisitions() - before
        assert len(list(iter(session.next_shard, None))) == len(files)
    finally:
        session.close()
        pipeline.close()
    # A free slot is taken with the GIL kept; commit() verifies and enqueues a range's bytes
    # without it.
    assert 2 * len(files) < commits <= 32
    assert returns == commits


FIRST_LOAD = """
import sys
import blob2gpu, torch
from blob2gpu import _core
from blob2gpu.operations import metrics
metrics.available()  # prometheus_client: the process's, imported before as a server has it
seen = []
watching = False
def hook(event, args):
    if watching and event in ("open", "import"):
        seen.append(f"{event} {str(args[0])[:200]}")
sys.addaudithook(hook)
before = _core.gil_reacquisitions()
watching = True
with blob2gpu.open(sys.argv[1], device="cpu", framework="torch") as checkpoint:
    tensors = checkpoint.to_dict()
watching = False
print(_core.gil_reacquisitions() - before, len(tensors))
print("\\n".join(seen))
"""


@pytest.mark.parametrize("layout", ["index", "directory"])
def test_a_first_load_reads_its_small_files_in_the_core_and_imports_nothing(
    many_tensors, tmp_path, layout
):
    """The load a server starts with, in a fresh process: its index, the host's memory figures
    (/proc/meminfo, the cgroup files) and the shards' sizes are read by the core, a batch per
    call (a directory without an index is listed in one os.listdir); the framework's own
    from_dlpack hands tensors out. A Python open() or import would
    each return the GIL several times, each return waiting behind the process's other threads."""
    if layout == "directory":
        (many_tensors / "model.safetensors.index.json").unlink()
    script = tmp_path / "first_load.py"
    script.write_text(FIRST_LOAD)
    done = subprocess.run(
        [sys.executable, str(script), str(many_tensors)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    counts, *events = done.stdout.strip().splitlines()
    returns, tensors = map(int, counts.split())
    assert tensors == SHARDS * PER_SHARD
    assert [e for e in events if e] == []
    # The host's files, resolving (the index or the listing, then the shards' sizes), the
    # manifest probe, starting the session, one wait per group, closing the session and the
    # pipeline: never one per file or per tensor.
    assert returns <= SHARDS + 8
