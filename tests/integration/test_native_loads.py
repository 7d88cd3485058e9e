"""Blob loads read their ranges through the core's range reader (native_http, the default): the
feeder threads come back to Python once per range, never once per socket read, over HTTP and
HTTPS (native_http=false: through azure-storage-blob, once per read); a bearer token is asked
of its credential again when azure-core's bearer policy would; what the service says about a
failed signature reaches no log, message or exception with the signature in it."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from azure.core.credentials import AccessToken, AccessTokenInfo
from blob2gpu import errors
from blob2gpu.settings import resolve
from blob2gpu.sources.azure.container import open_container
from blob2gpu.sources.azure.location import parse_blob_uri
from blob2gpu.sources.azure.native_clients import NativeHttp, RangeClients
from blob2gpu.sources.azure.native_requests import RequestSigner, range_endpoint
from blob2gpu.sources.azure.range_reader import BlobRangeReader
from blob2gpu.sources.plan import ShardRef
from conftest import checkpoint_bytes as expected
from conftest import load_with_report, random_tensor, upload_directory
from support.azurite import ACCOUNT, ACCOUNT_KEY

KEY = {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Two shards of 1.5 MB: many socket reads each."""
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("ckpt")
    weight_map = {}
    for s in range(2):
        tensors = {f"s{s}.w{i}": random_tensor(torch.float32, (512, 256), s + i) for i in range(3)}
        name = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file(tensors, str(directory / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text("{}")
    (directory / "tokenizer").mkdir()  # a folder beside the shards: the listing leaves it out
    (directory / "tokenizer" / "vocab.txt").write_text("a b c")
    return directory


@pytest.fixture(params=["http", "https"])
def served(request, checkpoint, monkeypatch):
    """(the checkpoint's URI, with the emulator's key in the environment) over each scheme."""
    server = request.getfixturevalue("azurite" if request.param == "http" else "azurite_tls")
    client = server.service().get_container_client("native-loads")
    if not client.exists():
        client.create_container()
        upload_directory(server, "native-loads", checkpoint, "m")
    for var in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_KEY", ACCOUNT_KEY)
    if server.certificate:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", server.certificate)
    return f"{server.endpoint()}/native-loads/m"


def socket_reads_in_python(
    uri: str, feeders_only: bool = False, **settings: Any
) -> tuple[dict[str, bytes], int]:
    """Load `uri` to the CPU; returns (its tensors' bytes, how many times a thread of this
    process came back from a socket read, taking the GIL again: a profile hook counts the
    returns of the socket's recv / recv_into and the TLS socket's read). feeders_only: count
    the feeder threads' only (the ranges), not the listing's and the index's."""
    count = [0]

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "c_return" or getattr(arg, "__name__", "") not in ("recv_into", "read", "recv"):
            return
        if type(getattr(arg, "__self__", None)).__name__ not in ("socket", "_SSLSocket"):
            return
        if not feeders_only or threading.current_thread().name.startswith("blob2gpu-feeder"):
            count[0] += 1

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        got, _ = load_with_report(uri, "cpu", **settings)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    return got, count[0]


def test_a_loads_ranges_are_read_without_a_return_to_python_per_socket_read(checkpoint, served):
    got, reads = socket_reads_in_python(served, feeders_only=True, chunk_bytes=256 * 1024)
    assert got == expected(checkpoint)
    assert reads == 0
    # The Python path, kept behind the setting, reads the same bytes one socket read at a time.
    got, reads = socket_reads_in_python(
        served, feeders_only=True, chunk_bytes=256 * 1024, native_http=False
    )
    assert got == expected(checkpoint)
    assert reads > 0


def test_a_load_reads_its_listing_and_index_in_the_core_too(checkpoint, served):
    # The listing's pages and the index come back whole from the core, one return each: a
    # load in a busy process waits for no socket read of azure-storage-blob's.
    got, reads = socket_reads_in_python(served)
    assert got == expected(checkpoint)
    assert reads == 0
    got, reads = socket_reads_in_python(served, native_http=False)
    assert got == expected(checkpoint)
    assert reads > 0


@pytest.mark.parametrize("page_entries", [1000, 2])
def test_the_core_lists_what_the_sdk_lists(checkpoint, served, monkeypatch, page_entries):
    from blob2gpu.sources.azure import listing

    monkeypatch.setattr(listing, "LIST_PAGE_ENTRIES", page_entries)  # 2: several pages
    listed = {}
    for native in (True, False):
        settings = resolve({"native_http": native})
        with open_container(served, settings) as container:
            assert (container.native is not None) == native
            listed[native] = container.list_checkpoint()
    assert listed[True] == listed[False]
    names = sorted(a.name.rsplit("/", 1)[-1] for a in listed[True].aux_blobs)
    assert names == ["config.json", "model.safetensors.index.json"]
    assert listed[True].plan.weight_map is not None
    assert all(len(s.etag) > 2 and s.size > 0 for s in listed[True].plan.shards)


# -- bearer tokens ------------------------------------------------------------------------------
class _Credential:
    """A token credential handing out tokens of `lifetime` seconds from `clock`; `info`: it
    implements get_token_info (with `refresh_in`: a refresh_on that many seconds on) instead of
    get_token only, as azure-identity's do since azure-core 1.31."""

    def __init__(self, clock: list[float], lifetime: float, info: bool, refresh_in: float = 0):
        self.clock, self.lifetime, self.refresh_in = clock, lifetime, refresh_in
        self.asked = 0
        if info:
            self.get_token_info = self._info

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.asked += 1
        time.sleep(0.01)  # long enough for another thread to ask meanwhile
        return AccessToken(f"token-{self.asked}", int(self.clock[0] + self.lifetime))

    def _info(self, *scopes: str, **kwargs: Any) -> AccessTokenInfo:
        token = self.get_token(*scopes)
        refresh_on = int(self.clock[0] + self.refresh_in) if self.refresh_in else None
        return AccessTokenInfo(token.token, token.expires_on, refresh_on=refresh_on)


def _bearer(signer: RequestSigner) -> str:
    _, headers = signer.range_get("b", 0, 1, None)
    return dict(headers)["Authorization"]


@pytest.mark.parametrize("info", [False, True], ids=["get_token", "get_token_info"])
def test_a_bearer_token_is_renewed_five_minutes_before_it_expires(info):
    clock = [1_000_000.0]
    credential = _Credential(clock, lifetime=3600, info=info)
    where = parse_blob_uri("https://acct.blob.core.windows.net/c/m")
    signer = RequestSigner(where, credential, clock=lambda: clock[0])
    threads = [threading.Thread(target=_bearer, args=(signer,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert credential.asked == 1  # threads signing at once wait for the one asking
    clock[0] += 3600 - 301
    assert _bearer(signer) == "Bearer token-1"
    clock[0] += 2  # within 300 s of its expiry: a new one, as azure-core's policy would
    assert _bearer(signer) == "Bearer token-2" and credential.asked == 2


def test_a_bearer_token_is_renewed_at_its_refresh_on():
    clock = [1_000_000.0]
    credential = _Credential(clock, lifetime=24 * 3600, info=True, refresh_in=3600)
    where = parse_blob_uri("https://acct.blob.core.windows.net/c/m")
    signer = RequestSigner(where, credential, clock=lambda: clock[0])
    assert _bearer(signer) == "Bearer token-1"
    clock[0] += 3599
    assert _bearer(signer) == "Bearer token-1"
    clock[0] += 1
    assert _bearer(signer) == "Bearer token-2"


def test_a_bearer_token_never_goes_to_the_native_reader_over_plain_http():
    where = parse_blob_uri("http://127.0.0.1:10000/devstoreaccount1/c/m")
    endpoint = range_endpoint(where, {})
    signer = RequestSigner(where, _Credential([0.0], 3600, info=False), endpoint.base_path)
    with pytest.raises(errors.InvalidArgument, match="bearer token over plain HTTP"):
        NativeHttp(signer, RangeClients(endpoint, 1.0, 1.0, 1), owned=True)


# -- what a failed signature's answer may quote ---------------------------------------------------
class _Refusing(BaseHTTPRequestHandler):
    """Answers every GET as Azure answers a request whose Shared Key signature does not verify:
    403 AuthenticationFailed, its detail quoting the signature the request carried."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        signature = self.headers["Authorization"].rsplit(":", 1)[-1]
        self.server.signatures.append(signature)  # type: ignore[attr-defined]
        body = (
            '<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed</Code>'
            "<Message>Server failed to authenticate the request. Make sure the value of "
            "Authorization header is formed correctly including the signature.\nRequestId:1"
            "</Message><AuthenticationErrorDetail>The MAC signature found in the HTTP request "
            f"'{signature}' is not the same as any computed signature. Server used following "
            "string to sign: 'GET\n\n'.</AuthenticationErrorDetail></Error>"
        ).encode()
        self.send_response(403, "Server failed to authenticate the request.")
        self.send_header("x-ms-error-code", "AuthenticationFailed")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_an_authentication_failure_quoting_the_signature_leaks_it_nowhere(caplog):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    server.signatures = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}/{ACCOUNT}/c/m"
    caplog.set_level(logging.DEBUG)
    with open_container(uri, resolve(), KEY) as container:
        reader = BlobRangeReader(container)
        with pytest.raises(errors.AccessDenied) as info:
            reader.read_into(
                ShardRef("a", "m/a.safetensors", 100, '"0x1"'), 0, memoryview(bytearray(10))
            )
    server.shutdown()
    (signature,) = server.signatures  # not retried: a denial is permanent
    assert "the signature did not verify" in str(info.value)
    assert "MAC signature found in the HTTP request 'REDACTED'" in caplog.text  # it was logged
    texts = [str(info.value), repr(info.value), caplog.text]
    error: BaseException | None = info.value
    while error is not None:
        texts.append(repr(error.args))
        error = error.__cause__ or error.__context__
    assert not any(signature in text for text in texts)


# -- the listing and small blobs, read by the core -----------------------------------------------
ODD_PREFIX = "odd + name=!é %/"  # each character the query's encoding and Shared Key must agree on


def test_a_listing_under_an_odd_prefix_is_signed_and_paged_as_the_sdk_lists_it(
    checkpoint, served, monkeypatch
):
    from azure.storage.blob import ContainerClient
    from blob2gpu.sources.azure import listing

    uri = served.replace("/native-loads/m", "/native-loads-odd/" + ODD_PREFIX.rstrip("/"))
    server_uri = served.rsplit("/native-loads/", 1)[0]
    client = ContainerClient(server_uri, "native-loads-odd", credential=KEY)
    if not client.exists():
        client.create_container()
        for name in ("a.safetensors", "b.safetensors", "c.json"):
            client.upload_blob(ODD_PREFIX + name, b"{}", overwrite=True)
    monkeypatch.setattr(listing, "LIST_PAGE_ENTRIES", 1)  # a marker signed on every page
    listed = {}
    for native in (True, False):
        with open_container(uri, resolve({"native_http": native})) as container:
            listed[native] = container.list_checkpoint()
    assert listed[True] == listed[False]
    assert [s.name for s in listed[True].plan.shards] == ["a.safetensors", "b.safetensors"]


@pytest.mark.parametrize("native", [True, False], ids=["native", "sdk"])
def test_an_index_overwritten_after_listing_is_blob_changed(checkpoint, served, native):
    with open_container(served, resolve({"native_http": native})) as container:
        listed = container.list_checkpoint()
        index = next(a for a in listed.aux_blobs if a.name.endswith(".index.json"))
        blob = container.client.get_blob_client(index.name)
        original = blob.download_blob().readall()
        blob.upload_blob(original + b" ", overwrite=True)
        try:
            with pytest.raises(errors.BlobChanged, match="changed since it was listed"):
                container.read_small_blob(index.name, index.etag, index.size)
            with pytest.raises(errors.BlobChanged, match="changed since it was listed"):
                container.read_small_blob(index.name, None, index.size)  # by its size alone
        finally:
            blob.upload_blob(original, overwrite=True)


def test_a_garbled_listing_page_is_retried(monkeypatch):
    from blob2gpu.sources.azure.listing import list_checkpoint
    from support.scripted_server import ScriptedServer, answer

    page = (
        b"<EnumerationResults><Blobs><Blob><Name>m/a.safetensors</Name><Properties>"
        b"<Etag>0x1</Etag><Content-Length>8</Content-Length></Properties></Blob></Blobs>"
        b"<NextMarker/></EnumerationResults>"
    )
    garbled = page[: len(page) // 2]
    monkeypatch.setenv("AZURE_STORAGE_KEY", ACCOUNT_KEY)
    answers = [answer("200 OK", {"Content-Length": str(len(p))}, p) for p in (garbled, page)]
    with ScriptedServer(answers) as server:
        uri = f"http://127.0.0.1:{server.port}/{ACCOUNT}/c/m/a.safetensors"
        settings = resolve({"retry_backoff_seconds": 0.01})
        with open_container(uri, settings) as container:
            listed = list_checkpoint(container)
            assert [(s.path, s.size, s.etag) for s in listed.plan.shards] == [
                ("m/a.safetensors", 8, "0x1")
            ]
            assert container.retry.retries == 1


LOAD_IN_A_FRESH_INTERPRETER = """
import json, sys
import blob2gpu
started = []
sys.addaudithook(lambda event, args: started.append(event) if event in (
    "subprocess.Popen", "os.fork", "os.posix_spawn", "os.exec") else None)
with blob2gpu.open(sys.argv[1], device="cpu", framework="dlpack") as ck:
    n = len(ck.to_dict())
aux = sorted(p.rsplit("/", 1)[-1] for p in blob2gpu.fetch_aux(sys.argv[1], sys.argv[2]))
print(json.dumps({"tensors": n, "aux": aux, "started": started,
                  "modules": [m for m in sys.modules if m.startswith(("azure.", "requests"))]}))
"""


def test_a_load_imports_no_sdk_and_starts_no_process(checkpoint, served, monkeypatch, tmp_path):
    # The SDK's client is made on first use only: its import (hundreds of files) and its user
    # agent's platform probe (a `uname -p` subprocess) are no part of a load.
    import subprocess

    def fresh_load() -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        run = subprocess.run(
            [sys.executable, "-c", LOAD_IN_A_FRESH_INTERPRETER, served, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return dict(json.loads(run.stdout.strip().splitlines()[-1]))

    native = fresh_load()
    assert native["tensors"] == 6 and native["started"] == []
    assert native["aux"] == ["config.json", "model.safetensors.index.json"]
    assert [m for m in native["modules"] if m != "azure.storage"] == []
    monkeypatch.setenv("BLOB2GPU_NATIVE_HTTP", "0")
    sdk = fresh_load()
    assert sdk["tensors"] == 6 and "azure.storage.blob" in sdk["modules"]


@pytest.mark.parametrize("missing", ["azure.storage.blob", "azure.storage"])
def test_a_blob_uri_without_azure_storage_blob_is_invalid_argument(monkeypatch, missing):
    monkeypatch.delitem(sys.modules, "azure.storage.blob", raising=False)
    monkeypatch.setitem(sys.modules, missing, None)  # as if it (or its parent) were not there
    with pytest.raises(errors.InvalidArgument, match=r"pip install 'blob2gpu\[azure\]'"):
        open_container("az://c/m", resolve({}))


def test_the_sdks_client_is_made_on_first_use_with_the_sdks_failures_typed(served, monkeypatch):
    with open_container(served, resolve({})) as container:
        assert container._sdk_client is None  # a load never makes it
        with monkeypatch.context() as broken:
            broken.setitem(sys.modules, "azure.storage.blob", None)  # uninstalled since open
            with pytest.raises(errors.InvalidArgument, match=r"pip install 'blob2gpu\[azure\]'"):
                container.client  # noqa: B018
        assert container.client is container.client  # made once
    with pytest.raises(errors.InvalidArgument, match="is closed"):
        container.client  # noqa: B018  (a closed container makes no client it would leak)
    # A key without its account's name: the SDK takes the URI's account, as the signer does.
    key_only = {"account_key": ACCOUNT_KEY}
    with open_container(served, resolve({}), credential=key_only) as container:
        assert container.client.exists()
    with pytest.raises(errors.InvalidArgument, match="cannot use the credential"):
        open_container(served, resolve({"native_http": False}), credential=object())


@pytest.mark.parametrize("native", [True, False], ids=["native", "sdk"])
def test_an_aux_file_is_fetched_in_parts_byte_equal(
    checkpoint, served, monkeypatch, tmp_path, native
):
    from blob2gpu.sources.azure import container as container_module

    monkeypatch.setattr(container_module, "AUX_PART_BYTES", 7)  # several ranged GETs a file
    with open_container(served, resolve({"native_http": native})) as container:
        written = container.fetch_aux(tmp_path, verify="none")
    assert sorted(p.name for p in written) == ["config.json", "model.safetensors.index.json"]
    for path in written:
        assert path.read_bytes() == (checkpoint / path.name).read_bytes()
