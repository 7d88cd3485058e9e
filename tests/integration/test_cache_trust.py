"""The NVMe cache as input, not state: a hit is checked against Blob's authority (the manifest, or
the blob's Content-MD5), never against the record beside it, so a forged entry is never served;
a damaged, malformed or unreadable entry is a miss, repaired within the load on every way of
loading, any number at once; nothing in the directory is opened through a symlink or as a
non-regular file; a directory another user could write is refused, and one shared on purpose
(the sticky bit) is read only where Blob has something to check the bytes by."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import blob2gpu
import pytest
from blob2gpu import _core
from blob2gpu.cache.nvme import NvmeCache
from blob2gpu.errors import ConfigError
from conftest import as_bytes
from conftest import checkpoint_bytes as expected
from support.azurite import ACCOUNT

SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
LOAD_TIMEOUT = 120  # seconds a load of the 1 MB checkpoint gets before the test calls it hung


@pytest.fixture(autouse=True)
def _azurite_account(blob_env):
    """az:// URIs name Azurite's account (a test may point them at the fault proxy instead)."""
    return blob_env


def settings_for(cache_dir, **more):
    return dict(local_nvme_cache_enabled=True, cache_dir=str(cache_dir), chunk_bytes=65536, **more)


def cached_load(uri, cache_dir, device="cpu", stream=False, **more):
    """Load through blob2gpu.open: (each tensor's bytes, the report)."""
    framework = "torch" if device == "cpu" else "dlpack"
    with blob2gpu.open(
        uri, device=device, framework=framework, **settings_for(cache_dir, **more)
    ) as c:
        if stream:
            got = {n: as_bytes(t) for n, t in c.stream()}
        else:
            got = {n: as_bytes(t) for n, t in c}
        report = c.report
    return got, report


def in_thread(fn, timeout=LOAD_TIMEOUT):
    """fn() on a thread: its result, or the test fails (it raised, or it hung)."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s (it hangs)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def shard_key(azurite, container, shard):
    etag = azurite.service().get_blob_client(container, f"m/{shard}").get_blob_properties().etag
    return NvmeCache.key(ACCOUNT, container, f"m/{shard}", etag.strip('"'))


def entry_files(cache_dir, key):
    return cache_dir / "entries" / f"{key}.bin", cache_dir / "entries" / f"{key}.json"


def planted(data: bytes) -> bytes:
    """The same shard (its header) with every weight byte replaced: what an attacker plants."""
    start = 8 + struct.unpack("<Q", data[:8])[0]
    return data[:start] + b"\x41" * (len(data) - start)


def record_for(record: dict, data: bytes) -> dict:
    """`record` recomputed for `data`, as whoever can write the directory can."""
    chunk = record["chunk_bytes"]
    crcs = [_core.crc32c(data[i : i + chunk]) for i in range(0, len(data), chunk)]
    forged = dict(record, crc32c=crcs)
    if "sha256" in forged:
        forged["sha256"] = hashlib.sha256(data).hexdigest()
    return forged


def forge(cache_dir, key):
    """Plant other weights in entry `key` and recompute its record to match them."""
    data_path, meta_path = entry_files(cache_dir, key)
    data = planted(data_path.read_bytes())
    data_path.write_bytes(data)
    meta_path.write_text(json.dumps(record_for(json.loads(meta_path.read_text()), data)))


def flip(cache_dir, key, where="data"):
    """Damage entry `key` as a disk does (its record untouched): one bit of its data, or of the
    header's length prefix."""
    data_path, _ = entry_files(cache_dir, key)
    data = bytearray(data_path.read_bytes())
    data[len(data) // 2 if where == "data" else 6] ^= 0x10
    data_path.write_bytes(bytes(data))


@pytest.fixture(params=["manifest", "content-md5"])
def authority(request, published, container, blob_env):
    """What Blob says the shards are: a manifest (written for the uploaded checkpoint), or only
    each blob's Content-MD5 (Azurite computes it on upload)."""
    if request.param == "manifest":
        from blob2gpu.integrity.publish import write_manifest

        write_manifest(f"az://{container}/m", chunk_bytes=65536)
    return request.param


def clear_content_md5(azurite, container):
    from azure.storage.blob import ContentSettings

    client = azurite.service().get_container_client(container)
    for blob in client.list_blobs(name_starts_with="m/"):
        client.get_blob_client(blob.name).set_http_headers(ContentSettings())


# --- a forged entry is never served -----------------------------------------------------------
# verify='crc32c' needs a manifest: it is not asked of a checkpoint that has only Content-MD5.
@pytest.mark.parametrize(
    ("authority", "verify"),
    [("manifest", "auto"), ("content-md5", "auto"), ("manifest", "crc32c")],
    indirect=["authority"],
)
def test_a_forged_entry_is_never_served(
    authority, verify, published, azurite, container, cache_dir
):
    uri = f"az://{container}/m"
    cached_load(uri, cache_dir, verify=verify)
    key = shard_key(azurite, container, SHARDS[0])
    forge(cache_dir, key)
    got, report = cached_load(uri, cache_dir, verify=verify)
    assert got == expected(published)  # not the planted weights
    assert report.verification == ("crc32c" if authority == "manifest" else "content-md5")
    assert list(report.cache_repaired) == [SHARDS[0]]
    why = report.cache_repaired[SHARDS[0]]  # what was wrong, not what a failed load would do
    assert why.startswith("ChecksumMismatch: ") and "load again" not in why
    assert [s.cache_hit for s in report.shards] == [False, True, True]
    # Fetched again and written through: the next load reads every shard from the cache.
    got, report = cached_load(uri, cache_dir, verify=verify)
    assert got == expected(published) and report.cache_hit_rate == 1.0
    assert report.cache_repaired == {}


def test_a_forged_entry_is_never_served_to_a_gpu(
    fake_driver, authority, published, azurite, container, cache_dir
):
    # The GPU target reads hits with O_DIRECT into the staging ring: still checked per chunk (or
    # over the whole blob) before any of the shard's tensors is handed out.
    uri = f"az://{container}/m"
    cached_load(uri, cache_dir, "cuda")
    for shard in SHARDS[:2]:
        forge(cache_dir, shard_key(azurite, container, shard))
    got, report = cached_load(uri, cache_dir, "cuda", staging_slot_bytes=65536)
    assert got == expected(published)
    assert sorted(report.cache_repaired) == SHARDS[:2]


def test_an_empty_crc_list_does_not_turn_checking_off(published, azurite, container, cache_dir):
    uri = f"az://{container}/m"
    cached_load(uri, cache_dir)
    key = shard_key(azurite, container, SHARDS[1])
    data_path, meta_path = entry_files(cache_dir, key)
    data_path.write_bytes(planted(data_path.read_bytes()))
    meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), crc32c=[])))
    got, report = cached_load(uri, cache_dir)
    assert got == expected(published)
    assert [s.cache_hit for s in report.shards] == [True, False, True]  # a malformed record


def test_letting_mismatches_through_does_not_read_the_cache(
    published, azurite, container, cache_dir
):
    # fail_if_checksum_mismatch=false completes a load despite a mismatch: a damaged entry would
    # be handed out instead of fetched again, so such a load does not use the cache.
    uri = f"az://{container}/m"
    cached_load(uri, cache_dir)
    forge(cache_dir, shard_key(azurite, container, SHARDS[0]))
    got, report = cached_load(uri, cache_dir, fail_if_checksum_mismatch=False)
    assert got == expected(published)
    assert sorted(report.cache_bypassed) == SHARDS and report.cache_hit_rate == 0.0
    assert "fail_if_checksum_mismatch" in report.cache_bypassed[SHARDS[0]]


# --- damaged entries are repaired within the load, on every path ------------------------------
@pytest.mark.parametrize("how", ["iterate", "stream", "load"])
def test_two_damaged_entries_are_repaired_in_one_load(
    authority, how, published, azurite, container, cache_dir
):
    uri = f"az://{container}/m"
    cached_load(uri, cache_dir)
    flip(cache_dir, shard_key(azurite, container, SHARDS[0]))
    flip(cache_dir, shard_key(azurite, container, SHARDS[2]), where="header")
    if how == "load":
        tensors = blob2gpu.load(uri, **settings_for(cache_dir))
        got = {n: as_bytes(t) for n, t in tensors.items()}
    else:
        got, report = cached_load(uri, cache_dir, stream=how == "stream")
        assert sorted(report.cache_repaired) == [SHARDS[0], SHARDS[2]]
        assert [s.cache_hit for s in report.shards] == [False, True, False]
        assert report.tensors == 9 and len(report.shards) == 3
    assert got == expected(published)
    cache = NvmeCache(cache_dir)
    assert len(cache.entries()) == 3 and all(cache.verify(e) is None for e in cache.entries())


def test_a_repair_that_cannot_reach_blob_names_the_entry_and_the_fix(
    published, azurite, container, cache_dir, fault_proxy, monkeypatch
):
    uri = f"az://{container}/m"
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    cached_load(uri, cache_dir)
    key = shard_key(azurite, container, SHARDS[1])
    flip(cache_dir, key)
    fault_proxy.faults.status = 403  # the listing and index pass; every GET of a shard is refused

    def refuse_shards(path, count):
        if path.endswith(".safetensors"):
            fault_proxy.faults.statuses += 1

    fault_proxy.faults.on_range_get = refuse_shards
    with pytest.raises(blob2gpu.errors.AccessDenied) as caught:
        cached_load(uri, cache_dir)
    message = str(caught.value)
    assert key in message and "blob2gpu cache verify --repair" in message
    assert caught.value.hint and key in caught.value.hint
    fault_proxy.reset()
    # The damaged data is gone (never served again); its record says what to fetch again.
    run = [sys.executable, "-m", "blob2gpu", "cache", "verify", "--cache-dir", str(cache_dir)]
    env = dict(os.environ)
    bad = subprocess.run([*run, "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and f"BAD  {key}" in bad.stdout and "no data" in bad.stdout
    fixed = subprocess.run([*run, "--repair"], capture_output=True, text=True, env=env, timeout=120)
    assert fixed.returncode == 0 and "fetched again" in fixed.stdout, fixed.stdout + fixed.stderr
    got, report = cached_load(uri, cache_dir)
    assert got == expected(published) and report.cache_hit_rate == 1.0


def test_repair_sends_no_request_where_a_forged_record_points(
    published, azurite, container, cache_dir
):
    # A record rewritten to name another account (its blob on a public endpoint an attacker
    # owns) does not match the entry's name, which is the hash of what a load wrote there: the
    # entry is removed and nothing is fetched for it.
    uri = f"az://{container}/m"
    cached_load(uri, cache_dir)
    key = shard_key(azurite, container, SHARDS[1])
    flip(cache_dir, key)
    _, meta_path = entry_files(cache_dir, key)
    meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), account="attacker")))
    run = [sys.executable, "-m", "blob2gpu", "cache", "verify", "--cache-dir", str(cache_dir)]
    fixed = subprocess.run([*run, "--repair"], capture_output=True, text=True, timeout=120)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert f"BAD  {key}" in fixed.stdout and "does not match its name" in fixed.stdout
    assert not entry_files(cache_dir, key)[0].exists()
    got, report = cached_load(uri, cache_dir)  # fetched from the checkpoint's own account
    assert got == expected(published) and report.cache_hit_rate < 1.0


# --- malformed records: a miss, never an untyped error or a hang --------------------------------
def _record_with(**changes):
    def make(record: dict) -> bytes:
        return json.dumps(dict(record, **changes)).encode()

    return make


def _record_without(key):
    def make(record: dict) -> bytes:
        return json.dumps({k: v for k, v in record.items() if k != key}).encode()

    return make


MALFORMED = {
    "no-chunk-bytes": _record_without("chunk_bytes"),
    "string-chunk-bytes": _record_with(chunk_bytes="4194304"),
    "negative-chunk-bytes": _record_with(chunk_bytes=-4096),
    "huge-chunk-bytes": _record_with(chunk_bytes=1 << 62),
    "zero-chunk-bytes": _record_with(chunk_bytes=0),
    "string-crc": _record_with(crc32c=["12345"]),
    "negative-crc": _record_with(crc32c=[-1]),
    "wide-crc": _record_with(crc32c=[1 << 40]),
    "not-an-object": lambda record: b"[1, 2, 3]",
    "deep": lambda record: b"[" * 200_000,
}


def _plant_record(meta_path: Path, kind: str, record: dict, tmp_path: Path) -> None:
    meta_path.unlink()
    if kind in MALFORMED:
        meta_path.write_bytes(MALFORMED[kind](record))
    elif kind == "fifo":
        os.mkfifo(meta_path)
    elif kind == "symlink-to-fifo":
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        meta_path.symlink_to(fifo)
    elif kind == "dev-zero":
        meta_path.symlink_to("/dev/zero")
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", [*MALFORMED, "fifo", "symlink-to-fifo", "dev-zero"])
def test_a_malformed_record_is_a_miss(kind, published, azurite, container, cache_dir, tmp_path):
    uri = f"az://{container}/m"
    cached_load(uri, cache_dir)
    key = shard_key(azurite, container, SHARDS[0])
    _, meta_path = entry_files(cache_dir, key)
    _plant_record(meta_path, kind, json.loads(meta_path.read_text()), tmp_path)
    # `cache verify` reports it, neither crashing nor hanging.
    verify = subprocess.run(
        [sys.executable, "-m", "blob2gpu", "cache", "verify", "--cache-dir", str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=LOAD_TIMEOUT,
    )
    assert verify.returncode == 1 and "Traceback" not in verify.stderr, verify.stderr
    assert f"BAD  {key}" in verify.stdout
    got, report = in_thread(lambda: cached_load(uri, cache_dir))
    assert got == expected(published)
    assert [s.cache_hit for s in report.shards] == [False, True, True]


def test_data_that_is_not_a_regular_file_is_a_miss(published, azurite, container, cache_dir):
    uri = f"az://{container}/m"
    cached_load(uri, cache_dir)
    data_path, _ = entry_files(cache_dir, shard_key(azurite, container, SHARDS[2]))
    data_path.unlink()
    data_path.mkdir()
    got, report = in_thread(lambda: cached_load(uri, cache_dir))
    assert got == expected(published)
    assert [s.cache_hit for s in report.shards] == [True, True, False]


# --- nothing is opened through a symlink --------------------------------------------------------
@pytest.mark.parametrize("where", ["part", "record-temp", "lock", "data", "record"])
def test_a_symlink_at_any_path_the_cache_opens_leaves_its_target_alone(
    where, published, azurite, container, cache_dir, tmp_path
):
    uri = f"az://{container}/m"
    key = shard_key(azurite, container, SHARDS[0])
    victim = tmp_path / "victim"
    if where in ("part", "record-temp", "lock"):
        NvmeCache(cache_dir)  # the directory, empty
        # The names a writer in this thread would have used when they were predictable.
        stem = f"{key}.{os.getpid()}.{threading.get_ident()}"
        link = {
            "part": cache_dir / "tmp" / f"{stem}.part",
            "record-temp": cache_dir / "tmp" / f"{stem}.json",
            "lock": cache_dir / "locks" / f"{key}.lock",
        }[where]
        if where == "lock":
            victim = tmp_path / "made-elsewhere"  # a link to a name that does not exist
        else:
            victim.write_bytes(b"the victim's own bytes\n" * 100)
        link.symlink_to(victim)
    else:
        cached_load(uri, cache_dir)
        data_path, meta_path = entry_files(cache_dir, key)
        data = planted(data_path.read_bytes())
        record = record_for(json.loads(meta_path.read_text()), data)
        if where == "data":
            # Elsewhere, planted weights and a record that matches them.
            victim.write_bytes(data)
            meta_path.write_text(json.dumps(record))
            data_path.unlink()
            data_path.symlink_to(victim)
        else:
            victim.write_text(json.dumps(record))
            data_path.write_bytes(data)
            meta_path.unlink()
            meta_path.symlink_to(victim)
    before = (victim.read_bytes(), victim.stat().st_mtime_ns) if victim.exists() else None
    got, report = cached_load(uri, cache_dir)
    assert got == expected(published)
    after = (victim.read_bytes(), victim.stat().st_mtime_ns) if victim.exists() else None
    assert after == before  # not written, truncated, touched, or made
    assert report.cache_hit_rate < 1.0 or where in ("part", "record-temp", "lock")


# --- who may write the directory ----------------------------------------------------------------
@pytest.mark.parametrize("where", ["root", "entries"])
def test_a_cache_directory_others_can_write_is_refused(
    where, published, container, cache_dir, tmp_path
):
    NvmeCache(cache_dir)
    target = cache_dir if where == "root" else cache_dir / "entries"
    os.chmod(target, 0o777)
    with pytest.raises(ConfigError, match=r"writable by group and others without the sticky bit"):
        cached_load(f"az://{container}/m", cache_dir)
    with pytest.raises(ConfigError, match=r"chmod go-w"):
        NvmeCache(cache_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_cache_directory_of_another_user_is_refused(published, container, cache_dir):
    cache_dir.mkdir()
    os.chown(cache_dir, 12345, 12345)
    with pytest.raises(ConfigError, match=r"belongs to uid 12345.*chown"):
        cached_load(f"az://{container}/m", cache_dir)


def test_a_subdirectory_replaced_by_a_symlink_is_refused(published, container, cache_dir, tmp_path):
    NvmeCache(cache_dir)
    (cache_dir / "entries").rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache_dir / "entries").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="symlink"):
        cached_load(f"az://{container}/m", cache_dir)
    assert list(elsewhere.iterdir()) == []


def test_a_shared_directory_is_read_only_where_blob_vouches_for_the_bytes(
    published, azurite, container, cache_dir
):
    # A hostPath shared by pods of different users: mode 1777 is accepted. With a Content-MD5 (or
    # a manifest) hits are checked against Blob; without either, nothing could tell a planted
    # entry from a good one, so the cache is neither read nor written for those shards.
    uri = f"az://{container}/m"
    cache_dir.mkdir(mode=0o700)
    os.chmod(cache_dir, 0o1777)
    cached_load(uri, cache_dir)
    assert stat.S_IMODE((cache_dir / "entries").stat().st_mode) == 0o1777  # shared like the root
    got, report = cached_load(uri, cache_dir)
    assert got == expected(published) and report.cache_hit_rate == 1.0
    clear_content_md5(azurite, container)  # new etags too: the entries are of other versions
    got, report = cached_load(uri, cache_dir)
    assert got == expected(published)
    assert report.cache_hit_rate == 0.0 and sorted(report.cache_bypassed) == SHARDS
    assert "other users can write the cache directory" in report.cache_bypassed[SHARDS[0]]
    assert report.cache_written == [] and report.cache_fill_pending == []


def test_without_an_authority_a_private_directory_checks_the_record(
    published, azurite, container, cache_dir
):
    # No manifest, no Content-MD5, a directory only this user can write: hits are read and
    # checked against their record, which still catches a damaged disk.
    uri = f"az://{container}/m"
    clear_content_md5(azurite, container)
    cached_load(uri, cache_dir)
    flip(cache_dir, shard_key(azurite, container, SHARDS[1]))
    got, report = cached_load(uri, cache_dir)
    assert got == expected(published) and report.verification == "size+etag"
    assert list(report.cache_repaired) == [SHARDS[1]] and report.cache_bypassed == {}


def test_an_entry_other_users_can_write_is_read_not_mapped(
    published, azurite, container, cache_dir
):
    # A mapping shows whatever is written to the file later, checked or not.
    uri = f"az://{container}/m"
    cached_load(uri, cache_dir)
    got, report = cached_load(uri, cache_dir)
    assert report.mmap and report.cache_hit_rate == 1.0
    data_path, _ = entry_files(cache_dir, shard_key(azurite, container, SHARDS[0]))
    os.chmod(data_path, 0o666)
    got, report = cached_load(uri, cache_dir)
    assert got == expected(published) and report.cache_hit_rate == 1.0 and not report.mmap
