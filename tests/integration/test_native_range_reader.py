"""The core's native range reader (_core.RangeClient) against a real Azurite, over HTTP and
HTTPS: ranged GETs signed by Python (Shared Key, SAS, bearer token) land byte-equal in the
caller's memory, and every way a request can fail comes back typed (a FetchFailure kind or an
HTTP status with the service's error code), never as a message to read.

The fault proxy and forward proxy run as Python threads of this process, so every test that
reads through them also shows get_into() releases the GIL: holding it, the proxy could not
forward a byte and the read would time out."""

from __future__ import annotations

import datetime
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from blob2gpu import _core, errors
from blob2gpu.sources.azure import failures
from blob2gpu.sources.azure.location import BlobLocation, parse_blob_uri
from blob2gpu.sources.azure.native_requests import (
    RangeEndpoint,
    RangeHttpError,
    RangeMismatch,
    RequestSigner,
    range_endpoint,
    range_failure,
)
from blob2gpu.sources.azure.retry import retry_after
from blob2gpu.sources.feeding import RangeTask, feed_range
from conftest import random_tensor, reference_bytes
from support.azurite import ACCOUNT, ACCOUNT_KEY, Azurite
from support.forward_proxy import ForwardProxy
from support.scripted_server import ScriptedServer, answer

F = _core.FetchFailure
KEY = {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY}
CONTAINER = "native"
BLOB = "dir/shard one.bin"  # a space and a slash: the path is percent-encoded and signed as sent
SIZE = 3 * 1024 * 1024 + 123


def _publish(server: Azurite) -> tuple[bytes, str]:
    """The test blob in `server` (made once per server): its bytes and etag."""
    data = random_tensor(torch.uint8, (SIZE,), seed=7).numpy().tobytes()
    client = server.service().get_container_client(CONTAINER)
    if not client.exists():
        client.create_container()
    etag = client.get_blob_client(BLOB).upload_blob(data, overwrite=True)["etag"]
    return data, etag


@pytest.fixture(scope="module")
def blob_http(azurite: Azurite) -> tuple[bytes, str]:
    return _publish(azurite)


@pytest.fixture(scope="module")
def blob_https(azurite_tls: Azurite) -> tuple[bytes, str]:
    return _publish(azurite_tls)


@pytest.fixture(params=["http", "https"])
def served(request, azurite, azurite_tls) -> Iterator[tuple[Azurite, bytes, str]]:
    """(Azurite, the blob's bytes, its etag) over each scheme."""
    server = azurite if request.param == "http" else azurite_tls
    data, etag = request.getfixturevalue(f"blob_{request.param}")
    yield server, data, etag


def location(server: Azurite, port: int | None = None) -> BlobLocation:
    return parse_blob_uri(f"{server.endpoint(port)}/{CONTAINER}/{BLOB}")


def open_client(
    server: Azurite, port: int | None = None, trusted: bool = True, **options: object
) -> tuple[_core.RangeClient, RangeEndpoint]:
    """A RangeClient for `server` (through `port` when given: a proxy in front), trusting its
    certificate unless `trusted` is False; no proxy from this machine's environment."""
    env = {"REQUESTS_CA_BUNDLE": server.certificate} if server.certificate and trusted else {}
    endpoint = range_endpoint(location(server, port), env)
    kwargs = {**endpoint.client_options(), "read_timeout": 30.0, **options}
    return _core.RangeClient(**kwargs), endpoint


def signed(server: Azurite, credential: object, endpoint: RangeEndpoint) -> RequestSigner:
    return RequestSigner(location(server), credential, endpoint.base_path)


def get(
    client: _core.RangeClient,
    signer: RequestSigner,
    start: int,
    end: int,
    etag: str | None,
    blob: str = BLOB,
) -> tuple[_core.RangeResult, bytearray]:
    target, headers = signer.range_get(blob, start, end, etag)
    buffer = bytearray(end - start)
    return client.get_into(target, headers, buffer, first_byte=start), buffer


# -- bytes --------------------------------------------------------------------------------------
def test_shared_key_ranges_land_byte_equal_on_one_kept_alive_connection(served):
    server, data, etag = served
    client, endpoint = open_client(server)
    signer = signed(server, KEY, endpoint)
    for start, end in [(0, 1), (0, 65536), (1000, 1_300_000), (SIZE - 17, SIZE), (0, SIZE)]:
        result, buffer = get(client, signer, start, end, etag)
        assert result.ok, (result, result.detail)
        assert result.failure == F.NONE and result.status == 206
        assert bytes(buffer) == data[start:end]
        assert result.bytes_received == end - start == result.content_length
        assert result.total_size == SIZE and result.header("ETag") == etag
        assert result.first_byte_ns > 0 and result.total_ns >= result.first_byte_ns
    assert client.connections_opened == 1 and client.requests == 5
    assert client.idle_connections == 1
    if server.certificate:
        assert "OpenSSL" in client.tls_library


def test_sas_ranges_land_byte_equal(served):
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    server, data, etag = served
    sas = generate_container_sas(
        ACCOUNT,
        CONTAINER,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True),
        expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1),
    )
    client, endpoint = open_client(server)
    signer = signed(server, sas, endpoint)
    target, headers = signer.range_get(BLOB, 5, 5000, etag)
    assert "sig=" in target and not any(name == "Authorization" for name, _ in headers)
    buffer = bytearray(4995)
    result = client.get_into(target, headers, buffer, first_byte=5)
    assert result.ok and bytes(buffer) == data[5:5000]


def test_bearer_token_over_https(azurite_tls, blob_https):
    import base64
    import json

    from azure.core.credentials import AccessToken

    def part(doc: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {
        "aud": "https://storage.azure.com",
        "iss": "https://sts.windows.net/72f988bf-0000-0000-0000-000000000000/",
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + 3600,
    }
    token = f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.c2ln"
    asked: list[str] = []

    class Token:
        def get_token(self, *scopes: str) -> AccessToken:
            asked.extend(scopes)
            return AccessToken(token, now + 3600)

    data, etag = blob_https
    client, endpoint = open_client(azurite_tls)
    signer = signed(azurite_tls, Token(), endpoint)
    for start in (0, 100):
        result, buffer = get(client, signer, start, start + 4096, etag)
        assert result.ok, (result, result.detail)
        assert bytes(buffer) == data[start : start + 4096]
    assert asked == ["https://storage.azure.com/.default"]  # the token is kept until near expiry


def test_a_landing_is_filled_in_place_and_the_shard_loads(device, azurite, write_checkpoint):
    # The protocol a feeder follows (sources/feeding.py), with the native reader as the fill:
    # the body lands in the core's own landing (a staging slot on cuda, the arena on cpu).
    directory = write_checkpoint(
        [{f"w{i}": random_tensor(torch.float32, (256, 300), i) for i in range(3)}], index=False
    )
    shard = next(directory.glob("*.safetensors"))
    client_blob = azurite.service().get_container_client(CONTAINER)
    if not client_blob.exists():
        client_blob.create_container()
    uploaded = client_blob.get_blob_client(shard.name).upload_blob(
        shard.read_bytes(), overwrite=True
    )
    etag = uploaded["etag"]
    size = shard.stat().st_size
    client, endpoint = open_client(azurite)
    signer = signed(azurite, KEY, endpoint)

    def fill_from(task: RangeTask) -> Callable[[memoryview], None]:
        def fill(view: memoryview) -> None:
            target, headers = signer.range_get(shard.name, task.start, task.end, etag)
            result = client.get_into(target, headers, view, first_byte=task.start)
            assert result.ok, (result, result.detail)

        return fill

    pipeline = _core.LoadPipeline(device, 2, 256 * 1024, 1, 1, True)
    session = pipeline.start_fed([_core.ShardSource(shard.name, size=size)])
    tasks = deque([RangeTask(0, 0, 64 * 1024, first=True)])
    while tasks:
        task = tasks.popleft()
        tasks.extend(feed_range(session, task, fill_from(task), 200 * 1024) or [])
    published = session.next_shard()
    assert published is not None
    got = {t.name: t.to_bytes() for t in published.tensors}
    assert got == reference_bytes(shard)
    assert session.next_shard() is None
    session.close()
    pipeline.close()


# -- answers that are not the bytes -------------------------------------------------------------
def test_an_etag_that_no_longer_matches_is_412_and_the_connection_is_kept(served):
    server, data, etag = served
    client, endpoint = open_client(server)
    signer = signed(server, KEY, endpoint)
    result, buffer = get(client, signer, 0, 1024, '"0x8D0000000000000"')
    assert result.failure == F.NONE and not result.ok
    assert result.status == 412 and result.header("x-ms-error-code") == "ConditionNotMet"
    assert result.bytes_received == 0 and bytes(buffer) == bytes(1024)
    assert b"ConditionNotMet" in result.error_body
    result, buffer = get(client, signer, 0, 1024, etag)
    assert result.ok and bytes(buffer) == data[:1024]
    assert result.reused_connection and client.connections_opened == 1


def test_a_missing_blob_is_404_with_its_code(served):
    server, _, _ = served
    client, endpoint = open_client(server)
    result, _ = get(client, signed(server, KEY, endpoint), 0, 10, None, blob="dir/nothing.bin")
    assert (result.failure, result.status) == (F.NONE, 404)
    assert result.header("x-ms-error-code") == "BlobNotFound"


def test_a_wrong_account_key_is_403_with_its_code(azurite, blob_http):
    _, etag = blob_http
    client, endpoint = open_client(azurite)
    wrong = {"account_name": ACCOUNT, "account_key": "AAAA" + ACCOUNT_KEY[4:]}
    result, _ = get(client, signed(azurite, wrong, endpoint), 0, 10, etag)
    assert (result.failure, result.status) == (F.NONE, 403)
    # Azure says AuthenticationFailed; Azurite says AuthorizationFailure.
    assert result.header("x-ms-error-code") == "AuthorizationFailure"
    assert b"<Code>AuthorizationFailure</Code>" in result.error_body  # chunked, decoded
    assert result.reason.startswith("Server failed to authenticate the request.")


def test_a_range_past_the_end_is_416(served):
    server, _, _ = served
    client, endpoint = open_client(server)
    result, _ = get(client, signed(server, KEY, endpoint), SIZE + 10, SIZE + 20, None)
    assert (result.failure, result.status) == (F.NONE, 416)


# -- connections that fail ----------------------------------------------------------------------
def test_a_reset_mid_body_is_reset_with_the_bytes_that_landed(azurite, blob_http, fault_proxy):
    data, etag = blob_http
    fault_proxy.faults.reset_after_bytes = 200_000
    fault_proxy.faults.resets = 1
    client, endpoint = open_client(azurite, fault_proxy.port)
    signer = signed(azurite, KEY, endpoint)
    result, buffer = get(client, signer, 0, SIZE, etag)
    # The reset may overtake the last bytes sent (or the head) in this machine's socket buffers.
    assert result.failure == F.RESET and result.status in (0, 206) and not result.ok
    assert result.bytes_received <= 200_000
    assert bytes(buffer[: result.bytes_received]) == data[: result.bytes_received]
    # What a retry would do: the bytes still missing, on a new connection.
    rest = result.bytes_received
    result, buffer = get(client, signer, rest, SIZE, etag)
    assert result.ok and bytes(buffer) == data[rest:]
    assert fault_proxy.counters.range_gets == 2


def test_a_silent_server_is_a_timeout(azurite, blob_http, fault_proxy):
    _, etag = blob_http
    fault_proxy.faults.stall_seconds = 3.0
    fault_proxy.faults.stalls = 1
    client, endpoint = open_client(azurite, fault_proxy.port, read_timeout=1.0)
    result, _ = get(client, signed(azurite, KEY, endpoint), 0, SIZE, etag)
    # The proxy sends 1000 body bytes, then nothing for 3 s.
    assert result.failure == F.TIMEOUT and result.bytes_received <= 1000


def test_close_breaks_a_blocked_read_at_once(azurite, blob_http, fault_proxy):
    _, etag = blob_http
    fault_proxy.faults.stall_seconds = 5.0
    fault_proxy.faults.stalls = 1
    client, endpoint = open_client(azurite, fault_proxy.port, read_timeout=60.0)
    stalled = threading.Event()
    fault_proxy.faults.on_range_get = lambda path, count: stalled.set()
    closer = threading.Thread(target=lambda: (stalled.wait(10), time.sleep(0.2), client.close()))
    closer.start()
    result, _ = get(client, signed(azurite, KEY, endpoint), 0, SIZE, etag)
    closer.join()
    assert result.failure == F.CANCELLED
    result, _ = get(client, signed(azurite, KEY, endpoint), 0, 10, etag)
    assert result.failure == F.CANCELLED  # closed for good


def test_an_untrusted_certificate_is_tls_verify_failed(azurite_tls, blob_https):
    _, etag = blob_https
    client, endpoint = open_client(azurite_tls, trusted=False)
    result, _ = get(client, signed(azurite_tls, KEY, endpoint), 0, 10, etag)
    assert result.failure == F.TLS_VERIFY and result.status == 0
    assert "self-signed certificate" in result.detail
    assert client.connections_opened == 0


def test_a_certificate_for_another_host_is_tls_verify_failed(tmp_path):
    # Trusted (its own CA), but issued for another name: only the hostname check refuses it.
    cert, key = _certificate(tmp_path, "storage.example")
    with _TlsServer(cert, key) as port:
        client = _core.RangeClient("127.0.0.1", port, tls=True, ca_file=str(cert))
        result = client.get_into("/x", [], bytearray(10))
        assert result.failure == F.TLS_VERIFY and "mismatch" in result.detail
        client = _core.RangeClient("localhost", port, tls=True, ca_file=str(cert))
        assert client.get_into("/x", [], bytearray(10)).failure == F.TLS_VERIFY


def test_a_ca_bundle_that_cannot_be_read_is_source_unavailable(tmp_path):
    with pytest.raises(errors.SourceUnavailable, match="REQUESTS_CA_BUNDLE") as info:
        _core.RangeClient("127.0.0.1", 443, tls=True, ca_file=str(tmp_path / "missing.pem"))
    assert info.value.hint == "point REQUESTS_CA_BUNDLE at a PEM file of CA certificates"


def test_nothing_listening_and_an_unknown_name_are_typed(free_port):
    client = _core.RangeClient("127.0.0.1", free_port)
    assert client.get_into("/x", [], bytearray(1)).failure == F.CONNECT_REFUSED
    client = _core.RangeClient("no-such-account.invalid", 80)
    assert client.get_into("/x", [], bytearray(1)).failure == F.DNS


# -- proxies ------------------------------------------------------------------------------------
@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    proxy = ForwardProxy(user="u", password="p@ss")
    yield proxy
    proxy.stop()


def test_https_through_a_connect_tunnel_with_proxy_credentials(
    azurite_tls, blob_https, forward_proxy
):
    data, etag = blob_https
    env = {
        "REQUESTS_CA_BUNDLE": azurite_tls.certificate,
        "HTTPS_PROXY": forward_proxy.url("u", "p%40ss"),
    }
    endpoint = range_endpoint(location(azurite_tls), env)
    assert (endpoint.proxy_host, endpoint.proxy_port) == ("127.0.0.1", forward_proxy.port)
    client = _core.RangeClient(**endpoint.client_options())
    signer = signed(azurite_tls, KEY, endpoint)
    for start in (0, 70_000):
        result, buffer = get(client, signer, start, start + 65536, etag)
        assert result.ok, (result, result.detail)
        assert bytes(buffer) == data[start : start + 65536]
    assert forward_proxy.log.tunnels == [f"127.0.0.1:{azurite_tls.port}"]  # one, kept alive


def test_a_proxy_refusing_its_credentials_is_proxy_refused_407(
    azurite_tls, blob_https, forward_proxy
):
    _, etag = blob_https
    env = {
        "REQUESTS_CA_BUNDLE": azurite_tls.certificate,
        "HTTPS_PROXY": forward_proxy.url("u", "wrong"),
    }
    endpoint = range_endpoint(location(azurite_tls), env)
    client = _core.RangeClient(**endpoint.client_options())
    result, _ = get(client, signed(azurite_tls, KEY, endpoint), 0, 10, etag)
    assert (result.failure, result.status) == (F.PROXY_REFUSED, 407)
    assert forward_proxy.log.refused == 1 and "wrong" not in result.detail


def test_http_through_the_proxy_and_no_proxy_around_it(azurite, blob_http, forward_proxy):
    data, etag = blob_http
    env = {"HTTP_PROXY": forward_proxy.url("u", "p%40ss")}
    endpoint = range_endpoint(location(azurite), env)
    client = _core.RangeClient(**endpoint.client_options())
    result, buffer = get(client, signed(azurite, KEY, endpoint), 10, 5000, etag)
    assert result.ok and bytes(buffer) == data[10:5000]
    assert len(forward_proxy.log.requests) == 1
    assert forward_proxy.log.requests[0].startswith(f"http://127.0.0.1:{azurite.port}/")
    # NO_PROXY is Python's decision: the endpoint goes direct.
    bypassed = range_endpoint(location(azurite), {**env, "NO_PROXY": "127.0.0.1"})
    assert bypassed.proxy_host is None
    assert range_endpoint(location(azurite), {"ALL_PROXY": env["HTTP_PROXY"]}).proxy_port


# -- answers a server should not give (a scripted server) ---------------------------------------
PARTIAL = {"Content-Length": "4", "Content-Range": "bytes 10-13/100"}
CHUNKED = {"Transfer-Encoding": "chunked"}
BROKEN_ANSWERS = {  # the request asks for bytes 10-13 into a buffer of 4
    "not-http": (b"this is not http\r\n\r\n", F.MALFORMED),
    "bare-lf": (b"HTTP/1.1 206 OK\r\nContent-Length: 4\r\n\nX: y\r\n\r\n", F.MALFORMED),
    "chunked-and-length": (answer("206 OK", {**PARTIAL, **CHUNKED}, b"4\r\nabcd"), F.MALFORMED),
    "chunked": (answer("206 OK", CHUNKED, b"4\r\nabcd\r\n0\r\n\r\n"), F.MALFORMED),
    "no-length": (answer("206 OK", {"Content-Range": "bytes 10-13/100"}, b"abcd"), F.MALFORMED),
    "other-range": (
        answer("206 OK", {"Content-Length": "4", "Content-Range": "bytes 11-14/100"}),
        F.RANGE_MISMATCH,
    ),
    "short-range": (
        answer("206 OK", {"Content-Length": "3", "Content-Range": "bytes 10-12/100"}),
        F.RANGE_MISMATCH,
    ),
    "whole-resource": (answer("200 OK", {"Content-Length": "100"}), F.RANGE_MISMATCH),
    "huge-head": (answer("206 OK", {**PARTIAL, "X-Big": "x" * 70_000}), F.MALFORMED),
    "lengths-disagree": (answer("206 OK", {**PARTIAL, "Content-Length": "4, 5"}), F.MALFORMED),
    "closed-mid-body": (answer("206 OK", PARTIAL, b"ab"), F.RESET),
    "closed-unanswered": (None, F.RESET),
}


@pytest.mark.parametrize(("broken", "failure"), BROKEN_ANSWERS.values(), ids=BROKEN_ANSWERS)
def test_answers_that_break_http_or_the_range_are_typed(broken, failure):
    with ScriptedServer([broken], close_after=True) as server:
        client = _core.RangeClient("127.0.0.1", server.port, read_timeout=5.0)
        buffer = bytearray(4)
        result = client.get_into("/b", [("x-ms-range", "bytes=10-13")], buffer, first_byte=10)
        assert result.failure == failure, result.detail
        assert not result.ok and client.idle_connections == 0


def test_a_kept_alive_connection_closed_by_the_server_is_replaced_once():
    ok = answer("206 OK", PARTIAL, b"abcd")
    # The first connection answers once, then closes as the second request arrives.
    with ScriptedServer([ok, None, ok]) as server:
        client = _core.RangeClient("127.0.0.1", server.port, read_timeout=5.0)
        for _ in range(2):
            buffer = bytearray(4)
            result = client.get_into("/b", [], buffer, first_byte=10)
            assert result.ok and buffer == b"abcd", result.detail
        assert not result.reused_connection
        assert client.connections_opened == 2 == server.connections


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_error_answer_is_read_whole_and_its_connection_kept(framing):
    body = b"<Error><Code>ServerBusy</Code></Error>"
    busy = {"x-ms-error-code": "ServerBusy", "Retry-After": "2"}
    if framing == "chunked":
        framed = b"%x\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n" % (len(body), body)
        busy["Transfer-Encoding"] = "chunked"
    else:
        framed = body
        busy["Content-Length"] = str(len(body))
    reason = "503 Egress is over the account limit."
    with ScriptedServer([answer(reason, busy, framed), answer("206 OK", PARTIAL, b"abcd")]) as s:
        client = _core.RangeClient("127.0.0.1", s.port, read_timeout=5.0)
        result = client.get_into("/b", [], bytearray(4), first_byte=10)
        assert (result.failure, result.status) == (F.NONE, 503) and not result.ok
        assert result.reason == "Egress is over the account limit."
        assert result.header("retry-after") == "2" and result.error_body == body
        buffer = bytearray(4)
        result = client.get_into("/b", [], buffer, first_byte=10)
        assert result.ok and buffer == b"abcd" and result.reused_connection
        assert client.connections_opened == 1 == s.connections


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_document_is_read_whole_and_its_connection_kept(framing):
    page = b"<EnumerationResults>" + b"x" * 40_000 + b"</EnumerationResults>"
    if framing == "chunked":  # as the service sends listings: in several chunks
        framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (page[:7], page[7:]))
        whole = answer("200 OK", CHUNKED, framed + b"0\r\n\r\n")
    else:
        whole = answer("200 OK", {"Content-Length": str(len(page))}, page)
    with ScriptedServer([whole, whole], delay=0.2) as server:  # answered by a Python thread
        client = _core.RangeClient("127.0.0.1", server.port, read_timeout=10.0)
        for reused in (False, True):
            result, body = client.get_document("/c?comp=list", [], 1 << 20)
            assert result.ok and body == page, result.detail
            assert result.bytes_received == len(page) and result.reused_connection == reused
        assert client.connections_opened == 1


DOCUMENT_ANSWERS = {  # the request allows 16 bytes
    "over-the-limit": (answer("200 OK", {"Content-Length": "17"}, b"x" * 17), F.MALFORMED),
    "chunked-over-the-limit": (
        answer("200 OK", CHUNKED, b"11\r\n" + b"x" * 17 + b"\r\n0\r\n\r\n"),
        F.MALFORMED,
    ),
    "until-close": (answer("200 OK", {}, b"abc"), F.MALFORMED),
    "cut-short": (answer("200 OK", {"Content-Length": "10"}, b"abc"), F.RESET),
    "chunked-cut-short": (answer("200 OK", CHUNKED, b"a\r\nabc"), F.RESET),
    "bad-chunk": (answer("200 OK", CHUNKED, b"zz\r\nabc"), F.MALFORMED),
    "bytes-after-the-last-chunk": (
        answer("200 OK", CHUNKED, b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n"),
        F.MALFORMED,
    ),
}


@pytest.mark.parametrize(("broken", "failure"), DOCUMENT_ANSWERS.values(), ids=DOCUMENT_ANSWERS)
def test_a_document_too_long_unframed_or_cut_short_is_typed_and_empty(broken, failure):
    with ScriptedServer([broken], close_after=True) as server:
        client = _core.RangeClient("127.0.0.1", server.port, read_timeout=5.0)
        result, body = client.get_document("/c", [], 16)
        assert result.failure == failure, result.detail
        assert body == b"" and not result.ok and client.idle_connections == 0


def test_a_204_is_an_empty_document_on_a_kept_connection():
    with ScriptedServer([answer("204 No Content", {})]) as server:
        client = _core.RangeClient("127.0.0.1", server.port, read_timeout=5.0)
        result, body = client.get_document("/c", [], 16)
        assert result.ok and result.status == 204 and body == b""
        assert client.idle_connections == 1


def test_a_document_refused_is_its_status_and_error_body():
    error = b"<Error><Code>ContainerNotFound</Code></Error>"
    headers = {"Content-Length": str(len(error)), "x-ms-error-code": "ContainerNotFound"}
    refused = answer("404 The specified container does not exist.", headers, error)
    with ScriptedServer([refused]) as s:
        client = _core.RangeClient("127.0.0.1", s.port, read_timeout=5.0)
        result, body = client.get_document("/c", [], 1 << 20)
        assert (result.failure, result.status, body) == (F.NONE, 404, b"")
        assert result.error_body == error and client.idle_connections == 1
        with pytest.raises(errors.InvalidArgument):
            client.get_document("/c", [], 0)


def test_an_unreachable_proxy_is_a_failure_at_the_proxy(free_port):
    client = _core.RangeClient(
        "example.invalid", 80, proxy_host="127.0.0.1", proxy_port=free_port, read_timeout=5.0
    )
    result = client.get_into("/b", [], bytearray(4))
    assert (result.failure, result.at_proxy) == (F.CONNECT_REFUSED, True)
    error = range_failure(result)
    assert failures.proxy_problem(error) is not None  # the proxy, not the account, failed
    direct = _core.RangeClient("127.0.0.1", free_port, read_timeout=5.0)
    result = direct.get_into("/b", [], bytearray(4))
    assert (result.failure, result.at_proxy) == (F.CONNECT_REFUSED, False)
    assert failures.proxy_problem(range_failure(result)) is None


def test_interim_answers_are_skipped():
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + answer("206 OK", PARTIAL, b"wxyz")
    with ScriptedServer([interim]) as server:
        buffer = bytearray(4)
        client = _core.RangeClient("127.0.0.1", server.port)
        result = client.get_into("/", [], buffer, first_byte=10)
        assert result.ok and result.status == 206 and buffer == b"wxyz"


def test_a_server_in_this_process_answers_while_get_into_waits():
    # The scripted server is a Python thread that needs the GIL to answer: get_into waits for
    # it without the GIL, or it would wait out its read timeout.
    with ScriptedServer([answer("206 OK", PARTIAL, b"abcd")], delay=0.3) as server:
        client = _core.RangeClient("127.0.0.1", server.port, read_timeout=10.0)
        result = client.get_into("/b", [], bytearray(4), first_byte=10)
        assert result.ok, result.detail


def test_requests_that_cannot_be_sent_are_refused_before_connecting():
    client = _core.RangeClient("127.0.0.1", 9)
    for headers in (
        [("x-ms-date", "Mon\r\nInjected: yes")],
        [("Host", "elsewhere")],
        [("Content-Length", "5")],
        [("bad name", "v")],
    ):
        with pytest.raises(errors.InvalidArgument):
            client.get_into("/b", headers, bytearray(1))
    with pytest.raises(errors.InvalidArgument):
        client.get_into("/b c", [], bytearray(1))
    with pytest.raises(errors.InvalidArgument):
        client.get_into("/b", [], bytearray(0))
    with pytest.raises(BufferError):
        client.get_into("/b", [], b"read-only")
    assert client.connections_opened == 0


# -- what the control plane makes of a result (sources/azure/failures.py, by type) ---------------
def test_error_statuses_classify_as_the_sdks_do(azurite, blob_http):
    _, etag = blob_http
    client, endpoint = open_client(azurite)
    where = location(azurite)
    result, _ = get(client, signed(azurite, KEY, endpoint), 0, 10, etag)
    assert range_failure(result) is None
    result, _ = get(client, signed(azurite, KEY, endpoint), 0, 10, None, blob="dir/none.bin")
    error = range_failure(result)
    assert isinstance(error, RangeHttpError) and not failures.is_transient(error)
    assert isinstance(failures.storage_error(error, where, "dir/none.bin"), errors.BlobNotFound)
    wrong = {"account_name": ACCOUNT, "account_key": "AAAA" + ACCOUNT_KEY[4:]}
    error = range_failure(get(client, signed(azurite, wrong, endpoint), 0, 10, etag)[0])
    denied = failures.storage_error(error, where, BLOB)
    assert isinstance(denied, errors.AccessDenied) and "AuthorizationFailure" in str(denied)
    error = range_failure(get(client, signed(azurite, KEY, endpoint), 0, 10, '"0x1"')[0])
    assert isinstance(error, RangeHttpError) and error.status_code == 412


def test_an_egress_503_is_throttling_by_bandwidth_with_its_retry_after():
    busy = {"x-ms-error-code": "ServerBusy", "Retry-After": "2", "Content-Length": "0"}
    with ScriptedServer([answer("503 Egress is over the account limit.", busy)]) as server:
        client = _core.RangeClient("127.0.0.1", server.port, read_timeout=5.0)
        error = range_failure(client.get_into("/b", [], bytearray(4), first_byte=10))
    assert error is not None and failures.is_transient(error) and failures.is_throttled(error)
    assert failures.throttled_by_bandwidth(error) and retry_after(error) == 2.0


def test_an_untrusted_certificate_is_source_unavailable_at_once(azurite_tls, blob_https):
    _, etag = blob_https
    client, endpoint = open_client(azurite_tls, trusted=False)
    error = range_failure(get(client, signed(azurite_tls, KEY, endpoint), 0, 10, etag)[0])
    assert error is not None and not failures.is_transient(error)
    mapped = failures.storage_error(error, location(azurite_tls), BLOB)
    assert type(mapped) is errors.SourceUnavailable
    assert "self-signed certificate" in str(mapped) and "REQUESTS_CA_BUNDLE" in str(mapped)
    assert mapped.hint.startswith("install the CA") and str(mapped).endswith(mapped.hint)


def test_connection_failures_are_transient_and_say_what_happened(free_port):
    client = _core.RangeClient("127.0.0.1", free_port)
    error = range_failure(client.get_into("/x", [], bytearray(1)))
    assert isinstance(error, ConnectionRefusedError) and failures.is_transient(error)
    where = BlobLocation(f"http://127.0.0.1:{free_port}/{ACCOUNT}", ACCOUNT, CONTAINER, BLOB)
    assert failures.failure_reason(error, where).startswith("connection refused")
    with ScriptedServer([answer("206 OK", PARTIAL, b"ab")], close_after=True) as server:
        client = _core.RangeClient("127.0.0.1", server.port, read_timeout=5.0)
        error = range_failure(client.get_into("/b", [], bytearray(4), first_byte=10))
    assert isinstance(error, ConnectionResetError) and failures.is_transient(error)
    with ScriptedServer([answer("206 OK", {**PARTIAL, "Content-Range": "bytes 0-3/9"})]) as s:
        client = _core.RangeClient("127.0.0.1", s.port, read_timeout=5.0)
        error = range_failure(client.get_into("/b", [], bytearray(4), first_byte=10))
    assert isinstance(error, RangeMismatch) and error.total_size == 9


def test_a_proxy_refusing_credentials_is_proxy_authentication_refused(
    azurite_tls, blob_https, forward_proxy
):
    _, etag = blob_https
    env = {"REQUESTS_CA_BUNDLE": azurite_tls.certificate, "HTTPS_PROXY": forward_proxy.url()}
    endpoint = range_endpoint(location(azurite_tls), env)
    client = _core.RangeClient(**endpoint.client_options())
    error = range_failure(get(client, signed(azurite_tls, KEY, endpoint), 0, 10, etag)[0])
    assert error is not None and not failures.is_transient(error)
    mapped = failures.storage_error(error, location(azurite_tls), BLOB)
    assert isinstance(mapped, errors.ProxyAuthenticationRefused)


# -- TLS test helpers ---------------------------------------------------------------------------
def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) valid for DNS name `name` only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "other.pem", directory / "other.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _TlsServer:
    """A loopback TLS server presenting `cert` that completes handshakes and answers nothing."""

    def __init__(self, cert: Path, key: Path) -> None:
        import ssl

        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._server = socket.create_server(("127.0.0.1", 0))

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            try:
                with self._context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except OSError:
                pass  # the client refused the certificate

    def __enter__(self) -> int:
        threading.Thread(target=self._accept, daemon=True).start()
        port: int = self._server.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self._server.close()
