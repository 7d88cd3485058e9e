"""The NVMe cache tier: write-through while streaming from Blob, later loads from disk, entries
keyed by etag and published atomically, corrupted/truncated/foreign entries refetched (never
served), one download per node when processes race, a size cap with LRU eviction, prune."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import blob2gpu
import pytest
import torch
from blob2gpu.cache.directory import CacheDirectory
from blob2gpu.cache.nvme import NvmeCache
from conftest import as_bytes, random_tensor, upload_directory
from conftest import checkpoint_bytes as expected
from support.azurite import ACCOUNT


def cached_load(uri, cache_dir, device="cpu", **settings):
    framework = "torch" if device == "cpu" else "dlpack"
    with blob2gpu.open(
        uri,
        device=device,
        framework=framework,
        local_nvme_cache_enabled=True,
        cache_dir=str(cache_dir),
        chunk_bytes=65536,
        **settings,
    ) as ckpt:
        got = {n: as_bytes(t) for n, t in ckpt.to_dict().items()}
        report = ckpt.report
    ckpt.close()
    return got, report


def test_second_load_is_served_from_the_cache(device, published, container, cache_dir, blob_env):
    got, first = cached_load(f"az://{container}/m", cache_dir, device)
    assert got == expected(published)
    assert first.cache_hit_rate == 0.0 and len(first.cache_written) == 3
    got, second = cached_load(f"az://{container}/m", cache_dir, device)
    assert got == expected(published)
    assert second.cache_hit_rate == 1.0 and second.requests == 0
    assert len(NvmeCache(cache_dir).entries()) == 3
    if device == "cuda":  # hits go from the drive to the staging ring with O_DIRECT (ext4, xfs)
        assert second.direct_io_bytes > 0
    else:
        assert second.direct_io_bytes == 0  # the cpu target reads into its arena, buffered


def test_a_load_of_cache_hits_starts_no_thread_and_reads_and_opens_the_entries_at_once(
    published, container, cache_dir, blob_env, monkeypatch
):
    # The warm path of a scale-from-zero start, in a process whose other threads run Python:
    # each thread started and each file read in Python hands the GIL back and forth. With every
    # shard a hit, nothing is fetched or written, so no feeder or writer thread is started, the
    # records of all shards are read by the core in one call, and their data files opened (and
    # the records touched for LRU) in one more.
    import threading

    from blob2gpu import _core

    cached_load(f"az://{container}/m", cache_dir)
    started: list[str] = []
    start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda t: (started.append(t.name), start(t)))
    reads: list[int] = []
    read = _core.read_small_files
    monkeypatch.setattr(
        _core, "read_small_files", lambda p, *a, **k: (reads.append(len(p)), read(p, *a, **k))[1]
    )
    opens: list[int] = []
    open_files = _core.open_regular_files
    monkeypatch.setattr(
        _core,
        "open_regular_files",
        lambda n, *a, **k: (opens.append(len(n)), open_files(n, *a, **k))[1],
    )
    one_by_one: list[str] = []
    monkeypatch.setattr(
        CacheDirectory, "read_bounded", lambda d, sub, name, limit: one_by_one.append(name)
    )
    monkeypatch.setattr(CacheDirectory, "touch", lambda d, sub, name: one_by_one.append(name))
    got, report = cached_load(f"az://{container}/m", cache_dir)
    assert got == expected(published) and report.cache_hit_rate == 1.0
    assert started == []
    assert 3 in reads  # the three records, at once
    assert opens == [3]  # then the three data files opened, checked and touched, at once
    assert one_by_one == []  # and not again after the load (its hits are known to be there)


def test_a_cache_writer_without_threads_leaves_the_shards_uncached_and_unlocked(
    published, container, cache_dir, blob_env, monkeypatch
):
    # The writer starts its threads with the first shard it writes; a process that cannot start
    # another thread still loads, caches nothing, and leaves no entry locked.
    import threading

    start = threading.Thread.start

    def refuse_the_publisher(thread: threading.Thread) -> None:
        if thread.name == "blob2gpu-cache-publisher":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse_the_publisher)
    got, report = cached_load(f"az://{container}/m", cache_dir, cache_fill=False)
    assert got == expected(published)
    assert report.cache_written == [] and len(report.cache_skipped) == 3
    assert all("cannot start the cache writer" in why for why in report.cache_skipped.values())
    monkeypatch.setattr(threading.Thread, "start", start)
    got, report = cached_load(f"az://{container}/m", cache_dir)  # the locks were released
    assert got == expected(published) and len(report.cache_written) == 3


def test_a_cached_copy_of_an_archived_shard_still_loads(
    published, azurite, container, cache_dir, blob_env
):
    uri = f"az://{container}/m"
    first, _ = cached_load(uri, cache_dir)
    blob = azurite.service().get_blob_client(container, "m/model-00002-of-00003.safetensors")
    blob.set_standard_blob_tier("Archive")  # the tier changes, the etag and bytes do not
    got, report = cached_load(uri, cache_dir)
    assert got == first == expected(published) and report.cache_hit_rate == 1.0
    with pytest.raises(blob2gpu.errors.BlobArchived, match="model-00002-of-00003"):
        blob2gpu.load(uri)  # without the cache


def test_an_archived_shard_not_in_the_cache_is_refused_without_waiting_or_writing(
    published, azurite, container, cache_dir, blob_env
):
    # Another process holds the archived shard's entry lock (it was writing it when the blob was
    # archived): the load must refuse the shard at once, not wait for that writer, and start no
    # entry of its own for bytes the service will not serve.
    import threading

    name = "m/model-00002-of-00003.safetensors"
    blob = azurite.service().get_blob_client(container, name)
    etag = blob.get_blob_properties().etag.strip('"')  # as listing gives it
    blob.set_standard_blob_tier("Archive")
    cache = NvmeCache(cache_dir)
    writer = cache.lock(NvmeCache.key(ACCOUNT, container, name, etag))
    assert writer.try_acquire()  # no one else holds it yet
    outcome = []

    def load():
        try:
            cached_load(f"az://{container}/m", cache_dir)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=30)
    waited = thread.is_alive()  # still waiting for the other writer's lock
    writer.release()
    thread.join()
    assert not waited
    assert len(outcome) == 1 and isinstance(outcome[0], blob2gpu.errors.BlobArchived)
    assert "model-00002-of-00003" in str(outcome[0])
    assert list(cache.tmp_dir.iterdir()) == []
    # The other shards were neither started: nothing is fetched once a shard is refused.
    assert cache.entries() == []


def test_a_lock_held_for_ever_by_another_process_delays_a_load_only_so_long(
    published, azurite, container, cache_dir, blob_env, monkeypatch
):
    # Anyone who can open an entry's lock file can hold it (a hung writer, or a hostile one): the
    # load waits as long as a writer making progress would take, then fetches the shard from Blob
    # without caching it, instead of waiting for ever.
    import threading

    from blob2gpu.cache import source as cache_source

    monkeypatch.setattr(cache_source, "WRITER_FLOOR_SECONDS", 0.5)
    monkeypatch.setattr(cache_source, "WRITER_SLOWEST_BYTES_PER_SECOND", 1e15)
    name = "m/model-00002-of-00003.safetensors"
    etag = azurite.service().get_blob_client(container, name).get_blob_properties().etag
    cache = NvmeCache(cache_dir)
    holder = cache.lock(NvmeCache.key(ACCOUNT, container, name, etag.strip('"')))
    assert holder.acquire(timeout=1)
    outcome = []
    thread = threading.Thread(
        target=lambda: outcome.append(cached_load(f"az://{container}/m", cache_dir)), daemon=True
    )
    thread.start()
    thread.join(timeout=60)
    stalled = thread.is_alive()
    holder.release()
    thread.join()
    assert not stalled
    got, report = outcome[0]
    assert got == expected(published)
    assert "held its cache entry's lock" in report.cache_skipped["model-00002-of-00003.safetensors"]
    assert len(report.cache_written) == 2


def test_cpu_cache_hits_are_mapped_not_copied(published, container, cache_dir, blob_env):
    uri = f"az://{container}/m"
    cached_load(uri, cache_dir)
    with blob2gpu.open(uri, local_nvme_cache_enabled=True, cache_dir=str(cache_dir)) as ckpt:
        tensors = ckpt.to_dict()
        report = ckpt.report
        maps = Path("/proc/self/maps").read_text()
    assert report.cache_hit_rate == 1.0 and report.mmap
    assert {n: as_bytes(t) for n, t in tensors.items()} == expected(published)
    for entry in NvmeCache(cache_dir).entries():  # the tensors live in the entries' pages
        assert str(entry.data_path) in maps
    got, report = cached_load(uri, cache_dir, mmap_local_files=False)
    assert got == expected(published) and not report.mmap


@pytest.mark.parametrize("slot_bytes", [16384, 65536 + 12345])
def test_direct_io_reads_of_cache_hits_at_any_offset(
    fake_driver, published, container, cache_dir, blob_env, slot_bytes
):
    # Data regions start at unaligned offsets and slots may be of any size: each read is widened
    # to aligned blocks around the range.
    uri = f"az://{container}/m"
    cached_load(uri, cache_dir)
    settings = {"staging_slot_bytes": slot_bytes}
    got, report = cached_load(uri, cache_dir, "cuda", **settings)
    assert got == expected(published) and report.cache_hit_rate == 1.0
    data = sum(s.bytes - s.header_bytes - 8 for s in report.shards)
    assert report.direct_io_bytes == data
    got, report = cached_load(uri, cache_dir, "cuda", cache_direct_io=False, **settings)
    assert got == expected(published) and report.direct_io_bytes == 0


def corrupt_one_entry(cache_dir, how):
    entry = sorted(NvmeCache(cache_dir).entries(), key=lambda e: e.key)[0]
    data = bytearray(entry.data_path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[:-1000]
    entry.data_path.write_bytes(bytes(data))
    return entry


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_entry_is_refetched_and_repaired(published, container, cache_dir, blob_env, how):
    cached_load(f"az://{container}/m", cache_dir)
    damaged = corrupt_one_entry(cache_dir, how)
    got = blob2gpu.load(
        f"az://{container}/m", local_nvme_cache_enabled=True, cache_dir=str(cache_dir)
    )
    assert {n: as_bytes(t) for n, t in got.items()} == expected(published)
    # The entry was rewritten from Blob: the next load is all hits and correct.
    assert (
        NvmeCache(cache_dir).verify(
            next(e for e in NvmeCache(cache_dir).entries() if e.key == damaged.key)
        )
        is None
    )
    got, report = cached_load(f"az://{container}/m", cache_dir)
    assert got == expected(published) and report.cache_hit_rate == 1.0


def test_a_foreign_entry_is_never_served(published, azurite, container, cache_dir, blob_env):
    cached_load(f"az://{container}/m", cache_dir)
    # The blob changes in storage: its etag moves, the old entry no longer matches.
    victim = published / "model-00001-of-00003.safetensors"
    replacement = torch.full((128, 200), 3.0)
    from safetensors.torch import save_file

    save_file({f"s0.w{i}": replacement.clone() for i in range(3)}, str(victim))
    azurite.service().get_container_client(container).upload_blob(
        "m/model-00001-of-00003.safetensors", victim.read_bytes(), overwrite=True
    )
    got, report = cached_load(f"az://{container}/m", cache_dir)
    assert got == expected(published)
    assert [s.cache_hit for s in report.shards] == [False, True, True]


def test_the_cache_cap_skips_what_cannot_fit_and_evicts_least_recently_used(
    published, write_checkpoint, azurite, container, cache_dir, blob_env
):
    shard = (published / "model-00001-of-00003.safetensors").stat().st_size
    got, report = cached_load(f"az://{container}/m", cache_dir, cache_max_bytes=shard // 2)
    assert got == expected(published)
    assert report.cache_written == [] and len(report.cache_skipped) == 3
    assert "exceed cache_max_bytes" in next(iter(report.cache_skipped.values()))
    # Room for three shards: a second checkpoint pushes the first one out.
    cap = 3 * shard + 1000
    cached_load(f"az://{container}/m", cache_dir, cache_max_bytes=cap)
    other = write_checkpoint(
        [{f"o{s}": random_tensor(torch.float32, (128, 600), 50 + s)} for s in range(3)],
        name="other",
    )
    upload_directory(azurite, container, other, "o")
    cached_load(f"az://{container}/o", cache_dir, cache_max_bytes=cap)
    cache = NvmeCache(cache_dir)
    assert cache.total_bytes() <= cap
    assert {e.meta["blob"].split("/")[0] for e in cache.entries()} == {"o"}


LOADER = """
import os, sys, zlib, blob2gpu
tensors = blob2gpu.load(sys.argv[1], framework="dlpack", local_nvme_cache_enabled=True,
                        cache_dir=sys.argv[2], chunk_bytes=65536)
print(sum(zlib.crc32(tensors[n].to_bytes()) for n in sorted(tensors)))
"""


def test_two_processes_download_once(
    published, azurite, container, cache_dir, fault_proxy, tmp_path
):
    env = dict(
        os.environ, AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string(port=fault_proxy.port)
    )
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    args = [sys.executable, str(script), f"az://{container}/m", str(cache_dir)]
    procs = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert outs[0][0] == outs[1][0]
    weights = sum(f.stat().st_size for f in published.glob("*.safetensors"))
    index = (published / "model.safetensors.index.json").stat().st_size
    assert fault_proxy.counters.range_bytes == weights + 2 * index  # one copy of the weights


def test_kill_9_mid_write_leaves_nothing_trusted(
    published, azurite, container, cache_dir, fault_proxy, tmp_path, blob_env
):
    env = dict(
        os.environ, AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string(port=fault_proxy.port)
    )
    fault_proxy.faults.stalls = 100  # every range stalls: the loader sits mid-write
    fault_proxy.faults.stall_seconds = 60
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    proc = subprocess.Popen(
        [sys.executable, str(script), f"az://{container}/m", str(cache_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not list((cache_dir / "tmp").glob("*.part")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((cache_dir / "tmp").glob("*.part")), "the loader never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fault_proxy.reset()
    assert NvmeCache(cache_dir).entries() == []
    got, report = cached_load(f"az://{container}/m", cache_dir)
    assert got == expected(published) and report.cache_hit_rate == 0.0
    assert len(report.cache_written) == 3
    removed = NvmeCache(cache_dir).prune()
    assert any(r.endswith(".part") for r in removed)
    assert not list((cache_dir / "tmp").iterdir())


def test_cache_entries_record_what_they_are(published, container, cache_dir, blob_env):
    cached_load(f"az://{container}/m", cache_dir)
    cache = NvmeCache(cache_dir)
    for entry in cache.entries():
        assert entry.meta["container"] == container and entry.meta["etag"]
        assert cache.verify(entry) is None
        meta = json.loads(Path(entry.meta_path).read_text())
        assert meta["size"] == entry.data_path.stat().st_size


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blob2gpu", *args], capture_output=True, text=True, timeout=120
    )


def test_cache_commands(published, container, cache_dir, blob_env):
    cached_load(f"az://{container}/m", cache_dir)
    listing = run_cli("cache", "ls", "--cache-dir", str(cache_dir))
    assert listing.returncode == 0 and "3 entries" in listing.stdout
    assert run_cli("cache", "verify", "--cache-dir", str(cache_dir)).returncode == 0
    corrupt_one_entry(cache_dir, "flip")
    bad = run_cli("cache", "verify", "--cache-dir", str(cache_dir), "--quiet")
    assert bad.returncode == 1 and bad.stdout.startswith("BAD")
    repaired = run_cli("cache", "verify", "--cache-dir", str(cache_dir), "--repair")
    assert repaired.returncode == 0 and "fetched again" in repaired.stdout
    cache = NvmeCache(cache_dir)  # the damaged entry was fetched again from Blob
    assert len(cache.entries()) == 3 and all(cache.verify(e) is None for e in cache.entries())
    pruned = run_cli("cache", "prune", "--cache-dir", str(cache_dir), "--max-bytes", "1")
    assert pruned.returncode == 0 and NvmeCache(cache_dir).entries() == []
    cached_load(f"az://{container}/m", cache_dir)
    assert run_cli("cache", "prune", "--cache-dir", str(cache_dir)).returncode == 0
    assert len(NvmeCache(cache_dir).entries()) == 3  # no cap: nothing to evict
    emptied = run_cli("cache", "prune", "--cache-dir", str(cache_dir), "--max-bytes", "0")
    assert emptied.returncode == 0 and NvmeCache(cache_dir).entries() == []  # 0: all of them


def test_bytes_that_reach_the_disk_wrong_are_never_published(
    published, container, cache_dir, blob_env, monkeypatch
):
    # The disk (here: a pwrite that flips a bit) stores something else than what was received:
    # the read-back check before publishing catches it even without a manifest.
    from blob2gpu.cache import nvme as nvme_cache

    real_pwrite = os.pwrite

    def flipping_pwrite(fd, data, offset):
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0x04
        return real_pwrite(fd, bytes(damaged), offset)

    monkeypatch.setattr(nvme_cache.os, "pwrite", flipping_pwrite)
    got, report = cached_load(f"az://{container}/m", cache_dir)
    assert got == expected(published)  # the load itself never reads the cache file
    assert not report.cache_written and len(report.cache_skipped) == 3
    assert all("read back differ" in why for why in report.cache_skipped.values())
    assert NvmeCache(cache_dir).entries() == []
