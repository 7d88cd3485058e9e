"""One load leaves the NVMe cache complete: shards the write-through writer could not keep (its
write queue overflowed) are fetched afterwards by the background fill, pinned to the listed etag,
under the entry lock and published atomically; the fill stops cleanly at exit and a process killed
during it leaves nothing trusted. `cache warm` fills a cache without a load; `cache verify
--repair` fetches a damaged entry again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import blob2gpu
import pytest
from blob2gpu.cache.nvme import NvmeCache
from conftest import as_bytes
from conftest import checkpoint_bytes as expected

SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def settings_for(cache_dir, **more):
    # A write queue of 0 bytes: every shard overflows it, as a fast load over a slow disk does.
    return dict(
        local_nvme_cache_enabled=True,
        cache_dir=str(cache_dir),
        chunk_bytes=65536,
        cache_write_queue_bytes=0,
        **more,
    )


def test_a_load_that_overflowed_the_write_queue_leaves_a_complete_cache(
    published, container, cache_dir, blob_env
):
    uri = f"az://{container}/m"
    with blob2gpu.open(uri, **settings_for(cache_dir)) as ckpt:
        got = {n: as_bytes(t) for n, t in ckpt.to_dict().items()}
    report = ckpt.report
    assert got == expected(published)
    assert report.cache_written == [] and report.cache_hit_rate == 0.0
    assert set(report.cache_skipped.values()) == {"disk write queue full"}
    assert sorted(report.cache_fill_pending) == SHARDS
    result = ckpt.wait_for_cache_fill(timeout=120)
    assert result.finished and sorted(result.written) == SHARDS and not result.skipped
    assert sorted(report.cache_filled) == SHARDS and report.cache_fill_skipped == {}
    cache = NvmeCache(cache_dir)
    assert len(cache.entries()) == 3 and all(cache.verify(e) is None for e in cache.entries())
    assert list(cache.tmp_dir.iterdir()) == []
    # The second load is all hits: nothing is fetched from Blob.
    with blob2gpu.open(uri, **settings_for(cache_dir)) as ckpt:
        got = {n: as_bytes(t) for n, t in ckpt.to_dict().items()}
    assert got == expected(published)
    assert ckpt.report.cache_hit_rate == 1.0 and ckpt.report.requests == 0
    assert ckpt.report.cache_fill_pending == [] and ckpt.cache_fill is None


def test_loader_waits_for_the_fills_of_its_loads(published, container, cache_dir, blob_env):
    with blob2gpu.Loader(**settings_for(cache_dir)) as loader:
        loader.load(f"az://{container}/m")
    result = loader.wait_for_cache_fill(timeout=120)  # after close(): the fill has its own
    assert result.finished and sorted(result.written) == SHARDS
    assert len(NvmeCache(cache_dir).entries()) == 3


def test_cache_fill_off_writes_only_during_the_load(published, container, cache_dir, blob_env):
    with blob2gpu.open(f"az://{container}/m", **settings_for(cache_dir, cache_fill=False)) as c:
        c.to_dict()
    assert c.cache_fill is None and c.report.cache_fill_pending == []
    assert c.wait_for_cache_fill().finished
    assert NvmeCache(cache_dir).entries() == []


def test_a_tensor_selection_starts_no_fill(published, container, cache_dir, blob_env):
    # Such a load reads only some bytes of its shards: fetching them whole is not its to ask.
    with blob2gpu.open(
        f"az://{container}/m", tensor_names=["s0.w0"], **settings_for(cache_dir)
    ) as ckpt:
        ckpt.to_dict()
    assert ckpt.cache_fill is None and NvmeCache(cache_dir).entries() == []


def test_the_fill_is_bounded_and_pinned_to_the_listed_version(
    published, azurite, container, cache_dir, blob_env
):
    # The blob is overwritten after the load listed it: the fill must not cache the new bytes
    # under the old etag's key.
    slow = settings_for(cache_dir, cache_fill_bytes_per_second=200_000)
    with blob2gpu.open(f"az://{container}/m", **slow) as ckpt:
        ckpt.to_dict()
    client = azurite.service().get_container_client(container)
    client.upload_blob(f"m/{SHARDS[2]}", (published / SHARDS[0]).read_bytes(), overwrite=True)
    result = ckpt.wait_for_cache_fill(timeout=120)
    assert result.finished
    assert SHARDS[2] in result.skipped and "BlobChanged" in result.skipped[SHARDS[2]]
    cache = NvmeCache(cache_dir)
    assert sorted(e.meta["blob"] for e in cache.entries()) == [f"m/{s}" for s in SHARDS[:2]]
    assert list(cache.tmp_dir.iterdir()) == []


EXIT_DURING_FILL = """
import sys, blob2gpu
with blob2gpu.open(sys.argv[1], framework="dlpack", local_nvme_cache_enabled=True,
                   cache_dir=sys.argv[2], chunk_bytes=65536, cache_write_queue_bytes=0,
                   cache_fill_bytes_per_second=int(sys.argv[3])) as ckpt:
    ckpt.to_dict()
print("loaded", flush=True)
if sys.argv[4] == "wait-for-part":
    import pathlib, time
    while not list(pathlib.Path(sys.argv[2], "tmp").glob("*.part")):
        time.sleep(0.01)
    print("filling", flush=True)
    time.sleep(600)
"""


def run_script(tmp_path, uri, cache_dir, rate, mode):
    script = tmp_path / "exit_during_fill.py"
    script.write_text(EXIT_DURING_FILL)
    return subprocess.Popen(
        [sys.executable, str(script), uri, str(cache_dir), str(rate), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_fill_stops_at_exit_without_holding_the_process_or_leaving_a_partial_entry(
    published, container, cache_dir, blob_env, tmp_path
):
    # 100 KB/s: the fill of ~900 KB is far from done when the script ends right after the load.
    proc = run_script(tmp_path, f"az://{container}/m", cache_dir, 100_000, "exit")
    out, err = proc.communicate(timeout=60)  # the fill thread does not keep the process alive
    assert proc.returncode == 0, err
    assert out.strip() == "loaded"
    cache = NvmeCache(cache_dir)
    assert len(cache.entries()) < 3
    assert all(cache.verify(e) is None for e in cache.entries())
    assert list(cache.tmp_dir.iterdir()) == []  # the shard in progress was abandoned


def test_a_process_killed_during_the_fill_leaves_no_trusted_partial_entry(
    published, container, cache_dir, blob_env, tmp_path
):
    proc = run_script(tmp_path, f"az://{container}/m", cache_dir, 100_000, "wait-for-part")
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    line = ""
    while line.strip() != "filling" and time.monotonic() < deadline:
        line = proc.stdout.readline()
    assert line.strip() == "filling", proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cache = NvmeCache(cache_dir)
    assert list(cache.tmp_dir.glob("*.part"))  # what the fill was writing: never an entry
    assert len(cache.entries()) < 3
    assert all(cache.verify(e) is None for e in cache.entries())
    with blob2gpu.open(f"az://{container}/m", **settings_for(cache_dir)) as ckpt:
        got = {n: as_bytes(t) for n, t in ckpt.to_dict().items()}
    assert got == expected(published)
    assert ckpt.wait_for_cache_fill(timeout=120).finished
    assert len(cache.entries()) == 3 and all(cache.verify(e) is None for e in cache.entries())
    assert any(r.endswith(".part") for r in cache.prune())


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blob2gpu", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def cli_settings(cache_dir, rate=0):
    return [
        "--set",
        "local_nvme_cache_enabled=true",
        "--set",
        f"cache_dir={cache_dir}",
        "--set",
        "cache_write_queue_bytes=0",
        "--set",
        f"cache_fill_bytes_per_second={rate}",
    ]


def test_cli_load_waits_for_the_fill_unless_told_not_to(
    published, container, cache_dir, blob_env, tmp_path
):
    uri = f"az://{container}/m"
    report = tmp_path / "load.json"
    done = run_cli("load", uri, *cli_settings(cache_dir), "--report", str(report))
    assert done.returncode == 0, done.stderr
    assert "0 shard(s) written during the load, 3 left to the fill: 3 written" in done.stdout
    assert len(NvmeCache(cache_dir).entries()) == 3
    import json

    written = json.loads(report.read_text())
    assert sorted(written["cache_filled"]) == SHARDS
    shown = run_cli("report", "show", str(report))
    assert "NVMe cache: 0 of 3 shard(s) hit, 0 written during the load, 3 left to the fill" in (
        shown.stdout
    )
    other = tmp_path / "other"
    quick = run_cli("load", uri, *cli_settings(other, 100_000), "--no-wait-cache-fill")
    assert quick.returncode == 0, quick.stderr
    assert "3 left to the fill (not waited for" in quick.stdout
    assert len(NvmeCache(other).entries()) < 3
    assert list(NvmeCache(other).tmp_dir.iterdir()) == []


def test_cache_warm_fills_without_loading(published, container, cache_dir, blob_env):
    uri = f"az://{container}/m"
    warm = run_cli("cache", "warm", uri, "--cache-dir", str(cache_dir))
    assert warm.returncode == 0, warm.stderr
    assert "3 shard(s) written, 0 already cached (checked), 0 damaged" in warm.stdout
    assert "0 not written" in warm.stdout
    cache = NvmeCache(cache_dir)
    assert len(cache.entries()) == 3 and all(cache.verify(e) is None for e in cache.entries())
    again = run_cli("cache", "warm", uri, "--cache-dir", str(cache_dir))
    assert again.returncode == 0 and "all 3 shard(s) already cached (checked)" in again.stdout
    with blob2gpu.open(uri, **settings_for(cache_dir)) as ckpt:
        got = {n: as_bytes(t) for n, t in ckpt.to_dict().items()}
    assert got == expected(published) and ckpt.report.cache_hit_rate == 1.0


def test_cache_warm_checks_what_is_cached_against_blob(published, container, cache_dir, blob_env):
    # An entry whose weights were replaced and whose record was recomputed to match them: only
    # Blob (here each blob's Content-MD5) tells, and warming reads every entry through.
    import hashlib
    import json
    import struct

    from blob2gpu import _core

    uri = f"az://{container}/m"
    assert run_cli("cache", "warm", uri, "--cache-dir", str(cache_dir)).returncode == 0
    entry = sorted(NvmeCache(cache_dir).entries(), key=lambda e: e.key)[0]
    data = entry.data_path.read_bytes()
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data = data[:start] + b"\x41" * (len(data) - start)
    entry.data_path.write_bytes(data)
    record = json.loads(entry.meta_path.read_text())
    chunk = record["chunk_bytes"]
    record["crc32c"] = [_core.crc32c(data[i : i + chunk]) for i in range(0, len(data), chunk)]
    if "sha256" in record:
        record["sha256"] = hashlib.sha256(data).hexdigest()
    entry.meta_path.write_text(json.dumps(record))
    again = run_cli("cache", "warm", uri, "--cache-dir", str(cache_dir))
    assert again.returncode == 0, again.stderr
    assert "1 shard(s) written, 2 already cached (checked), 1 damaged and fetched again" in (
        again.stdout
    )
    assert "damaged: model-" in again.stdout and "Content-MD5" in again.stdout
    with blob2gpu.open(uri, **settings_for(cache_dir)) as ckpt:
        got = {n: as_bytes(t) for n, t in ckpt.to_dict().items()}
    assert got == expected(published) and ckpt.report.cache_hit_rate == 1.0


def test_cache_warm_refuses_what_it_cannot_warm(container, cache_dir, blob_env, tmp_path):
    local = run_cli("cache", "warm", str(tmp_path), "--cache-dir", str(cache_dir))
    assert local.returncode == 2 and "InvalidArgument" in local.stderr
    assert "Blob checkpoint" in local.stderr
    missing = run_cli("cache", "warm", f"az://{container}/nothing", "--cache-dir", str(cache_dir))
    assert missing.returncode == 2 and "BlobNotFound" in missing.stderr


def test_verify_repair_fetches_a_damaged_entry_again(published, container, cache_dir, blob_env):
    run_cli("cache", "warm", f"az://{container}/m", "--cache-dir", str(cache_dir))
    cache = NvmeCache(cache_dir)
    entry = sorted(cache.entries(), key=lambda e: e.key)[0]
    data = bytearray(entry.data_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    entry.data_path.write_bytes(bytes(data))
    repaired = run_cli("cache", "verify", "--cache-dir", str(cache_dir), "--repair", "--quiet")
    assert repaired.returncode == 0, repaired.stderr
    assert repaired.stdout.startswith("BAD") and "fetched again" in repaired.stdout
    assert len(cache.entries()) == 3 and all(cache.verify(e) is None for e in cache.entries())


def test_verify_repair_removes_what_it_cannot_fetch_again(
    published, azurite, container, cache_dir, blob_env
):
    run_cli("cache", "warm", f"az://{container}/m", "--cache-dir", str(cache_dir))
    cache = NvmeCache(cache_dir)
    entry = next(e for e in cache.entries() if e.meta["blob"] == f"m/{SHARDS[0]}")
    entry.data_path.write_bytes(entry.data_path.read_bytes()[:-10])
    azurite.service().get_container_client(container).delete_blob(f"m/{SHARDS[0]}")
    repaired = run_cli("cache", "verify", "--cache-dir", str(cache_dir), "--repair", "--quiet")
    assert repaired.returncode == 0, repaired.stderr
    # Gone from Blob (Azurite answers the etag-pinned GET 412, Azure 404): never served again.
    assert "removed (not fetched again: fetching it failed: Blob" in repaired.stdout
    assert len(cache.entries()) == 2


@pytest.mark.parametrize("value", ["-1", "fast"])
def test_bad_fill_settings_are_refused(published, container, cache_dir, blob_env, value):
    with pytest.raises(blob2gpu.errors.ConfigError, match="cache_fill_bytes_per_second"):
        settings = settings_for(cache_dir, cache_fill_bytes_per_second=value)
        blob2gpu.load(f"az://{container}/m", **settings)
    env = dict(os.environ, BLOB2GPU_CACHE_FILL="maybe")
    bad = run_cli("load", f"az://{container}/m", env=env)
    assert bad.returncode == 2 and "cache_fill" in bad.stderr
