"""Integrity end to end: the manifest written at publish time, every chunk checked as it lands
(local files, Blob, cpu and cuda), a mismatch that fails fast naming shard and byte range and
returns nothing, or, when asked, a load that completes and lists it."""

from __future__ import annotations

import gc
import json

import blob2gpu
import pytest
import torch
from blob2gpu import _core, errors
from blob2gpu.integrity.manifest import MANIFEST_NAME, Manifest, hash_file, manifest_for_directory
from blob2gpu.integrity.publish import publish, write_manifest
from conftest import as_bytes, prepare_device, random_tensor, upload_directory
from conftest import checkpoint_bytes as expected
from support.azurite import ACCOUNT, ACCOUNT_KEY


@pytest.fixture
def checkpoint(write_checkpoint):
    return write_checkpoint(
        [
            {f"s{s}.w{i}": random_tensor(torch.float32, (128, 200), s * 3 + i) for i in range(3)}
            for s in range(3)
        ]
    )  # 3 x ~300 KB


def with_manifest(directory, chunk_bytes=65536):
    manifest = manifest_for_directory(directory, chunk_bytes)
    (directory / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def flip_byte(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def framework_for(device):
    return "torch" if device == "cpu" else "dlpack"


def test_manifest_entries_match_the_files(checkpoint):
    import hashlib

    from blob2gpu._core import crc32c

    manifest = with_manifest(checkpoint, chunk_bytes=100_000)
    shard = checkpoint / "model-00001-of-00003.safetensors"
    data = shard.read_bytes()
    entry = manifest.files[shard.name]
    assert entry.size == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.crc32c == [crc32c(data[i : i + 100_000]) for i in range(0, len(data), 100_000)]
    again = Manifest.from_json((checkpoint / MANIFEST_NAME).read_text(), "test")
    assert again.files == manifest.files and again.chunk_bytes == 100_000
    assert hash_file(shard, 100_000) == entry


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"format": "other"}, "not a blob2gpu manifest"),
        (
            {"format": "blob2gpu-manifest", "version": 99, "chunk_bytes": 1, "files": {}},
            "version 99",
        ),
        (
            {
                "format": "blob2gpu-manifest",
                "version": 1,
                "chunk_bytes": 4,
                "files": {"a": {"size": 9, "sha256": "0" * 64, "crc32c": [1]}},
            },
            "entry of 'a'",
        ),
    ],
)
def test_malformed_manifests(doc, match):
    with pytest.raises(errors.InvalidManifest, match=match):
        Manifest.from_json(json.dumps(doc), "m.json")


def load_checked(checkpoint, device, **settings):
    """Load with blob2gpu: (each tensor's bytes, the report, the shard files' total bytes)."""
    with blob2gpu.open(
        str(checkpoint), device=device, framework=framework_for(device), **settings
    ) as ckpt:
        got = {n: as_bytes(t) for n, t in ckpt.to_dict().items()}
        report = ckpt.report
    return got, report, sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))


@pytest.mark.parametrize("chunk_bytes", [1000, 65536, 4 << 20])
def test_loads_verify_every_chunk(device, checkpoint, chunk_bytes):
    with_manifest(checkpoint, chunk_bytes)
    settings = {"staging_slot_bytes": 8192} if device != "cpu" else {}
    got, report, total = load_checked(checkpoint, device, **settings)
    assert got == expected(checkpoint)
    assert report.verification == "crc32c" and report.verified_bytes == total


def test_a_corrupted_byte_fails_the_load_and_returns_nothing(device, checkpoint):
    with_manifest(checkpoint)
    victim = checkpoint / "model-00002-of-00003.safetensors"
    flip_byte(victim, 150_000)
    gc.collect()
    arenas = _core.live_arena_count()
    with pytest.raises(errors.ChecksumMismatch) as info:
        blob2gpu.load(str(checkpoint), device=device, framework=framework_for(device))
    message = str(info.value)
    assert "model-00002-of-00003.safetensors" in message
    assert "bytes [131072, 196608)" in message
    # The same facts as fields, for code: the shard and the chunk's offset.
    assert info.value.shard == "model-00002-of-00003.safetensors"
    assert info.value.offset == 131072
    del info
    gc.collect()
    assert _core.live_arena_count() == arenas


def test_mismatches_can_be_let_through_and_are_reported(checkpoint):
    with_manifest(checkpoint)
    flip_byte(checkpoint / "model-00003-of-00003.safetensors", 70_000)
    with blob2gpu.open(str(checkpoint), fail_if_checksum_mismatch=False) as ckpt:
        assert len(ckpt.to_dict()) == 9
        failures = ckpt.report.checksum_failures
    assert len(failures) == 1 and "[65536, 131072)" in failures[0]
    assert [s.checksum for s in ckpt.report.shards] == ["ok", "ok", "mismatch"]


@pytest.mark.parametrize("chunk_bytes", [1000, 65536])
def test_sha256_mode_checks_every_chunk(device, checkpoint, chunk_bytes):
    # 8 KiB slots and 1000-byte chunks: most chunks are cut by a slot boundary and assembled.
    with_manifest(checkpoint, chunk_bytes)
    settings = {"staging_slot_bytes": 8192} if device != "cpu" else {"mmap_local_files": False}
    got, report, total = load_checked(checkpoint, device, verify="sha256", **settings)
    assert got == expected(checkpoint)
    assert report.verification == "sha256" and report.verified_bytes == total
    assert {s.checksum for s in report.shards} == {"ok"}


def test_sha256_mode_catches_corruption_and_needs_chunk_digests(device, checkpoint):
    manifest = with_manifest(checkpoint, 65536)
    flip_byte(checkpoint / "model-00003-of-00003.safetensors", 70_000)
    gc.collect()
    arenas = _core.live_arena_count()
    with pytest.raises(errors.ChecksumMismatch, match=r"bytes \[65536, 131072\) have SHA-256"):
        blob2gpu.load(
            str(checkpoint), device=device, framework=framework_for(device), verify="sha256"
        )
    gc.collect()
    assert _core.live_arena_count() == arenas
    for entry in manifest.files.values():  # a manifest from before per-chunk digests
        entry.sha256_chunks = None
    (checkpoint / MANIFEST_NAME).write_text(manifest.to_json())
    assert "sha256_chunks" not in (checkpoint / MANIFEST_NAME).read_text()
    with pytest.raises(errors.InvalidManifest, match="blob2gpu manifest"):
        blob2gpu.load(str(checkpoint), verify="sha256")
    (checkpoint / MANIFEST_NAME).unlink()
    with pytest.raises(errors.ManifestMissing, match="verify='sha256'"):
        blob2gpu.load(str(checkpoint), verify="sha256")


def test_mmap_loads_are_verified_too(checkpoint):
    with_manifest(checkpoint)
    flip_byte(checkpoint / "model-00001-of-00003.safetensors", 1000)
    with pytest.raises(errors.ChecksumMismatch):
        blob2gpu.load(str(checkpoint), mmap_local_files=True)


def test_verify_modes(checkpoint):
    flip = checkpoint / "model-00001-of-00003.safetensors"
    with pytest.raises(errors.ManifestMissing, match="blob2gpu publish"):
        blob2gpu.load(str(checkpoint), verify="crc32c")
    with blob2gpu.open(str(checkpoint)) as ckpt:  # auto without a manifest: nothing to check
        ckpt.to_dict()
        assert ckpt.report.verification == "none"
    with_manifest(checkpoint)
    flip_byte(flip, 5000)
    assert len(blob2gpu.load(str(checkpoint), verify="none")) == 9


def test_size_differing_from_the_manifest(checkpoint):
    with_manifest(checkpoint)
    victim = checkpoint / "model-00002-of-00003.safetensors"
    victim.write_bytes(victim.read_bytes() + b"extra")
    with pytest.raises(errors.InvalidManifest, match="changed after it was published"):
        blob2gpu.load(str(checkpoint))


def test_a_shard_the_manifest_does_not_list_is_refused_unless_unchecked(checkpoint):
    # Another checkpoint's manifest beside these shards (or a shard added after publishing):
    # the unlisted shard, even corrupted, is not loaded as if it had been checked.
    manifest = with_manifest(checkpoint)
    victim = "model-00002-of-00003.safetensors"
    del manifest.files[victim]
    (checkpoint / MANIFEST_NAME).write_text(manifest.to_json())
    flip_byte(checkpoint / victim, 5000)
    for verify in ("auto", "crc32c", "sha256"):
        with pytest.raises(errors.InvalidManifest, match=f"does not list '{victim}'") as info:
            blob2gpu.load(str(checkpoint), verify=verify)
        assert "changed after it was published" in str(info.value)
        assert "verify='none'" in info.value.hint
    assert len(blob2gpu.load(str(checkpoint), verify="none")) == 9  # asked for: unchecked


# --- Blob Storage ----------------------------------------------------------------------------


def test_publish_then_load_verified(device, checkpoint, azurite, container, blob_env):
    manifest = publish(checkpoint, f"az://{container}/llama", chunk_bytes=50_000)
    assert set(manifest.files) == {f.name for f in checkpoint.iterdir()}
    framework = framework_for(device)
    with blob2gpu.open(
        f"az://{container}/llama", device=device, framework=framework, chunk_bytes=32768
    ) as ckpt:
        got = {n: as_bytes(t) for n, t in ckpt.to_dict().items()}
        assert ckpt.report.verification == "crc32c"
    assert got == expected(checkpoint)


def test_publishing_over_another_checkpoint_is_refused_and_uploads_nothing(
    checkpoint, write_checkpoint, azurite, container, blob_env
):
    publish(checkpoint, f"az://{container}/llama")
    publish(checkpoint, f"az://{container}/llama")  # the same files again: a re-publish
    other = write_checkpoint([{"new.w": random_tensor(torch.float32, (8, 8))}], name="v2")
    (other / "model-00001-of-00001.safetensors").rename(other / "model.safetensors")
    (other / "model.safetensors.index.json").unlink()
    with pytest.raises(errors.InvalidArgument, match="already holds 'model-00001-of-00003") as e:
        publish(other, f"az://{container}/llama")
    assert "'model-00003-of-00003.safetensors' and 1 more" in str(e.value)  # the old index
    assert "nothing was uploaded" in str(e.value)
    assert e.value.hint.startswith("publish to a new prefix")
    names = {b.name for b in azurite.service().get_container_client(container).list_blobs()}
    assert "llama/model.safetensors" not in names
    assert sorted(blob2gpu.load(f"az://{container}/llama")) == sorted(expected(checkpoint))
    publish(other, f"az://{container}/llama-v2")  # a prefix of its own
    assert list(blob2gpu.load(f"az://{container}/llama-v2")) == ["new.w"]


def test_wire_corruption_is_caught(
    device, checkpoint, azurite, container, fault_proxy, monkeypatch
):
    publish(
        checkpoint,
        f"{azurite.endpoint()}/{container}/llama",
        credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY},
    )
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    for verify in ("auto", "sha256"):
        fault_proxy.faults.flips = 1
        fault_proxy.faults.flip_offset = 20_000
        with pytest.raises(errors.ChecksumMismatch, match="corrupted"):
            blob2gpu.load(
                f"az://{container}/llama",
                device=device,
                framework=framework_for(device),
                chunk_bytes=65536,
                verify=verify,
            )


def test_blob_overwritten_with_same_size_after_publishing(checkpoint, azurite, container, blob_env):
    publish(checkpoint, f"az://{container}/llama")
    victim = checkpoint / "model-00002-of-00003.safetensors"
    flip_byte(victim, 200_000)
    azurite.service().get_container_client(container).upload_blob(
        "llama/model-00002-of-00003.safetensors", victim.read_bytes(), overwrite=True
    )
    with pytest.raises(errors.ChecksumMismatch, match="model-00002-of-00003.safetensors"):
        blob2gpu.load(f"az://{container}/llama")


def test_manifest_for_a_checkpoint_already_in_blob(checkpoint, azurite, container, blob_env):
    from conftest import upload_directory

    upload_directory(azurite, container, checkpoint, "plain")
    manifest = write_manifest(f"az://{container}/plain", chunk_bytes=100_000)
    local = manifest_for_directory(checkpoint, 100_000)
    assert manifest.files == local.files
    with blob2gpu.open(f"az://{container}/plain") as ckpt:
        ckpt.to_dict()
        assert ckpt.report.verification == "crc32c"


def test_publish_and_manifest_commands(checkpoint, azurite, container, blob_env):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "blob2gpu", *args], capture_output=True, text=True, timeout=120
        )

    out = run("publish", str(checkpoint), f"az://{container}/cli", "--chunk-bytes", "64KiB")
    assert out.returncode == 0, out.stderr
    assert "blob2gpu.manifest.json" in out.stdout
    client = azurite.service().get_container_client(container)
    client.delete_blob(f"cli/{MANIFEST_NAME}")
    out = run("manifest", f"az://{container}/cli")
    assert out.returncode == 0, out.stderr
    with blob2gpu.open(f"az://{container}/cli") as ckpt:
        ckpt.to_dict()
        assert ckpt.report.verification == "crc32c"


def test_publish_creates_a_missing_container(checkpoint, azurite, blob_env):
    import subprocess
    import sys

    name = "fresh-publish"
    out = subprocess.run(
        [sys.executable, "-m", "blob2gpu", "publish", str(checkpoint), f"az://{name}/m"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert out.returncode == 0, out.stderr
        got = blob2gpu.load(f"az://{name}/m", verify="crc32c")
        assert {n: as_bytes(t) for n, t in got.items()} == expected(checkpoint)
    finally:
        azurite.service().delete_container(name)


def test_publish_without_the_right_to_create_the_container_says_what_to_do(
    checkpoint, azurite, blob_env
):
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    # A container SAS may write blobs but never create (or inspect) its container.
    sas = generate_container_sas(
        ACCOUNT,
        "not-there",
        ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True, write=True, list=True, create=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
    )
    with pytest.raises(errors.SourceUnavailable) as info:
        publish(checkpoint, f"{azurite.endpoint()}/not-there/m?{sas}")
    assert "'not-there'" in str(info.value) and info.value.hint is not None
    assert "create container 'not-there' first" in info.value.hint
    assert str(info.value).endswith(info.value.hint) and "case-sensitive" not in str(info.value)
    assert not azurite.service().get_container_client("not-there").exists()


def test_publish_refuses_a_folder_without_safetensors_and_uploads_nothing(
    tmp_path, azurite, container, blob_env
):
    import subprocess
    import sys

    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 64)
    with pytest.raises(errors.SourceUnavailable, match="no .safetensors files"):
        publish(folder, f"az://{container}/m")
    out = subprocess.run(
        [sys.executable, "-m", "blob2gpu", "publish", str(folder), f"az://{container}/m"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "no .safetensors files" in out.stderr
    assert "published" not in out.stdout
    assert list(azurite.service().get_container_client(container).list_blobs()) == []


@pytest.mark.parametrize(
    ("keep", "error"),
    [
        (lambda raw: raw[:-1], errors.InvalidOffsets),  # the data's last byte missing
        (lambda raw: raw[:-100_000], errors.InvalidOffsets),
        (lambda raw: raw[:20], errors.HeaderTruncated),  # the header cut short
    ],
    ids=["last-byte", "100-KB", "header"],
)
def test_publish_refuses_a_truncated_shard_and_uploads_nothing(
    checkpoint, azurite, container, blob_env, keep, error
):
    shard = checkpoint / "model-00002-of-00003.safetensors"
    shard.write_bytes(keep(shard.read_bytes()))
    with pytest.raises(error) as info:
        publish(checkpoint, f"az://{container}/m")
    assert info.value.shard == shard.name and "nothing was uploaded" in str(info.value)
    assert list(azurite.service().get_container_client(container).list_blobs()) == []


# --- Content-MD5: verify='auto' on a Blob checkpoint without a manifest --------------------------


@pytest.mark.parametrize(
    ("device", "strategy"), [("cpu", "direct"), ("cuda", "direct-gpu"), ("cuda", "host-staging")]
)
def test_content_md5_is_checked_without_a_manifest(
    request, device, strategy, checkpoint, azurite, container, fault_proxy, monkeypatch
):
    prepare_device(request, device)
    upload_directory(azurite, container, checkpoint, "plain")
    props = azurite.service().get_blob_client(container, "plain/model-00001-of-00003.safetensors")
    assert props.get_blob_properties().content_settings.content_md5  # the service computed it
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    # 16 KiB ranges over 8 connections: ranges land out of order and wait for their turn (in
    # the arena on cpu and with host staging, as copies of the staging slots on direct-gpu).
    settings = (
        {"chunk_bytes": 16384, "staging_slot_bytes": 16384}
        if device != "cpu"
        else {"chunk_bytes": 16384}
    )
    if device != "cpu" and strategy == "host-staging":
        settings["direct_gpu_load"] = False
    with blob2gpu.open(
        f"az://{container}/plain", device=device, framework=framework_for(device), **settings
    ) as ckpt:
        got = {n: as_bytes(t) for n, t in ckpt.to_dict().items()}
        report = ckpt.report
    assert got == expected(checkpoint)
    assert report.verification == "content-md5" and {s.checksum for s in report.shards} == {"ok"}
    total = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    assert report.verified_bytes == total

    fault_proxy.faults.flips = 1
    fault_proxy.faults.flip_offset = 5000
    gc.collect()
    arenas = _core.live_arena_count()
    with pytest.raises(errors.ChecksumMismatch, match="Content-MD5"):
        blob2gpu.load(
            f"az://{container}/plain", device=device, framework=framework_for(device), **settings
        )
    gc.collect()
    assert _core.live_arena_count() == arenas


def test_blobs_without_content_md5_are_flagged_size_and_etag(
    checkpoint, azurite, container, blob_env
):
    from azure.storage.blob import ContentSettings

    upload_directory(azurite, container, checkpoint, "plain")
    client = azurite.service().get_container_client(container)
    for blob in client.list_blobs(name_starts_with="plain/"):
        client.get_blob_client(blob.name).set_http_headers(ContentSettings())  # clears the MD5
    with blob2gpu.open(f"az://{container}/plain") as ckpt:
        ckpt.to_dict()
        assert ckpt.report.verification == "size+etag"
        assert {s.checksum for s in ckpt.report.shards} == {"unchecked"}
