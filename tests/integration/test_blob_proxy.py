"""Azure Blob through a forward HTTP proxy, as corporate networks require (HTTPS_PROXY with a
CONNECT tunnel, HTTP_PROXY with absolute-form requests, NO_PROXY to bypass it): loads byte-equal
through it; a proxy that refuses its credentials (407) is ProxyAuthenticationRefused (an
AccessDenied) at once and one that cannot be reached is StorageUnavailable, both naming the proxy
and the variable, never its password."""

from __future__ import annotations

import blob2gpu
import pytest
import torch
from blob2gpu import errors
from conftest import checkpoint_bytes as expected
from conftest import load_with_report as load
from conftest import random_tensor, upload_directory
from support.forward_proxy import ForwardProxy
from support.preflight import checks, preflight

PASSWORD = "pr0xy-Passw0rd"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")


def shards():
    return [
        {f"s{s}.w{i}": random_tensor(torch.bfloat16, (64, 96), 3 * s + i) for i in range(3)}
        for s in range(2)
    ]


@pytest.fixture
def no_proxy_settings(monkeypatch):
    for var in PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.lower(), raising=False)
    return monkeypatch


@pytest.fixture
def proxy():
    server = ForwardProxy("loader", PASSWORD)
    yield server
    server.stop()


def test_http_through_the_proxy_and_no_proxy_around_it(
    device, write_checkpoint, azurite, container, blob_env, proxy, no_proxy_settings
):
    directory = write_checkpoint(shards())
    upload_directory(azurite, container, directory, "m")
    no_proxy_settings.setenv("HTTP_PROXY", proxy.url("loader", PASSWORD))
    got, report = load(f"az://{container}/m", device)
    assert got == expected(directory) and report.retries == 0
    # The listing and every shard's GET went through it.
    paths = [r.split("?")[0].rsplit("/", 1)[-1] for r in proxy.log.requests]
    assert "comp=list" in proxy.log.requests[0] and proxy.log.refused == 0
    assert {p for p in paths if p.endswith(".safetensors")} == {s.name for s in report.shards}
    seen = len(proxy.log.requests)
    no_proxy_settings.setenv("NO_PROXY", "127.0.0.1")
    assert load(f"az://{container}/m", device)[0] == got
    assert len(proxy.log.requests) == seen


def test_https_through_a_connect_tunnel(
    device, azurite_tls, tmp_path, proxy, no_proxy_settings, write_checkpoint
):
    directory = write_checkpoint(shards())
    upload_directory(azurite_tls, "tunnelled", directory, "m")
    no_proxy_settings.setenv("REQUESTS_CA_BUNDLE", azurite_tls.certificate)
    no_proxy_settings.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_tls.connection_string())
    no_proxy_settings.setenv("HTTPS_PROXY", proxy.url("loader", PASSWORD))
    got, report = load("az://tunnelled/m", device)
    assert got == expected(directory) and report.uri.startswith("https://")
    assert proxy.log.tunnels and set(proxy.log.tunnels) == {f"127.0.0.1:{azurite_tls.port}"}
    assert proxy.log.requests == []  # inside the tunnel, the proxy sees no request


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_refusing_its_credentials_is_access_denied_at_once(
    scheme, azurite, azurite_tls, proxy, no_proxy_settings
):
    server = azurite_tls if scheme == "https" else azurite
    variable = f"{scheme.upper()}_PROXY"
    no_proxy_settings.setenv("REQUESTS_CA_BUNDLE", azurite_tls.certificate)
    no_proxy_settings.setenv("AZURE_STORAGE_CONNECTION_STRING", server.connection_string())
    no_proxy_settings.setenv(variable, proxy.url("loader", "wrong-" + PASSWORD))
    refused = rf"proxy 127.0.0.1:{proxy.port} refused its credentials \(HTTP 407\).*{variable}"
    with pytest.raises(errors.ProxyAuthenticationRefused, match=refused) as info:
        blob2gpu.load("az://anything/m", retry_backoff_seconds=30)  # a retry would take 30 s
    assert PASSWORD not in str(info.value) and proxy.log.refused == 1


def test_an_unreachable_proxy_is_storage_unavailable_naming_it(
    azurite, free_port, no_proxy_settings
):
    no_proxy_settings.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string())
    no_proxy_settings.setenv("HTTP_PROXY", f"http://loader:{PASSWORD}@127.0.0.1:{free_port}")
    with pytest.raises(
        errors.StorageUnavailable,
        match=rf"the proxy 127.0.0.1:{free_port} "
        r"\(HTTP_PROXY\) cannot be reached: connection refused.*NO_PROXY",
    ) as info:
        blob2gpu.load("az://anything/m", retry_max_attempts=2, retry_backoff_seconds=0.01)
    assert PASSWORD not in str(info.value)


def test_preflight_names_the_proxy(azurite, proxy, free_port, no_proxy_settings, tmp_path):
    def storage_check(proxy_url):
        env = {
            "HTTP_PROXY": proxy_url,
            "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string(),
            "BLOB2GPU_CUDA_DRIVER": "/nonexistent/libcuda.so.1",
        }
        result = preflight(
            "--source", "az://anything/m", "--cache-dir", str(tmp_path), "--json", env=env
        )
        assert result.returncode == 1 and PASSWORD not in result.stdout + result.stderr
        return checks(result)["storage"]

    refused = storage_check(proxy.url("loader", "wrong"))
    assert refused["status"] == "fail" and "proxy refused its credentials" in refused["value"]
    assert "HTTP_PROXY" in refused["hint"]
    gone = storage_check(f"http://loader:{PASSWORD}@127.0.0.1:{free_port}")
    assert gone["status"] == "fail" and "proxy" in gone["value"] and "reached" in gone["value"]
