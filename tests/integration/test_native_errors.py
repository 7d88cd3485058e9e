"""Every way a ranged GET can fail ends in the same typed error whether the core's range reader
read it (native_http, the default) or azure-storage-blob did (native_http=false): a wrong key, a
blob gone, an expired SAS, a blob overwritten since listing (another etag), a body cut short by
an orderly close or by a reset mid-body, and throttling (503 ServerBusy and 429, with a
Retry-After); the transient ones are retried from the missing bytes alike, and fail alike once
the retries run out. Each case reads one listed blob of a real Azurite, directly or through the
fault proxy, with a BlobRangeReader of each kind."""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from blob2gpu import errors
from blob2gpu.settings import resolve
from blob2gpu.sources.azure.container import open_container
from blob2gpu.sources.azure.range_reader import BlobRangeReader
from blob2gpu.sources.plan import ShardRef
from support.azurite import ACCOUNT, ACCOUNT_KEY

KEY = {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY}
WRONG_KEY = {"account_name": ACCOUNT, "account_key": base64.b64encode(b"k" * 64).decode()}
SIZE = 256 * 1024
FAST = {
    "retry_backoff_seconds": 0.01,
    "retry_backoff_max_seconds": 0.05,
    "retry_max_attempts": 3,
    "retry_throttled_seconds": 3.0,
}


@dataclass
class Blob:
    container: str
    path: str
    etag: str
    data: bytes

    def ref(self, path: str | None = None, etag: str | None = None) -> ShardRef:
        return ShardRef("a", path or self.path, SIZE, etag or self.etag)


@dataclass
class Outcome:
    error: errors.Blob2GpuError | None
    data: bytes
    requests: int
    retries: int
    waited: float


@pytest.fixture
def blob(azurite: Any, container: str) -> Blob:
    data = os.urandom(SIZE)
    client = azurite.service().get_blob_client(container, "m/a.safetensors")
    etag = client.upload_blob(data)["etag"]
    return Blob(container, "m/a.safetensors", etag, data)


def read(url: str, native: bool, ref: ShardRef, credential: Any = KEY) -> Outcome:
    """Read the whole blob `ref` names through a reader of the kind `native` says."""
    settings = resolve({"native_http": native, **FAST})
    view = bytearray(SIZE)
    error = None
    with open_container(url, settings, credential) as container:
        reader = BlobRangeReader(container)
        try:
            reader.read_into(ref, 0, memoryview(view))
        except errors.Blob2GpuError as e:
            error = e
        finally:
            reader.close()
        retry = container.retry
        return Outcome(error, bytes(view), reader.requests, retry.retries, retry.waited_seconds)


def both(url: str, ref: ShardRef, arm: Any = None, credential: Any = KEY) -> list[Outcome]:
    """The outcomes of the core's reader and the SDK's, each after arm() (the proxy's faults)."""
    outcomes = []
    for native in (True, False):
        if arm is not None:
            arm()
        outcomes.append(read(url, native, ref, credential))
    return outcomes


def same_failure(outcomes: list[Outcome], kind: type[errors.Blob2GpuError]) -> None:
    native, sdk = outcomes
    assert type(native.error) is kind, native.error
    assert type(sdk.error) is kind, sdk.error
    assert native.requests == sdk.requests  # retried (or not) alike
    # The same words, but for the last transient failure's own (the transport's) text.
    assert said(native.error) == said(sdk.error)


def said(error: BaseException | None) -> str:
    return re.sub(r"\(last: [^)]*\)", "(last: ...)", str(error))


def test_a_wrong_key_is_access_denied(azurite, blob):
    outcomes = both(f"{azurite.endpoint()}/{blob.container}/m", blob.ref(), credential=WRONG_KEY)
    same_failure(outcomes, errors.AccessDenied)
    assert all(o.requests == 1 for o in outcomes)  # a denial is not retried
    assert all(WRONG_KEY["account_key"] not in str(o.error) for o in outcomes)


def test_a_blob_gone_since_listing_is_blob_changed_or_not_found(azurite, blob):
    url = f"{azurite.endpoint()}/{blob.container}/m"
    gone = ShardRef("a", "m/gone.safetensors", SIZE, blob.etag)
    # Pinned to its listed etag, the GET's If-Match fails (Azurite: 412): the blob changed.
    same_failure(both(url, gone), errors.BlobChanged)
    unpinned = ShardRef("a", "m/gone.safetensors", SIZE, None)
    outcomes = both(url, unpinned)
    same_failure(outcomes, errors.BlobNotFound)
    assert all("m/gone.safetensors" in str(o.error) for o in outcomes)


def test_an_expired_sas_is_access_denied_saying_so(azurite, blob):
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    expiry = datetime.now(timezone.utc) - timedelta(hours=1)
    sas = generate_container_sas(
        ACCOUNT,
        blob.container,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=expiry,
    )
    url = f"{azurite.endpoint()}/{blob.container}/m?{sas}"
    outcomes = both(url, blob.ref(), credential=None)
    same_failure(outcomes, errors.AccessDenied)
    for outcome in outcomes:
        assert "the SAS expired at" in str(outcome.error)
        assert sas not in str(outcome.error)


def test_a_blob_overwritten_since_listing_is_blob_changed(azurite, blob):
    url = f"{azurite.endpoint()}/{blob.container}/m"
    outcomes = both(url, blob.ref(etag='"0x8D0000000000000"'))
    same_failure(outcomes, errors.BlobChanged)
    assert all(o.requests == 1 for o in outcomes)


@pytest.mark.parametrize("fault", ["truncations", "resets"])
def test_a_body_cut_short_is_read_again_from_the_missing_bytes(azurite, blob, fault_proxy, fault):
    def arm() -> None:
        fault_proxy.reset()
        setattr(fault_proxy.faults, fault, 2)
        fault_proxy.faults.reset_after_bytes = 100_000

    outcomes = both(f"{azurite.endpoint(fault_proxy.port)}/{blob.container}/m", blob.ref(), arm)
    for outcome in outcomes:
        assert outcome.error is None and outcome.data == blob.data
        assert outcome.requests == 3 and outcome.retries == 2


@pytest.mark.parametrize("fault", ["truncations", "resets"])
def test_a_body_cut_short_every_time_is_storage_unavailable(azurite, blob, fault_proxy, fault):
    def arm() -> None:
        fault_proxy.reset()
        setattr(fault_proxy.faults, fault, 100)
        fault_proxy.faults.reset_after_bytes = 10_000

    outcomes = both(f"{azurite.endpoint(fault_proxy.port)}/{blob.container}/m", blob.ref(), arm)
    same_failure(outcomes, errors.StorageUnavailable)
    assert outcomes[0].requests == FAST["retry_max_attempts"]


@pytest.mark.parametrize("status", [503, 429])
def test_throttling_waits_as_long_as_retry_after_says(azurite, blob, fault_proxy, status):
    def arm() -> None:
        fault_proxy.reset()
        fault_proxy.faults.status, fault_proxy.faults.statuses, fault_proxy.faults.retry_after = (
            status,
            2,
            "1",
        )

    outcomes = both(f"{azurite.endpoint(fault_proxy.port)}/{blob.container}/m", blob.ref(), arm)
    for outcome in outcomes:
        assert outcome.error is None and outcome.data == blob.data
        assert outcome.requests == 3
        assert outcome.waited >= 2.0  # the policy's waits: Retry-After, twice


@pytest.mark.parametrize("status", [503, 429])
def test_throttling_past_its_budget_is_storage_unavailable(azurite, blob, fault_proxy, status):
    def arm() -> None:
        fault_proxy.reset()
        fault_proxy.faults.status, fault_proxy.faults.statuses, fault_proxy.faults.retry_after = (
            status,
            100,
            "1",
        )

    outcomes = both(f"{azurite.endpoint(fault_proxy.port)}/{blob.container}/m", blob.ref(), arm)
    same_failure(outcomes, errors.StorageUnavailable)
    assert all("throttl" in str(o.error).lower() for o in outcomes)
