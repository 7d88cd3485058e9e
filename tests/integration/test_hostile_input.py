"""Documents a load reads that anyone may have written: an index or a manifest, beside local
shards or in Blob. Each is a regular file (a FIFO or /dev/zero is refused at once, not waited
on or read forever), size-capped, and nested at most documents.MAX_DEPTH deep; whatever they
hold, a load ends in InvalidIndex or InvalidManifest, never RecursionError, MemoryError or a
hang, and the message quotes nothing of them beyond a clipped name."""

from __future__ import annotations

import os
import threading

import blob2gpu
import pytest
import torch
from blob2gpu import errors
from conftest import random_tensor, upload_directory

DEEP = "[" * 100_000  # a JSON parser that recurses per level ends in RecursionError


@pytest.fixture
def checkpoint(write_checkpoint):
    return write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float32, (16, 16), seed=s)} for s in range(2)]
    )


def raises_at_once(kind, fn, *args, **kwargs):
    """The error fn raises, which must be a `kind`, on a thread that must end (a hang guard, not
    a timing)."""
    raised: list[BaseException] = []

    def run():
        try:
            fn(*args, **kwargs)
        except BaseException as e:  # the test inspects whatever it was
            raised.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), f"{fn.__name__} hangs"
    assert raised and isinstance(raised[0], kind), raised
    return raised[0]


def load(uri, **settings):
    return blob2gpu.load(str(uri), framework="dlpack", **settings)


# -- local -----------------------------------------------------------------------------------------
def test_a_deeply_nested_local_index_is_an_invalid_index(checkpoint):
    index = checkpoint / "model.safetensors.index.json"
    index.write_text(DEEP)
    for uri in (checkpoint, index):
        error = raises_at_once(errors.InvalidIndex, load, uri)
        assert "nests arrays or objects more than 64 deep" in str(error)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_local_index_that_is_no_regular_file_is_refused_at_once(checkpoint, kind):
    index = checkpoint / "model.safetensors.index.json"
    index.unlink()
    if kind == "fifo":
        os.mkfifo(index)
    else:
        index.symlink_to("/dev/zero")
    error = raises_at_once(errors.InvalidIndex, load, index)
    assert "not a regular file" in str(error)


def test_a_local_index_error_quotes_nothing_of_it(checkpoint):
    index = checkpoint / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "' + "s" * 10_000 + '.safetensors"}}')
    error = raises_at_once(errors.SourceUnavailable, load, checkpoint)
    assert len(str(error)) < 1000
    index.write_text('{"weight_map": {"secret-value": 3}} trailing')
    error = raises_at_once(errors.InvalidIndex, load, checkpoint)
    assert "secret-value" not in str(error)


def test_a_deeply_nested_local_manifest_is_an_invalid_manifest(checkpoint):
    (checkpoint / "blob2gpu.manifest.json").write_text('{"format": ' + DEEP)
    error = raises_at_once(errors.InvalidManifest, load, checkpoint)
    assert "nests arrays or objects more than 64 deep" in str(error)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_local_manifest_that_is_no_regular_file_is_refused_at_once(checkpoint, kind):
    manifest = checkpoint / "blob2gpu.manifest.json"
    if kind == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to("/dev/zero")
    error = raises_at_once(errors.InvalidManifest, load, checkpoint)
    assert "not a regular file" in str(error)


# -- Blob ------------------------------------------------------------------------------------------
def test_a_deeply_nested_blob_index_or_manifest_is_typed(checkpoint, azurite, container, blob_env):
    upload_directory(azurite, container, checkpoint, "m")
    client = azurite.service().get_container_client(container)
    client.upload_blob("m/model.safetensors.index.json", DEEP.encode(), overwrite=True)
    error = raises_at_once(errors.InvalidIndex, load, f"az://{container}/m")
    assert "more than 64 deep" in str(error)
    client.delete_blob("m/model.safetensors.index.json")
    client.upload_blob("m/blob2gpu.manifest.json", DEEP.encode(), overwrite=True)
    error = raises_at_once(errors.InvalidManifest, load, f"az://{container}/m")
    assert "more than 64 deep" in str(error)


def test_a_blob_index_or_manifest_larger_than_its_cap_is_not_read(
    checkpoint, azurite, container, blob_env, monkeypatch, fault_proxy
):
    # The caps (64 MiB, 256 MiB) lowered so that a small upload passes them; the listing's size
    # decides, before a byte is read.
    from blob2gpu.sources.azure import container as container_module
    from blob2gpu.sources.azure import listing

    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    upload_directory(azurite, container, checkpoint, "m")
    monkeypatch.setattr(listing, "INDEX_MAX_BYTES", 16)
    error = raises_at_once(errors.InvalidIndex, load, f"az://{container}/m")
    assert "more than an index holds" in str(error)
    assert fault_proxy.counters.range_gets == 0
    monkeypatch.undo()
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    client = azurite.service().get_container_client(container)
    client.upload_blob("m/blob2gpu.manifest.json", b"{}" + b" " * 64, overwrite=True)
    monkeypatch.setattr(container_module, "MANIFEST_MAX_BYTES", 16)
    error = raises_at_once(errors.InvalidManifest, load, f"az://{container}/m")
    assert "more than a manifest holds" in str(error)
