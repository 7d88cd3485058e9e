"""Loading from Azure Blob Storage (a real Azurite over HTTP): every URI form and credential,
byte equality on cpu and cuda, the index checked against the listing, aux files, and typed
errors that carry no secret."""

from __future__ import annotations

import gc
import json
import os
import stat
from datetime import datetime, timedelta, timezone

import blob2gpu
import pytest
import torch
from blob2gpu import _core, errors
from conftest import as_bytes, random_tensor, reference_bytes, upload_directory
from conftest import checkpoint_bytes as expected
from conftest import load_with_report as load
from support.azurite import ACCOUNT, ACCOUNT_KEY
from support.connections import connections_to


def shards(count: int = 3, rows: int = 96):
    return [
        {
            f"s{s}.w{i}": random_tensor(torch.bfloat16, (rows, 160), seed=s * 10 + i)
            for i in range(3)
        }
        | {f"s{s}.norm": random_tensor(torch.float32, (7,), s)}
        for s in range(count)
    ]


@pytest.fixture
def published(write_checkpoint, azurite, container):
    """A 3-shard checkpoint with index and aux files, uploaded under `llama/`."""
    directory = write_checkpoint(shards())
    (directory / "config.json").write_text(json.dumps({"hidden_size": 160}))
    (directory / "tokenizer.json").write_text("{}")
    upload_directory(azurite, container, directory, "llama")
    return directory


def test_round_trip_prefix_with_index(device, published, container, blob_env):
    got, report = load(f"az://{container}/llama", device)
    assert got == expected(published)
    assert report.source == "azure-blob" and report.tensors == 12 and len(report.shards) == 3
    assert report.credential == "account key from AZURE_STORAGE_CONNECTION_STRING"
    assert report.bytes == sum(f.stat().st_size for f in published.glob("*.safetensors"))
    assert report.retries == 0


@pytest.mark.parametrize("chunk", [4096, 65536])
def test_small_ranges_and_headers_longer_than_the_first_range(
    device, write_checkpoint, azurite, container, blob_env, chunk
):
    tensors = {
        f"layer.{i}.quite_a_long_parameter_name": random_tensor(torch.float16, (33,), i)
        for i in range(200)
    }  # header ~ 16 KB
    directory = write_checkpoint([tensors, {"big": random_tensor(torch.float32, (300, 100))}])
    upload_directory(azurite, container, directory, "m")
    settings = {"chunk_bytes": chunk}
    if device != "cpu":
        settings |= {"staging_slot_bytes": chunk, "staging_slots": 3}
    got, report = load(f"az://{container}/m", device, **settings)
    assert got == expected(directory)
    total = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    assert report.requests >= total // chunk // 2  # many ranges (a long header is one range)


def test_index_uri_single_blob_and_prefix_without_index(published, azurite, container, blob_env):
    ref = expected(published)
    got, _ = load(f"az://{container}/llama/model.safetensors.index.json", "cpu")
    assert got == ref
    got, _ = load(f"az://{container}/llama/model-00002-of-00003.safetensors", "cpu")
    assert got == reference_bytes(published / "model-00002-of-00003.safetensors")
    azurite.service().get_container_client(container).delete_blob(
        "llama/model.safetensors.index.json"
    )
    got, _ = load(f"az://{container}/llama/", "cpu")
    assert got == ref


def test_path_style_url_with_account_key_from_environment(
    published, azurite, container, monkeypatch
):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.setenv("AZURE_STORAGE_KEY", ACCOUNT_KEY)
    got, report = load(f"{azurite.endpoint()}/{container}/llama", "cpu")
    assert got == expected(published)
    assert report.credential == "account key from AZURE_STORAGE_KEY"


def sas_for(container: str, protocol: str | None = None, **permissions) -> str:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    return generate_container_sas(
        ACCOUNT,
        container,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(**(permissions or {"read": True, "list": True})),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
        protocol=protocol,
    )


def test_sas_in_the_url(published, azurite, container, monkeypatch):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    sas = sas_for(container)
    got, report = load(f"{azurite.endpoint()}/{container}/llama?{sas}", "cpu")
    assert got == expected(published)
    assert report.credential == "SAS in the URI"
    assert "sig=" not in report.to_json() and sas not in report.to_json()


def test_names_with_spaces_and_unicode_in_every_uri_form_and_folders_below_are_not_shards(
    write_checkpoint, azurite, container, blob_env, tmp_path
):
    directory = write_checkpoint(shards(2))
    upload_directory(azurite, container, directory, "my runs/llamä 7b")
    # Another checkpoint in a folder below, and one beside with the same leading characters.
    for name, prefix in [("below", "my runs/llamä 7b/step-5"), ("beside", "my runs/llamä 7b-old")]:
        upload_directory(azurite, container, write_checkpoint(shards(1), name=name), prefix)
    # As a hierarchical-namespace account lists a folder: an empty blob named like it.
    azurite.service().get_container_client(container).upload_blob("my runs/llamä 7b/step-5", b"")
    ref = expected(directory)
    got, report = load(f"az://{container}/my runs/llamä 7b", "cpu")
    assert got == ref and len(report.shards) == 2
    aux = blob2gpu.fetch_aux(f"az://{container}/my runs/llamä 7b", str(tmp_path / "aux"))
    assert [p.rsplit("/", 1)[-1] for p in aux] == ["model.safetensors.index.json"]
    encoded = f"{azurite.endpoint()}/{container}/my%20runs/llam%C3%A4%207b"
    got, _ = load(encoded, "cpu")
    assert got == ref
    got, _ = load(f"{encoded}/model.safetensors.index.json", "cpu")
    assert got == ref


def test_explicit_credential_argument(published, azurite, container, monkeypatch):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    got = blob2gpu.load(
        f"{azurite.endpoint()}/{container}/llama",
        framework="dlpack",
        credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY},
    )
    assert len(got) == 12


def test_wrong_key_is_access_denied_without_the_key(published, azurite, container, monkeypatch):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    wrong = "A" * 86 + "=="
    monkeypatch.setenv("AZURE_STORAGE_KEY", wrong)
    with pytest.raises(errors.AccessDenied) as info:
        blob2gpu.load(f"{azurite.endpoint()}/{container}/llama")
    message = str(info.value)
    assert container in message and ACCOUNT in message
    assert wrong not in message and ACCOUNT_KEY not in message
    # The service's error code as it names it (the SDK hands some over as an enum member).
    assert "HTTP 403 AuthorizationFailure" in message and "StorageErrorCode" not in message


def test_sas_without_list_permission_is_denied_without_the_signature(
    published, azurite, container, monkeypatch
):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    sas = sas_for(container, read=True)
    signature = dict(p.split("=", 1) for p in sas.split("&"))["sig"]
    with pytest.raises(
        errors.AccessDenied,
        match=r"AuthorizationPermissionMismatch: the "
        r"credential lacks a permission\); check that a SAS grants read and list "
        r"\(sp=rl\)",
    ) as info:
        blob2gpu.load(f"{azurite.endpoint()}/{container}/llama?{sas}")
    assert signature not in str(info.value)


def test_an_https_only_sas_over_http_says_to_use_https(published, azurite, container, monkeypatch):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    sas = sas_for(container, protocol="https")
    with pytest.raises(
        errors.AccessDenied,
        match=r"HTTPS only \(spr=https\)\); check the "
        r"endpoint: use https://",
    ):
        blob2gpu.load(f"{azurite.endpoint()}/{container}/llama?{sas}")


def test_missing_blob_container_and_shard(published, azurite, container, blob_env):
    with pytest.raises(errors.BlobNotFound, match=r"nothere\.safetensors"):
        blob2gpu.load(f"az://{container}/llama/nothere.safetensors")
    with pytest.raises(errors.BlobNotFound, match=r"container 'nosuchcontainer'") as info:
        blob2gpu.load("az://nosuchcontainer/llama")
    assert info.value.hint == errors.BlobNotFound.remedy and "case-sensitive" in info.value.hint
    assert str(info.value).count("container 'nosuchcontainer'") == 1  # named once
    with pytest.raises(errors.BlobNotFound, match=r"no .safetensors blobs"):
        blob2gpu.load(f"az://{container}/empty-prefix")
    with pytest.raises(errors.InvalidArgument, match=r"pytorch_model.bin' .* is not safetensors"):
        blob2gpu.load(f"az://{container}/llama/pytorch_model.bin")  # not a folder named so
    azurite.service().get_container_client(container).delete_blob(
        "llama/model-00003-of-00003.safetensors"
    )
    with pytest.raises(errors.SourceUnavailable, match=r"model-00003-of-00003.safetensors"):
        blob2gpu.load(f"az://{container}/llama")


def test_a_loaders_later_loads_reuse_its_connections_and_close_closes_them(
    published, azurite, container, blob_env, tmp_path
):
    uri = f"az://{container}/llama"
    others = connections_to(azurite.port)  # the fixtures' own clients
    # One connection at a time, so that both loads need the same number of connections (with
    # more, how many run at once varies from load to load).
    with blob2gpu.Loader(chunk_bytes=16384, prefetch_concurrency=1) as loader:
        with loader.open(uri) as ck:
            first = {n: as_bytes(t) for n, t in ck.to_dict().items()}
        kept = connections_to(azurite.port) - others
        # Idle, ready for the next load: the core's, which the listing, the index and the
        # ranges share (azure-storage-blob opens none: native_http is on by default).
        assert len(kept) == 1
        with loader.open(uri) as ck:
            assert {n: as_bytes(t) for n, t in ck.to_dict().items()} == first
        assert connections_to(azurite.port) - others == kept  # no new connection or handshake
    assert connections_to(azurite.port) - others == set()
    # One-shot calls leave no connection behind either, without waiting for the garbage
    # collector.
    gc.disable()
    try:
        blob2gpu.load(uri)
        blob2gpu.fetch_aux(uri, str(tmp_path / "aux"))
        assert connections_to(azurite.port) - others == set()
    finally:
        gc.enable()


def test_kept_connections_the_server_closed_meanwhile_are_replaced_without_retries(
    published, azurite, container, blob_env
):
    # A serving process loads its next model minutes later; the server (Azurite after 5 s idle,
    # Azure's front ends after minutes) has closed the kept connections by then.
    import time

    uri = f"az://{container}/llama"
    with blob2gpu.Loader(chunk_bytes=16384) as loader:
        with loader.open(uri) as ck:
            first = {n: as_bytes(t) for n, t in ck.to_dict().items()}
        kept = connections_to(azurite.port)
        deadline = time.monotonic() + 30
        while connections_to(azurite.port) & kept and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not connections_to(azurite.port) & kept  # closed by the server
        with loader.open(uri) as ck:
            assert {n: as_bytes(t) for n, t in ck.to_dict().items()} == first
            assert ck.report.retries == 0


def test_cuda_setup_overlaps_listing_and_is_released_when_listing_fails(
    fake_driver, published, container, blob_env
):
    # The device's pipeline (context, pinned ring, streams) is made on a thread while the blobs
    # are listed. A listing that fails leaves it to the Loader: the next load uses it, close()
    # releases it.
    host_before = fake_driver.live_host_allocations()
    with blob2gpu.Loader() as loader:
        with pytest.raises(errors.BlobNotFound, match="nosuchcontainer"):
            loader.open("az://nosuchcontainer/llama", device="cuda", framework="dlpack")
        with loader.open(f"az://{container}/llama", device="cuda", framework="dlpack") as ck:
            got = {n: v.to_bytes() for n, v in ck.to_dict().items()}
    assert got == expected(published)
    assert fake_driver.live_host_allocations() == host_before
    assert fake_driver.live_streams() == 0


def test_a_pipeline_that_cannot_be_made_fails_the_load_that_waited_for_it(
    fake_driver, published, container, blob_env
):
    fake_driver.fail_host_alloc_after(0)  # the staging ring cannot be pinned
    with blob2gpu.Loader(use_pinned_host_fallback=False) as loader:
        with pytest.raises(errors.PinnedMemoryUnavailable):
            loader.open(f"az://{container}/llama", device="cuda", framework="dlpack")
        fake_driver.reset_faults()
        got, _ = load(f"az://{container}/llama", "cuda")  # a fresh Loader
        with loader.open(f"az://{container}/llama", device="cuda", framework="dlpack") as ck:
            assert {n: v.to_bytes() for n, v in ck.to_dict().items()} == got  # made again


def test_malformed_header_in_blob_releases_everything(
    device, write_checkpoint, azurite, container, blob_env
):
    directory = write_checkpoint(shards())
    victim = directory / "model-00002-of-00003.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[8:9] = b"["
    victim.write_bytes(bytes(raw))
    upload_directory(azurite, container, directory, "bad")
    gc.collect()
    before = _core.live_arena_count()
    with pytest.raises(errors.InvalidHeader, match=r"model-00002-of-00003.safetensors"):
        blob2gpu.load(f"az://{container}/bad", device=device, framework="dlpack")
    gc.collect()
    assert _core.live_arena_count() == before


def test_fetch_aux_downloads_the_other_files_not_other_weight_formats(
    published, azurite, container, blob_env, tmp_path
):
    client = azurite.service().get_container_client(container)
    for name in ("pytorch_model.bin", "consolidated.00.pth", "model.gguf"):
        client.upload_blob(f"llama/{name}", b"\0" * 4096)
    paths = blob2gpu.fetch_aux(f"az://{container}/llama", str(tmp_path / "aux"))
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["config.json", "model.safetensors.index.json", "tokenizer.json"]
    assert sorted(p.name for p in (tmp_path / "aux").iterdir()) == names  # no temporary files
    assert json.loads((tmp_path / "aux" / "config.json").read_text()) == {"hidden_size": 160}


def test_fetched_files_get_the_mode_the_umask_gives(
    published, azurite, container, blob_env, tmp_path
):
    # An init container fetches as one user, the server reads as another: the files are made
    # as any new file (0666 less the umask), not private to the fetching user.
    previous = os.umask(0o022)
    try:
        paths = blob2gpu.fetch_aux(f"az://{container}/llama", str(tmp_path / "aux"))
    finally:
        os.umask(previous)
    assert paths and {stat.S_IMODE(os.stat(p).st_mode) for p in paths} == {0o644}


def test_fetch_aux_checks_files_against_the_manifest(
    published, azurite, container, blob_env, tmp_path
):
    from blob2gpu.integrity.publish import publish

    uri = f"az://{container}/signed"
    with pytest.raises(errors.ManifestMissing, match="blob2gpu.manifest.json"):
        blob2gpu.fetch_aux(uri.replace("signed", "llama"), str(tmp_path / "a"), verify="crc32c")
    publish(published, uri)
    paths = blob2gpu.fetch_aux(uri, str(tmp_path / "ok"), verify="crc32c")
    config = (published / "config.json").read_bytes()
    assert (tmp_path / "ok" / "config.json").read_bytes() == config
    assert len(paths) == 4  # with the manifest itself
    tampered = json.dumps({"hidden_size": 161}).encode()
    client = azurite.service().get_container_client(container)
    client.upload_blob("signed/config.json", tampered, overwrite=True)
    with pytest.raises(errors.ChecksumMismatch, match="config.json.*the manifest says"):
        blob2gpu.fetch_aux(uri, str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "config.json").exists()
    assert [p.name for p in (tmp_path / "bad").iterdir() if p.name.startswith(".")] == []
    paths = blob2gpu.fetch_aux(uri, str(tmp_path / "unchecked"), verify="none")
    assert (tmp_path / "unchecked" / "config.json").read_bytes() == tampered


def test_fetch_aux_never_writes_a_file_that_changed_after_listing(
    published, azurite, container, fault_proxy, monkeypatch, tmp_path
):
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    client = azurite.service().get_container_client(container)

    def overwrite_first(path, count):
        if count == 1:
            client.upload_blob("llama/config.json", b'{"hidden_size": 1}', overwrite=True)

    fault_proxy.faults.on_range_get = overwrite_first
    with pytest.raises(errors.BlobChanged, match="config.json.*changed since it was listed"):
        blob2gpu.fetch_aux(f"az://{container}/llama", str(tmp_path / "aux"))
    assert list((tmp_path / "aux").iterdir()) == []


def test_archived_shards_are_refused_before_any_memory_is_taken(
    fake_driver, published, azurite, container, fault_proxy, monkeypatch, tmp_path
):
    # A lifecycle policy moved a shard to the Archive tier: the service refuses its bytes for
    # hours, so the load says so at listing, naming it, with nothing allocated or fetched.
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    client = azurite.service().get_container_client(container)
    client.get_blob_client("llama/model-00002-of-00003.safetensors").set_standard_blob_tier(
        "Archive"
    )
    fault_proxy.counters.paths.clear()
    with pytest.raises(
        errors.BlobArchived,
        match=r"'llama/model-00002-of-00003.safetensors'.*"
        r"Archive access tier.*rehydrate",
    ) as info:
        blob2gpu.load(f"az://{container}/llama", device="cuda", framework="dlpack")
    assert "model-00001" not in str(info.value)
    assert not [p for p in fault_proxy.counters.paths if p.endswith(".safetensors")]
    assert fake_driver.live_device_allocations() == 0
    # The other files are still there to fetch; an archived one among them is refused before
    # anything is written.
    assert len(blob2gpu.fetch_aux(f"az://{container}/llama", str(tmp_path / "aux"))) == 3
    client.get_blob_client("llama/tokenizer.json").set_standard_blob_tier("Archive")
    with pytest.raises(errors.BlobArchived, match=r"'llama/tokenizer.json'"):
        blob2gpu.fetch_aux(f"az://{container}/llama", str(tmp_path / "aux2"))
    assert not (tmp_path / "aux2").exists()


def test_a_shard_archived_during_the_load_is_a_typed_error_not_a_retry(
    device, published, azurite, container, fault_proxy, monkeypatch
):
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    client = azurite.service().get_container_client(container)
    victim = "llama/model-00003-of-00003.safetensors"

    def archive_once(path, count):
        if count == 1:
            client.get_blob_client(victim).set_standard_blob_tier("Archive")

    fault_proxy.faults.on_range_get = archive_once
    gc.collect()
    before = _core.live_arena_count()
    with pytest.raises(errors.BlobArchived, match=rf"'{victim}'.*Archive access tier") as info:
        blob2gpu.load(f"az://{container}/llama", device=device, framework="dlpack")
    # The service's XML error body stays out of the message.
    assert "<?xml" not in str(info.value) and "Content:" not in str(info.value)
    assert fault_proxy.counters.paths.count(f"/{ACCOUNT}/{container}/{victim}") == 1
    gc.collect()
    assert _core.live_arena_count() == before


def test_archived_reason_of_listed_blobs():
    from blob2gpu.sources.azure.failures import archived_reason

    assert archived_reason(None, None) is None
    for tier in ("Hot", "Cool", "Cold"):
        assert archived_reason(tier, None) is None
    assert archived_reason("Archive", None) == "in the Archive tier"
    # A blob stays in the Archive tier until it is rehydrated.
    assert (
        archived_reason("Archive", "rehydrate-pending-to-hot")
        == "being rehydrated (rehydrate-pending-to-hot)"
    )


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("az:///prefix", "names no container"),
        ("http://127.0.0.1:1/onlyaccount", "ACCOUNT/CONTAINER"),
        ("https://a.blob.core.windows.net/c/m.safetensors?versionid=2024-01-01", "version"),
        ("https://a.blob.core.windows.net/c/m.safetensors?snapshot=2024&sig=s", "snapshot"),
        ("https://a.blob.core.windows.net/c/m?sv=2020&sp=r", "not a SAS token"),
        ("abfss://acct.dfs.core.windows.net/llama", "CONTAINER@ACCOUNT"),
        ("abfss://models@127.0.0.1:10000/llama", "CONTAINER@ACCOUNT"),
        ("s3://bucket/llama", "not a source blob2gpu reads"),
    ],
)
def test_bad_blob_uris(uri, match, blob_env):
    with pytest.raises(errors.InvalidArgument, match=match):
        blob2gpu.load(uri)


def test_az_uri_needs_an_account(monkeypatch):
    for var in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(errors.InvalidArgument, match=r"AZURE_STORAGE_ACCOUNT_NAME"):
        blob2gpu.load("az://models/llama")


def test_bearer_tokens_never_cross_plain_http():
    from blob2gpu.sources.azure.credentials import resolve_credential
    from blob2gpu.sources.azure.location import parse_blob_uri

    class Token:
        def get_token(self, *scopes, **kwargs):  # pragma: no cover - never called
            raise AssertionError

    for url in (
        "http://storage.example.com/models/llama",
        "http://127.0.0.1:10000/devstoreaccount1/models/llama",
    ):
        with pytest.raises(errors.InvalidArgument, match=r"plain HTTP"):
            resolve_credential(parse_blob_uri(url), Token())
    https = parse_blob_uri("https://acct.blob.core.windows.net/models/llama")
    assert resolve_credential(https, Token())[1] == "explicit credential"


def test_default_azure_credential_is_made_once_per_process_and_needs_https():
    from azure.identity import DefaultAzureCredential
    from blob2gpu.sources.azure.credentials import resolve_credential
    from blob2gpu.sources.azure.location import parse_blob_uri

    https = parse_blob_uri("https://acct.blob.core.windows.net/models/llama")
    first, how = resolve_credential(https, environ={})
    second, _ = resolve_credential(https, environ={})
    assert isinstance(first, DefaultAzureCredential) and first is second
    assert how == "DefaultAzureCredential (azure-identity)"
    local = parse_blob_uri("http://127.0.0.1:10000/devstoreaccount1/models/llama")
    with pytest.raises(errors.InvalidArgument, match=r"DefaultAzureCredential.*plain HTTP"):
        resolve_credential(local, environ={})


def test_a_load_without_any_credential_says_so(published, azurite, container, monkeypatch):
    from blob2gpu.sources.azure import credentials
    from blob2gpu.sources.azure.failures import NO_CREDENTIAL

    for var in ("CONNECTION_STRING", "KEY", "SAS_TOKEN", "ACCOUNT_NAME"):
        monkeypatch.delenv(f"AZURE_STORAGE_{var}", raising=False)
    monkeypatch.setattr(credentials, "default_azure_credential", lambda: None)  # no identity
    for native_http in (True, False):
        with pytest.raises(errors.SourceUnavailable) as info:
            blob2gpu.load(f"{azurite.endpoint()}/{container}/llama", native_http=native_http)
        assert info.value.hint is not None and NO_CREDENTIAL in info.value.hint
        if isinstance(info.value, errors.AccessDenied):  # Azurite: 403; Azure may say 404
            assert "no credential was found: the request went unsigned" in str(info.value)


@pytest.mark.parametrize(
    ("uri", "account_url", "container", "path"),
    [
        (
            "https://acct.blob.core.windows.net/models/llama/v1?sv=x&sig=y",
            "https://acct.blob.core.windows.net",
            "models",
            "llama/v1",
        ),
        (
            "http://127.0.0.1:10000/devstoreaccount1/models/a.safetensors",
            "http://127.0.0.1:10000/devstoreaccount1",
            "models",
            "a.safetensors",
        ),
        ("http://localhost:9/acct/c", "http://localhost:9/acct", "c", ""),
        (
            "https://acct.blob.core.windows.net/models/my%20runs/llam%C3%A4?sig=y",
            "https://acct.blob.core.windows.net",
            "models",
            "my runs/llamä",
        ),
        # Data Lake Storage (hierarchical namespace) names, read through the blob endpoint.
        (
            "abfss://models@acct.dfs.core.windows.net/llama/v1/",
            "https://acct.blob.core.windows.net",
            "models",
            "llama/v1",
        ),
        (
            "abfs://models@acct.dfs.core.chinacloudapi.cn/my%20runs/a.safetensors",
            "https://acct.blob.core.chinacloudapi.cn",
            "models",
            "my runs/a.safetensors",
        ),
        (
            "wasbs://models@acct.blob.core.windows.net/llama",
            "https://acct.blob.core.windows.net",
            "models",
            "llama",
        ),
        (
            "https://acct.dfs.core.windows.net/models/llama?sp=r&sig=y",
            "https://acct.blob.core.windows.net",
            "models",
            "llama",
        ),
    ],
)
def test_uri_forms(uri, account_url, container, path):
    from blob2gpu.sources.azure.location import parse_blob_uri

    loc = parse_blob_uri(uri)
    assert (loc.account_url, loc.container, loc.path) == (account_url, container, path)
    assert "sig" not in loc.account_url


_DEVELOPMENT_STORAGE_LOAD = """
import hashlib, json, os, sys
from pathlib import Path
import blob2gpu, torch
from blob2gpu.tools.emulator import Azurite
with Azurite(port=10000) as server:
    server.upload_directory("dev", Path(sys.argv[1]), "m")
    os.environ["AZURE_STORAGE_CONNECTION_STRING"] = "UseDevelopmentStorage=true"
    with blob2gpu.open("az://dev/m", device="cpu") as ck:
        got = {n: hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
               for n, t in ck.to_dict().items()}
        report = ck.report
print(json.dumps({"got": got, "uri": report.uri, "credential": report.credential}))
"""


def test_use_development_storage_connection_string(write_checkpoint, monkeypatch):
    # The emulator shortcut every Azure SDK accepts: the development account on port 10000. The
    # load runs in a network namespace of its own, where that port is always free.
    import hashlib
    import sys

    from blob2gpu.sources.azure.location import parse_blob_uri
    from support.namespaces import run_in_private_network

    directory = write_checkpoint(shards(2))
    done = run_in_private_network(
        [sys.executable, "-c", _DEVELOPMENT_STORAGE_LOAD, str(directory)],
        env={k: v for k, v in os.environ.items() if k != "AZURE_STORAGE_CONNECTION_STRING"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    want = {n: hashlib.sha256(b).hexdigest() for n, b in expected(directory).items()}
    assert result["got"] == want
    assert result["uri"] == f"http://127.0.0.1:10000/{ACCOUNT}/dev/m"
    assert result["credential"] == "account key from AZURE_STORAGE_CONNECTION_STRING"
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        "UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://azurite.local",
    )
    assert parse_blob_uri("az://dev/m").account_url == f"http://azurite.local:10000/{ACCOUNT}"


def test_redaction():
    from blob2gpu.redaction import redact

    text = (
        "GET https://a.blob.core.windows.net/c/b?sv=2020&sig=SECRET%2B&se=2030 "
        "AccountKey=KEYKEY==; Authorization: Bearer eyJhbGciOi.x.y "
        "via http://user:PROXYPW@proxy:3128 Proxy-Authorization: Basic dXNlcjpQUk9YWVBX"
    )
    out = redact(text)
    assert "SECRET" not in out and "KEYKEY" not in out and "eyJhbGciOi" not in out
    assert "PROXYPW" not in out and "dXNlcjpQUk9YWVBX" not in out and "@proxy:3128" in out
