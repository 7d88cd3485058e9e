"""No secret leaves through logs or chained exceptions: with every logger at DEBUG, a real load
from Azurite with a SAS, with an account key, and failing loads, log nothing of the SAS
signature, the key or the SharedKey signature (urllib3 logs each request line, SAS and all);
and the typed errors of storage failures chain no exception that holds one."""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, unquote

import blob2gpu
import pytest
from blob2gpu import errors
from conftest import checkpoint_bytes as expected
from conftest import load_with_report
from support.azurite import ACCOUNT, ACCOUNT_KEY


class Everything(logging.Handler):
    """Every record of every logger, formatted as a handler would write it (exception text
    included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []
        self.names: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.names.add(record.name)
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def debug_logs() -> Iterator[Everything]:
    """Every logger at DEBUG, captured."""
    handler = Everything()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def sas_for(container: str, **permissions: bool) -> str:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    return generate_container_sas(
        ACCOUNT,
        container,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(**(permissions or {"read": True, "list": True})),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
    )


def signature_of(sas: str) -> str:
    return unquote(dict(p.split("=", 1) for p in sas.split("&"))["sig"])


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            assert form not in text
    assert ACCOUNT_KEY not in text
    # A SharedKey Authorization header: "SharedKey ACCOUNT:SIGNATURE".
    assert not re.search(r"SharedKey\s+[\w-]+:[A-Za-z0-9+/=]{8,}", text)


def chain(error: BaseException) -> list[BaseException]:
    """`error` and every exception chained to it (causes, contexts)."""
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [error]
    while pending:
        e = pending.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        pending += [e.__cause__, e.__context__]
    return seen


def assert_chain_has_no_secret(error: BaseException, *secrets: str) -> None:
    texts = [f"{type(e).__name__} {e} {e!r} {e.args!r}" for e in chain(error)]
    texts.append("".join(traceback.format_exception(error)))
    assert_no_secret("\n".join(texts), *secrets)


def test_loads_with_a_sas_and_with_an_account_key_log_no_secret_at_debug(
    published, azurite, container, monkeypatch, debug_logs
):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    sas = sas_for(container)
    got, _ = load_with_report(f"{azurite.endpoint()}/{container}/m?{sas}", "cpu")
    assert got == expected(published)
    # Every request line was logged (the listing, the index, the ranges): the test sees them.
    assert re.search(r'"GET /\S+restype=container\S* HTTP/1.1" 200', debug_logs.text)
    assert re.search(r'"GET /\S+index.json\S* HTTP/1.1" 206', debug_logs.text)
    assert re.search(r'"GET /\S+ HTTP/1.1" 206', debug_logs.text)
    assert "sig=REDACTED" in debug_logs.text
    # With the key: each request is signed (SharedKey), the key itself never sent.
    monkeypatch.setenv("AZURE_STORAGE_KEY", ACCOUNT_KEY)
    got, report = load_with_report(f"{azurite.endpoint()}/{container}/m", "cpu")
    assert got == expected(published) and report.credential.startswith("account key")
    assert_no_secret(debug_logs.text, signature_of(sas))


def test_the_sdk_s_request_and_header_logs_are_redacted_too(debug_logs):
    # What azure-core's logging policy and urllib3 write, as the filter must take it whatever
    # the SDK's own redaction does: a header mapping, a SAS query, a bearer token.
    from blob2gpu.redaction import install_log_redaction

    install_log_redaction()
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").debug(
        "Request headers: %s", {"Authorization": "SharedKey acct:c2lnbmF0dXJlc2lnbmF0dXJl"}
    )
    logging.getLogger("urllib3.connectionpool").debug(
        '%s://%s:%s "%s %s %s" %s %s',
        "https",
        "a",
        443,
        "GET",
        "/c/b?sv=1&sig=S3CR3T",
        "HTTP/1.1",
        200,
        5,
    )
    logging.getLogger("azure.identity.some.module").info("Authorization: Bearer eyJ0eXAi.abc.def")
    try:
        raise ValueError("GET https://a/c?sig=S3CR3T failed")
    except ValueError:
        logging.getLogger("urllib3.util.retry").exception("retrying")
    text = debug_logs.text
    assert "S3CR3T" not in text and "c2lnbmF0dXJl" not in text and "eyJ0eXAi" not in text
    assert "retrying" in text and "ValueError" in text  # the exception's text is kept, redacted


def test_a_refused_connection_s_error_chains_no_sdk_error_with_the_url(
    container, monkeypatch, debug_logs
):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    sas = sas_for(container)
    with pytest.raises(errors.StorageUnavailable) as info:
        blob2gpu.load(
            f"http://127.0.0.1:{port}/{ACCOUNT}/{container}/m?{sas}",
            framework="dlpack",
            retry_max_attempts=1,
        )
    assert "connection refused" in str(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert_chain_has_no_secret(info.value, signature_of(sas))
    assert_no_secret(debug_logs.text, signature_of(sas))


def test_a_denied_request_s_error_chains_no_sdk_error_with_the_url(
    published, azurite, container, monkeypatch
):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    sas = sas_for(container, read=True)  # no list permission: 403 on the listing
    with pytest.raises(errors.AccessDenied) as info:
        blob2gpu.load(f"{azurite.endpoint()}/{container}/m?{sas}", framework="dlpack")
    assert info.value.__context__ is None
    assert_chain_has_no_secret(info.value, signature_of(sas))
    with pytest.raises(errors.BlobNotFound) as info:
        blob2gpu.load(f"{azurite.endpoint()}/{container}/nothing-here?{sas_for(container)}")
    assert_chain_has_no_secret(info.value, signature_of(sas))


def test_an_aux_file_changed_after_listing_chains_no_sdk_error(
    published, azurite, container, fault_proxy, monkeypatch, tmp_path
):
    # fetch_aux's BlobChanged is raised while the SDK's 412 (its request inside) is handled.
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    client = azurite.service().get_container_client(container)
    client.upload_blob("m/config.json", b"{}", overwrite=True)

    def overwrite_first(path, count):
        if count == 1:
            client.upload_blob("m/config.json", b'{"hidden_size": 1}', overwrite=True)

    fault_proxy.faults.on_range_get = overwrite_first
    with pytest.raises(errors.BlobChanged) as info:
        blob2gpu.fetch_aux(f"az://{container}/m", str(tmp_path / "aux"))
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert_chain_has_no_secret(info.value)
