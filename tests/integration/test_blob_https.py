"""Azure Blob over HTTPS (a real Azurite with a self-signed certificate, accepting OAuth bearer
tokens): an account key and a bearer token credential load byte-equal on cpu and cuda; an
expired token is AccessDenied without the token in the message; a certificate nobody trusts
fails at once, typed, naming the fix, instead of being retried as a network fault."""

from __future__ import annotations

import base64
import json
import time

import pytest
import torch
from azure.core.credentials import AccessToken
from blob2gpu import errors
from conftest import checkpoint_bytes as expected
from conftest import load_with_report as load
from conftest import random_tensor, upload_directory


@pytest.fixture(scope="module")
def published(azurite_tls, tmp_path_factory):
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("ckpt")
    for s in range(2):
        tensors = {
            f"s{s}.w{i}": random_tensor(torch.bfloat16, (64, 96), 3 * s + i) for i in range(3)
        }
        save_file(tensors, str(directory / f"model-{s + 1:05d}-of-00002.safetensors"))
    upload_directory(azurite_tls, "secure", directory, "m")
    return directory


@pytest.fixture
def trusted(azurite_tls, monkeypatch):
    """The test certificate trusted the way a user trusts a private CA: REQUESTS_CA_BUNDLE."""
    for var in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", azurite_tls.certificate)
    return azurite_tls


class StaticToken:
    """A token credential (azure-core's protocol, as azure-identity's credentials implement it)
    handing out one JWT that Azurite's OAuth check accepts: storage audience, an Entra issuer,
    a lifetime around now. Counts the scopes it was asked for."""

    def __init__(self, lifetime_start: float, lifetime_end: float) -> None:
        def part(doc):
            return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

        claims = {
            "aud": "https://storage.azure.com",
            "iss": "https://sts.windows.net/72f988bf-0000-0000-0000-000000000000/",
            "iat": int(lifetime_start),
            "nbf": int(lifetime_start),
            "exp": int(lifetime_end),
        }
        self.token = f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.c2ln"
        self.expires_on = int(lifetime_end)
        self.scopes: list[str] = []

    def get_token(self, *scopes, **kwargs):
        self.scopes += scopes
        return AccessToken(self.token, self.expires_on)


def test_account_key_over_https(device, published, trusted, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", trusted.connection_string())
    got, report = load("az://secure/m", device)
    assert got == expected(published) and report.uri.startswith("https://")


def test_bearer_token_over_https(device, published, trusted):
    now = time.time()
    credential = StaticToken(now - 60, now + 3600)
    got, report = load(f"{trusted.endpoint()}/secure/m", device, credential=credential)
    assert got == expected(published)
    assert report.credential == "explicit credential"
    assert credential.scopes and all(
        s.startswith("https://storage.azure.com") for s in credential.scopes
    )
    assert credential.token not in report.to_json()


def test_expired_bearer_token_is_access_denied_without_the_token(published, trusted):
    expired = StaticToken(time.time() - 7200, time.time() - 3600)
    with pytest.raises(errors.AccessDenied, match="secure") as info:
        load(f"{trusted.endpoint()}/secure/m", "cpu", credential=expired)
    assert expired.token not in str(info.value)
    assert expired.token.split(".")[1] not in str(info.value)


def test_untrusted_certificate_fails_at_once_typed_and_says_how_to_trust_it(
    published, azurite_tls, monkeypatch
):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_tls.connection_string())
    with pytest.raises(errors.SourceUnavailable, match="REQUESTS_CA_BUNDLE") as info:
        load("az://secure/m", "cpu", retry_backoff_seconds=30)  # a retry would take 30 s
    message = str(info.value)
    assert "not trusted" in message and "self-signed certificate" in message
    assert "kept failing" not in message


def test_no_identity_to_be_found_is_access_denied_at_once_naming_the_credential(
    published, trusted, monkeypatch
):
    # Nothing in the environment: DefaultAzureCredential (azure-identity) is the credential, and
    # on this machine it finds no identity (no workload or managed identity, no Azure CLI).
    for var in (
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_CLIENT_SECRET",
        "IDENTITY_ENDPOINT",
        "MSI_ENDPOINT",
    ):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(errors.AccessDenied, match="DefaultAzureCredential") as info:
        load(f"{trusted.endpoint()}/secure/m", "cpu", retry_backoff_seconds=30)
    message = str(info.value)
    assert "secure" in message and "kept failing" not in message
    assert "AZURE_STORAGE_CONNECTION_STRING" in message  # what else would do
