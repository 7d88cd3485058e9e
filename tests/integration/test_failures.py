"""Bad input gets a clear, typed error and loses nothing: missing files, broken indexes, corrupt
shards in the middle of a load, bad arguments."""

from __future__ import annotations

import gc
import json

import blob2gpu
import pytest
import torch
from blob2gpu import _core, errors
from conftest import random_tensor


def three_shards(write_checkpoint):
    return write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float32, (128, 64), seed=s)} for s in range(3)]
    )


def test_missing_checkpoint():
    with pytest.raises(errors.SourceUnavailable, match=r"does not exist"):
        blob2gpu.load("/nonexistent/model.safetensors")


def test_errors_say_what_to_check_in_their_hint(tmp_path):
    with pytest.raises(errors.SourceUnavailable) as missing:
        blob2gpu.load(str(tmp_path / "nonexistent"))
    assert missing.value.hint.startswith("check the path")
    assert str(missing.value).endswith(f"; {missing.value.hint}")
    shard = tmp_path / "model.safetensors"
    shard.write_bytes((10).to_bytes(8, "little") + b"{not json}" + bytes(64))
    with pytest.raises(errors.HeaderNotJson) as corrupt:  # raised by the core, hinted by its class
        blob2gpu.load(str(shard))
    assert corrupt.value.hint == errors.InvalidHeader.remedy
    assert str(corrupt.value).endswith(f"; {errors.InvalidHeader.remedy}")
    # a raiser's own hint wins, and is said once however the message already ends
    said = errors.BlobNotFound("no such blob; look elsewhere", hint="look elsewhere")
    assert (said.hint, str(said)) == ("look elsewhere", "no such blob; look elsewhere")
    assert errors.LoadCancelled("closed").hint is None  # nothing to check: no hint


def test_weights_of_another_format_are_named_as_such(tmp_path):
    import numpy as np

    torch.save({"w": torch.zeros(4)}, tmp_path / "zip.pt")
    torch.save({"w": torch.zeros(4)}, tmp_path / "pickle.pt", _use_new_zipfile_serialization=False)
    np.save(tmp_path / "array.npy", np.zeros(4))
    said = {"zip.pt": "a zip archive", "pickle.pt": "a Python pickle", "array.npy": "a NumPy"}
    for name, what in said.items():
        with pytest.raises(errors.InvalidHeader) as info:
            blob2gpu.load(str(tmp_path / name))
        said_first = f"shard '{name}': the file is {what}"
        assert said_first in str(info.value) and "not safetensors" in str(info.value)
        assert info.value.hint.startswith("convert it to safetensors first")


def test_uri_mistakes_say_what_to_write_in_their_hint(monkeypatch):
    from blob2gpu.sources.azure.location import parse_blob_uri

    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME", raising=False)
    mistakes = {
        "az:///llama": "use az://CONTAINER/PREFIX",
        "az://models/llama": "set AZURE_STORAGE_ACCOUNT_NAME (or AZURE_STORAGE_CONNECTION_STRING)",
        "s3://bucket/llama": "give an Azure Blob URI (az://, https://, abfss://) or a local path",
    }
    for uri, hint in mistakes.items():
        with pytest.raises(errors.InvalidArgument) as info:
            if uri.startswith("az://"):
                parse_blob_uri(uri, {})
            else:
                blob2gpu.load(uri)
        assert info.value.hint == hint and str(info.value).endswith(f"; {hint}")


def test_a_tensor_in_two_shards_is_refused_not_taken_from_either(tmp_path):
    from safetensors.torch import save_file

    # A directory with two variants of one model (no index): which 'w' would a load return?
    save_file({"w": torch.zeros(4), "only.a": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    save_file({"w": torch.ones(4)}, str(tmp_path / "model.fp16.safetensors"))
    for device in ("cpu", "cuda"):
        with pytest.raises(errors.DuplicateTensor, match=r"tensor 'w' is in shard 'model\.") as e:
            blob2gpu.load(str(tmp_path), device=device, framework="dlpack")
        assert "model.safetensors" in str(e.value) and "model.fp16.safetensors" in str(e.value)
        assert e.value.hint.startswith("load one of the shards")
    with pytest.raises(errors.DuplicateTensor), blob2gpu.open(str(tmp_path)) as checkpoint:
        list(checkpoint)
    assert len(blob2gpu.load(str(tmp_path / "model.fp16.safetensors"))) == 1  # one of them
    with blob2gpu.open(str(tmp_path), tensor_names=["only.a"]) as checkpoint:  # 'w' not wanted
        assert list(dict(checkpoint)) == ["only.a"]


def test_empty_directory(tmp_path):
    with pytest.raises(errors.SourceUnavailable, match=r"no .safetensors"):
        blob2gpu.load(str(tmp_path))


def test_index_names_a_missing_shard(write_checkpoint):
    directory = three_shards(write_checkpoint)
    (directory / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(errors.SourceUnavailable, match=r"model-00002-of-00003.safetensors"):
        blob2gpu.load(str(directory))


def test_malformed_index(write_checkpoint):
    directory = three_shards(write_checkpoint)
    (directory / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(errors.InvalidIndex, match=r"not valid JSON"):
        blob2gpu.load(str(directory))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1]}))
    with pytest.raises(errors.InvalidIndex, match=r"weight_map"):
        blob2gpu.load(str(directory))


def test_index_disagreeing_with_shards(write_checkpoint):
    directory = three_shards(write_checkpoint)
    index = directory / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(errors.InvalidIndex, match=r"ghost.weight"):
        blob2gpu.load(str(directory))
    doc["weight_map"].pop("ghost.weight")
    doc["weight_map"]["s0.w"], doc["weight_map"]["s1.w"] = (
        doc["weight_map"]["s1.w"],
        doc["weight_map"]["s0.w"],
    )
    index.write_text(json.dumps(doc))
    with pytest.raises(errors.InvalidIndex, match=r"'s0.w' is in 'model-00001"):
        blob2gpu.load(str(directory))


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_bad_shard_mid_load_releases_everything(device, write_checkpoint, damage):
    directory = three_shards(write_checkpoint)
    victim = directory / "model-00002-of-00003.safetensors"
    raw = bytearray(victim.read_bytes())
    if damage == "header":
        raw[8:9] = b"["  # the JSON object now starts as an array
        expected = errors.InvalidHeader
    else:
        raw = raw[:-100]  # the data region is shorter than the header says
        expected = errors.InvalidOffsets
    victim.write_bytes(bytes(raw))
    gc.collect()
    before = _core.live_arena_count()
    with pytest.raises(expected, match=r"model-00002-of-00003.safetensors"):
        blob2gpu.load(str(directory), device=device, framework="dlpack")
    gc.collect()
    assert _core.live_arena_count() == before


def test_not_a_safetensors_file(tmp_path):
    bogus = tmp_path / "weights.safetensors"
    bogus.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
    with pytest.raises(errors.InvalidHeader, match=r"weights.safetensors"):
        blob2gpu.load(str(bogus))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"device": "tpu"}, errors.InvalidArgument, "'cpu', 'cuda', 'cuda:N'"),
        ({"framework": "jax"}, errors.InvalidArgument, "framework 'jax'"),
        ({"device": "cuda", "framework": "numpy"}, errors.InvalidArgument, "host memory"),
        ({"staging_slots": 1}, errors.ConfigError, "staging_slots"),
        ({"no_such_setting": 1}, errors.ConfigError, "unknown setting 'no_such_setting'"),
    ],
)
def test_bad_arguments(write_checkpoint, kwargs, error, match):
    directory = three_shards(write_checkpoint)
    with pytest.raises(error, match=match):
        blob2gpu.load(str(directory), **kwargs)


@pytest.mark.azure
def test_remote_uri_without_blob_source_says_so():
    with pytest.raises(errors.InvalidArgument, match=r"az://"):
        blob2gpu.load("az://models/llama")


def test_every_error_is_a_blob2gpu_error():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.Blob2GpuError)
    assert issubclass(errors.InvalidOffsets, errors.InvalidHeader)
    assert issubclass(errors.GPUOutOfMemory, MemoryError)


def test_one_load_at_a_time_per_loader(write_checkpoint):
    directory = three_shards(write_checkpoint)
    with blob2gpu.Loader() as loader:
        checkpoint = loader.open(str(directory))
        with pytest.raises(errors.InvalidArgument, match=r"already running a load"):
            loader.open(str(directory))
        checkpoint.close()
        assert len(loader.load(str(directory))) == 3


def test_closing_an_unfinished_load(device, write_checkpoint):
    directory = three_shards(write_checkpoint)
    gc.collect()
    before = _core.live_arena_count()
    checkpoint = blob2gpu.open(str(directory), device=device, framework="dlpack")
    checkpoint.close()
    with pytest.raises(errors.LoadCancelled):
        checkpoint.get("s2.w")
    gc.collect()
    assert _core.live_arena_count() == before


def test_a_directory_of_other_weight_formats_says_how_to_convert(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 64)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(errors.SourceUnavailable) as info:
        blob2gpu.load(str(tmp_path))
    message = str(info.value)
    assert "pytorch_model.bin" in message and "does not read" in message
    assert "safe_serialization=True" in message and "config.json" not in message


def test_a_blob_prefix_of_other_weight_formats_says_how_to_convert(azurite, container, blob_env):
    client = azurite.service().get_container_client(container)
    client.upload_blob("m/consolidated.00.pth", b"\0" * 64)
    with pytest.raises(errors.BlobNotFound, match=r"consolidated.00.pth.*does not read"):
        blob2gpu.load(f"az://{container}/m")


@pytest.mark.azure
def test_connection_refused_names_the_endpoint_without_retry_advice(monkeypatch, free_port):
    from blob2gpu.tools.emulator import ACCOUNT, ACCOUNT_KEY

    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{free_port}/{ACCOUNT};",
    )
    with pytest.raises(errors.StorageUnavailable) as info:
        blob2gpu.load("az://models/m", retry_max_attempts=2, retry_backoff_seconds=0.01)
    message = str(info.value)
    assert f"connection refused: nothing listens at 127.0.0.1:{free_port}" in message
    assert "retry_max_attempts" not in message and "throttl" not in message
    assert info.value.hint is not None and "endpoint" in info.value.hint
    assert "NewConnectionError" not in message  # the cause, said in words, not cut mid-word


def test_long_storage_messages_are_cut_at_a_word():
    from blob2gpu.sources.azure.failures import _one_line

    text = "word " * 100
    cut = _one_line(text)
    assert len(cut) <= 304 and cut.endswith(" ...") and "wor ..." not in cut


def sas_expiring(container: str, hours: float, key: str | None = None) -> str:
    """A container SAS (read, list) of Azurite's account whose expiry is `hours` from now,
    signed with `key` (default: the account's)."""
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas
    from blob2gpu.tools.emulator import ACCOUNT, ACCOUNT_KEY

    return generate_container_sas(
        ACCOUNT,
        container,
        account_key=key or ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=hours),
    )


@pytest.mark.parametrize("where", ["connection string", "AZURE_STORAGE_KEY", "argument"])
@pytest.mark.parametrize(
    ("key", "why"), [("Eby8vdM02xNOcq", "cut short"), ("Eby8-_x=", "alphabet")]
)
def test_an_account_key_that_is_not_base64_is_named_as_such(
    published, azurite, container, monkeypatch, where, key, why
):
    from blob2gpu.tools.emulator import ACCOUNT, ACCOUNT_KEY

    for var in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    credential = None
    if where == "connection string":
        monkeypatch.setenv(
            "AZURE_STORAGE_CONNECTION_STRING",
            azurite.connection_string().replace(ACCOUNT_KEY, key),
        )
        origin = "AZURE_STORAGE_CONNECTION_STRING (AccountKey)"
    elif where == "AZURE_STORAGE_KEY":
        monkeypatch.setenv("AZURE_STORAGE_KEY", key)
        origin = "AZURE_STORAGE_KEY"
    else:
        credential = {"account_name": ACCOUNT, "account_key": key}
        origin = "the credential argument (account_key)"
    with pytest.raises(errors.MalformedCredential) as info:
        blob2gpu.load(f"{azurite.endpoint()}/{container}/m", credential=credential)
    message = str(info.value)
    assert f"the account key in {origin} is not base64" in message and why in message
    assert key not in message and "no token" not in message
    assert info.value.hint is not None and "copy the key again" in info.value.hint


def test_an_sdk_key_credential_that_cannot_sign_is_named_as_such(published, azurite, container):
    from azure.core.credentials import AzureNamedKeyCredential
    from blob2gpu.tools.emulator import ACCOUNT

    # Handed over in the SDK's own object, the key is first used when the SDK signs a request.
    credential = AzureNamedKeyCredential(ACCOUNT, "Eby8vdM02xNOcq")
    with pytest.raises(errors.MalformedCredential) as info:
        blob2gpu.load(f"{azurite.endpoint()}/{container}/m", credential=credential)
    message = str(info.value)
    assert "could not be signed with the account key: it is malformed" in message
    assert "Eby8vdM02xNOcq" not in message and "no token" not in message


def test_an_account_key_with_a_trailing_newline_still_loads(published, azurite, container):
    from blob2gpu.tools.emulator import ACCOUNT, ACCOUNT_KEY

    # As the SDK signs with it (whitespace ignored), e.g. a key read from a mounted file.
    credential = {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY + "\n"}
    got = blob2gpu.load(f"{azurite.endpoint()}/{container}/m", credential=credential)
    assert len(got) == 9


@pytest.mark.parametrize("where", ["URI", "AZURE_STORAGE_SAS_TOKEN"])
def test_an_expired_sas_says_when_it_expired(published, azurite, container, monkeypatch, where):
    from urllib.parse import parse_qs

    for var in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    sas = sas_expiring(container, hours=-1)
    fields = parse_qs(sas)
    uri = f"{azurite.endpoint()}/{container}/m"
    if where == "URI":
        uri += f"?{sas}"
    else:
        monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", sas)
    with pytest.raises(errors.AccessDenied) as info:
        blob2gpu.load(uri)
    message = str(info.value)
    assert f"the SAS expired at {fields['se'][0]}" in message
    assert "se=" in (info.value.hint or "")
    assert fields["sig"][0] not in message and sas not in message
    # A SAS refused before its expiry (signed with another key) is not called expired.
    forged = sas_expiring(container, hours=1, key="A" * 86 + "==")
    with pytest.raises(errors.AccessDenied) as info:
        blob2gpu.load(f"{azurite.endpoint()}/{container}/m?{forged}")
    assert "expired" not in str(info.value)


def test_sas_expiry_forms():
    from datetime import datetime, timezone

    from blob2gpu.sources.azure.credentials import sas_expired, sas_expiry

    now = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
    assert sas_expiry("sv=2024-11-04&se=2025-06-01T11%3A59%3A00Z&sig=abc") == "2025-06-01T11:59:00Z"
    assert sas_expiry("?sv=2024-11-04&sig=abc") is None
    for past in ("2025-05-31", "2025-06-01T11:59Z", "2025-06-01T11:59:59.1234567Z"):
        assert sas_expired(past, now), past
    for future in ("2025-06-02", "2025-06-01T12:01:00Z", "2025-06-01T12:30:00-01:00"):
        assert not sas_expired(future, now), future
    assert sas_expired("2025-06-01T12:30:00+01:00", now)
    assert not sas_expired("next tuesday", now) and not sas_expired("2025-13-01", now)


def test_a_framework_not_installed_names_its_extra(write_checkpoint, monkeypatch):
    import sys

    # cupy made unimportable for this test, whether or not it is installed here.
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(errors.InvalidArgument, match=r"pip install 'blob2gpu\[cupy\]'"):
        blob2gpu.load(str(three_shards(write_checkpoint)), framework="cupy")
