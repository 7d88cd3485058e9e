"""`blob2gpu preflight`: node readiness against a live Azurite, a dead endpoint, the fake GPU and a
temporary cache directory; a table for people, JSON for machines, exit 1 when a check fails."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
from blob2gpu.loading.pipelines import pipeline_settings
from blob2gpu.settings import resolve
from conftest import random_tensor, upload_directory
from support.azurite import ACCOUNT, ACCOUNT_KEY
from support.preflight import checks, preflight

STATUSES = {"ok", "warn", "fail", "skip"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def published(write_checkpoint, azurite, container):
    directory = write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float16, (256, 64), s)} for s in range(2)]
    )
    upload_directory(azurite, container, directory, "llama")
    return directory


@pytest.fixture
def no_driver() -> dict[str, str]:
    """An environment in which the CUDA driver cannot be loaded (a host without a GPU)."""
    return {"BLOB2GPU_CUDA_DRIVER": "/nonexistent/libcuda.so.1"}


def test_passes_against_azurite_with_a_connection_string(
    published, container, blob_env, tmp_path, no_driver
):
    result = preflight(
        "--source", f"az://{container}/llama", "--cache-dir", str(tmp_path), env=no_driver
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines()[1:-1]}
    assert lines["storage"].startswith("OK") and "reachable" in lines["storage"]
    assert lines["checkpoint"].startswith("OK") and "2 shard(s)" in lines["checkpoint"]
    assert lines["model_fit"].startswith("OK") and "host RAM" in lines["model_fit"]
    assert lines["cuda_driver"].startswith("SKIP")
    assert result.stdout.splitlines()[-1].startswith("preflight: ready")
    assert ACCOUNT_KEY not in result.stdout + result.stderr


def test_json_shape(published, container, blob_env, tmp_path, no_driver):
    result = preflight(
        "--source", f"az://{container}/llama", "--cache-dir", str(tmp_path), "--json",
        env=no_driver,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["device"] == "cpu"
    assert doc["source"] == f"az://{container}/llama"
    assert set(doc["counts"]) == STATUSES and sum(doc["counts"].values()) == len(doc["checks"])
    for check in doc["checks"]:
        assert set(check) == {"name", "status", "value", "hint", "data", "seconds"}
        assert check["status"] in STATUSES and isinstance(check["value"], str)
    by_name = {c["name"]: c for c in doc["checks"]}
    total = sum(f.stat().st_size for f in published.glob("*.safetensors"))
    assert by_name["checkpoint"]["data"] == {"shards": 2, "bytes": total}
    assert by_name["model_fit"]["data"]["model_bytes"] == total
    assert by_name["storage"]["data"]["credential"].startswith("account key")


def test_wrong_key_fails_without_printing_the_key(
    published, azurite, container, monkeypatch, tmp_path, no_driver
):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    wrong = "B" * 86 + "=="
    uri = f"{azurite.endpoint()}/{container}/llama"
    for extra in ((), ("--json",)):
        result = preflight(
            "--source", uri, "--cache-dir", str(tmp_path), *extra,
            env={**no_driver, "AZURE_STORAGE_KEY": wrong},
        )  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr
        out = result.stdout + result.stderr
        assert wrong not in out and ACCOUNT_KEY not in out
    storage = checks(result)["storage"]
    assert storage["status"] == "fail" and "credentials refused" in storage["value"]
    assert "SAS" in storage["hint"] or "key" in storage["hint"]


def test_sas_in_the_uri_is_not_printed(
    published, azurite, container, monkeypatch, tmp_path, no_driver
):
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    sas = generate_container_sas(
        ACCOUNT,
        container,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
    )
    signature = dict(p.split("=", 1) for p in sas.split("&"))["sig"]
    uri = f"{azurite.endpoint()}/{container}/llama?{sas}"
    for extra in ((), ("--json",)):
        result = preflight("--source", uri, "--cache-dir", str(tmp_path), *extra, env=no_driver)
        assert result.returncode == 0, result.stdout + result.stderr
        assert signature not in result.stdout + result.stderr
    assert checks(result)["storage"]["data"]["credential"] == "SAS in the URI"


def test_dead_endpoint_fails_fast_with_a_connect_error(
    azurite, container, monkeypatch, tmp_path, no_driver
):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(closed_port()))
    started = time.monotonic()
    result = preflight(
        "--source", f"az://{container}/llama", "--cache-dir", str(tmp_path), "--json",
        env=no_driver,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    storage = checks(result)["storage"]
    assert storage["status"] == "fail" and "unreachable" in storage["value"]
    assert "refused" in storage["value"].lower() or "connect" in storage["value"].lower()
    assert "checkpoint" not in checks(result)  # nothing listed, nothing to size
    assert elapsed < 30, f"preflight took {elapsed:.1f} s on a dead endpoint"


def test_missing_container_fails(azurite, blob_env, tmp_path, no_driver):
    result = preflight(
        "--source", "az://nosuchcontainer/llama", "--cache-dir", str(tmp_path), "--json",
        env=no_driver,
    )  # fmt: skip
    assert result.returncode == 1
    storage = checks(result)["storage"]
    assert storage["status"] == "fail" and "nosuchcontainer" in storage["value"]


def test_archived_shards_fail_the_checkpoint_check(
    published, azurite, container, blob_env, tmp_path, no_driver
):
    blob = azurite.service().get_blob_client(container, "llama/model-00001-of-00002.safetensors")
    blob.set_standard_blob_tier("Archive")
    source = ["--source", f"az://{container}/llama", "--cache-dir", str(tmp_path), "--json"]
    result = preflight(*source, env=no_driver)
    assert result.returncode == 1
    checkpoint = checks(result)["checkpoint"]
    assert checkpoint["status"] == "fail" and "1 in the Archive tier" in checkpoint["value"]
    assert checkpoint["data"]["archived"] == ["model-00001-of-00002.safetensors"]
    assert "rehydrate" in checkpoint["hint"]
    # With the NVMe cache on, a cached copy may still serve it: a warning, not a failure.
    result = preflight(*source, env={**no_driver, "BLOB2GPU_LOCAL_NVME_CACHE_ENABLED": "1"})
    checkpoint = checks(result)["checkpoint"]
    assert checkpoint["status"] == "warn" and "only from the NVMe cache" in checkpoint["value"]


def test_a_truncated_checkpoint_fails_the_checkpoint_check(
    published, azurite, container, blob_env, tmp_path, no_driver
):
    # Its listing looks fine: only the shard's header, read and set against its size, tells.
    shard = published / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    upload_directory(azurite, container, published, "cut")
    for source in (f"az://{container}/cut", str(published)):
        result = preflight(
            "--source", source, "--cache-dir", str(tmp_path), "--json", env=no_driver
        )
        assert result.returncode == 1, result.stdout + result.stderr
        checkpoint = checks(result)["checkpoint"]
        assert checkpoint["status"] == "fail" and "not whole" in checkpoint["value"]
        assert shard.name in checkpoint["value"] and "publish" in checkpoint["hint"]


def test_a_model_that_does_not_fit_fails(tmp_path, no_driver):
    result = preflight(
        "--model-bytes", str(10**16), "--cache-dir", str(tmp_path), "--json", env=no_driver
    )
    assert result.returncode == 1
    fit = checks(result)["model_fit"]
    assert fit["status"] == "fail" and fit["data"]["model_bytes"] == 10**16
    assert fit["data"]["need_bytes"] == int(10**16 * 1.1)
    assert "host_headroom_factor" in fit["hint"]


def test_model_fits_on_the_fake_gpu_or_not(fake_driver, tmp_path):
    fits = checks(preflight("--model-bytes", "1GB", "--cache-dir", str(tmp_path), "--json"))
    assert fits["model_fit"]["status"] == "ok" and fits["model_fit"]["data"]["target"] == "cuda:0"
    result = preflight(
        "--device", "cuda", "--model-bytes", str(8 << 30), "--cache-dir", str(tmp_path), "--json"
    )  # the fake GPU has 8 GiB: 8 GiB x 1.1 does not fit
    assert result.returncode == 1
    fit = checks(result)["model_fit"]
    assert fit["status"] == "fail" and "gpu_headroom_factor" in fit["hint"]
    result = preflight(
        "--device", "cuda", "--model-bytes", str(8 << 30), "--cache-dir", str(tmp_path),
        "--json", env={"BLOB2GPU_GPU_HEADROOM_FACTOR": "1.0"},
    )  # fmt: skip
    assert result.returncode == 0 and checks(result)["model_fit"]["status"] == "ok"


def test_gpu_checks_report_the_fake_gpu(fake_driver, tmp_path):
    result = preflight("--device", "cuda", "--cache-dir", str(tmp_path), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    by_name = checks(result)
    assert by_name["cuda_driver"]["status"] == "ok"
    assert by_name["cuda_driver"]["data"]["version"] == "12.8"
    gpu = by_name["gpu:0"]
    assert gpu["status"] == "ok" and gpu["data"]["name"] == "blob2gpu fake GPU 0"
    assert gpu["data"]["total_bytes"] == 8 << 30 and 0 < gpu["data"]["free_bytes"] <= 8 << 30
    pinned = by_name["pinned_memory"]
    assert pinned["status"] == "ok" and pinned["data"]["pinned"] is True
    # The ring a load here would pin: its shape sized from this host (loading/pipelines.py).
    sized = pipeline_settings(resolve(environ={}), "cuda:0")
    assert pinned["data"]["ring_bytes"] == sized["staging_slots"] * sized["staging_slot_bytes"]
    table = preflight("--device", "cuda", "--cache-dir", str(tmp_path)).stdout
    assert "blob2gpu fake GPU 0" in table and "CUDA 12.8" in table


def test_ring_size_comes_from_the_config(fake_driver, tmp_path):
    config = tmp_path / "blob2gpu.yaml"
    config.write_text("staging:\n  staging_slots: 4\n  staging_slot_bytes: 16MiB\n")
    result = preflight("--config", str(config), "--cache-dir", str(tmp_path / "c"), "--json")
    assert checks(result)["pinned_memory"]["data"]["ring_bytes"] == 4 * 16 * (1 << 20)


def test_missing_gpu_fails_only_when_cuda_is_asked_for(tmp_path, no_driver):
    result = preflight("--cache-dir", str(tmp_path), "--json", env=no_driver)
    assert result.returncode == 0
    by_name = checks(result)
    assert {by_name[n]["status"] for n in ("cuda_driver", "gpu", "pinned_memory")} == {"skip"}
    result = preflight("--device", "cuda:0", "--cache-dir", str(tmp_path), "--json", env=no_driver)
    assert result.returncode == 1
    by_name = checks(result)
    assert {by_name[n]["status"] for n in ("cuda_driver", "gpu", "pinned_memory")} == {"fail"}
    assert "BLOB2GPU_CUDA_DRIVER" in by_name["cuda_driver"]["hint"]
    # Classified by the core's typed status, the library named once (not dlerror's repeat).
    driver = by_name["cuda_driver"]
    assert driver["data"]["status"] == "not_found"
    assert driver["value"].startswith("cannot load the CUDA driver '")
    assert driver["value"].count(no_driver["BLOB2GPU_CUDA_DRIVER"]) == 1


def test_an_unreachable_endpoint_is_named_by_the_loads_own_classifier():
    # The storage check says why a listing failed by the transport exception's type, with the
    # function a load's error uses (failures.failure_reason), never by its text: a refused
    # connection whose words are not the usual English ones.
    from types import SimpleNamespace

    from blob2gpu.errors import StorageUnavailable
    from blob2gpu.operations.preflight.storage import _storage_failure
    from blob2gpu.sources.azure.location import BlobLocation

    location = BlobLocation("http://127.0.0.1:9/acct", "acct", "models", "llama")
    source = SimpleNamespace(container=SimpleNamespace(location=location), credential_source="")
    refused = ConnectionRefusedError(111, "Verbindungsaufbau abgelehnt")
    check = _storage_failure(StorageUnavailable("listing: unavailable"), source, refused)
    assert check.status == "fail"
    assert check.value == (
        "http://127.0.0.1:9/acct unreachable: connection refused: nothing listens at 127.0.0.1:9"
    )


def test_cache_dir_checks(tmp_path, no_driver):
    target = tmp_path / "new" / "cache"
    by_name = checks(preflight("--cache-dir", str(target), "--json", env=no_driver))
    assert by_name["cache_dir"]["status"] == "ok" and "created" in by_name["cache_dir"]["value"]
    assert not (tmp_path / "new").exists()  # what the check created is gone again
    assert by_name["cache_free_space"]["status"] == "ok"
    assert by_name["cache_free_space"]["data"]["free_bytes"] > 0
    write = by_name["cache_write"]
    assert write["status"] in ("ok", "warn") and write["data"]["mb_per_s"] > 0
    assert write["data"]["bytes"] == 64 << 20
    read = by_name["cache_read"]  # ext4 and xfs take O_DIRECT; tmpfs would not
    assert read["status"] == "ok" and read["data"]["mb_per_s"] > 0
    assert read["data"]["direct_io"] == ("O_DIRECT" in read["value"])

    existing = tmp_path / "existing"
    existing.mkdir()
    by_name = checks(preflight("--cache-dir", str(existing), "--json", env=no_driver))
    assert by_name["cache_dir"]["status"] == "ok" and list(existing.iterdir()) == []

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = preflight("--cache-dir", str(blocker / "cache"), "--json", env=no_driver)
    assert result.returncode == 1
    cache = checks(result)["cache_dir"]
    assert cache["status"] == "fail" and "cannot create" in cache["value"]
    assert "BLOB2GPU_CACHE_DIR" in cache["hint"]


def test_cache_dir_from_the_environment(tmp_path, no_driver):
    result = preflight("--json", env={**no_driver, "BLOB2GPU_CACHE_DIR": str(tmp_path)})
    assert checks(result)["cache_dir"]["data"]["path"] == str(tmp_path)


def test_local_source_and_model_source_uri(write_checkpoint, tmp_path, no_driver):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (64, 64))}])
    env = {**no_driver, "MODEL_SOURCE_URI": str(directory)}
    by_name = checks(preflight("--cache-dir", str(tmp_path / "c"), "--json", env=env))
    assert by_name["checkpoint"]["status"] == "ok"
    assert by_name["model_fit"]["data"]["model_bytes"] == sum(
        f.stat().st_size for f in directory.glob("*.safetensors")
    )
    result = preflight(
        "--source", str(tmp_path / "missing"), "--cache-dir", str(tmp_path / "c"), "--json",
        env=no_driver,
    )  # fmt: skip
    assert result.returncode == 1 and checks(result)["checkpoint"]["status"] == "fail"


def test_model_fit_counts_on_the_room_under_the_pod_s_memory_limit(tmp_path, monkeypatch):
    # In-process (the driver this process loaded, if any, is left as it is: the check is on the
    # cpu): the cgroup v2 tree is laid out in a directory, as the kernel shows it.
    from blob2gpu.loading import host_memory
    from blob2gpu.operations.preflight import run_preflight

    pod = tmp_path / "cgroup" / "pod"
    pod.mkdir(parents=True)
    (pod / "memory.max").write_text(f"{2 << 30}\n")
    (pod / "memory.current").write_text(f"{1 << 30}\n")
    (tmp_path / "self-cgroup").write_text("0::/pod\n")
    monkeypatch.setattr(host_memory, "CGROUP_ROOT", tmp_path / "cgroup")
    monkeypatch.setattr(host_memory, "PROC_CGROUP", tmp_path / "self-cgroup")
    result = run_preflight(model_bytes=1 << 30, device="cpu", cache_dir=tmp_path / "cache")
    fit = next(c for c in result.checks if c.name == "model_fit")
    assert fit.status == "fail" and fit.data["free_bytes"] == 1 << 30  # 1 GiB x 1.1 > 1 GiB
    assert f"left under this process's memory limit (2.15 GB, {pod / 'memory.max'})" in fit.value
    assert "raise the container's memory limit" in fit.hint
    # host_memory_limit_bytes below what the group leaves binds instead, and says so.
    monkeypatch.setenv("BLOB2GPU_HOST_MEMORY_LIMIT_BYTES", "512MiB")
    result = run_preflight(model_bytes=1 << 20, device="cpu", cache_dir=tmp_path / "cache")
    fit = next(c for c in result.checks if c.name == "model_fit")
    assert fit.status == "ok" and fit.data["free_bytes"] == 512 << 20
    assert "host_memory_limit_bytes allows 0.54 GB" in fit.value
    result = run_preflight(model_bytes=1 << 29, device="cpu", cache_dir=tmp_path / "cache")
    fit = next(c for c in result.checks if c.name == "model_fit")
    assert fit.status == "fail" and "raise host_memory_limit_bytes" in fit.hint


def test_a_cache_directory_others_can_write_fails(tmp_path, no_driver):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone could replace what a load reads
    result = preflight("--cache-dir", str(shared), "--json", env=no_driver)
    assert result.returncode == 1
    check = checks(result)["cache_dir"]
    assert check["status"] == "fail" and "chmod go-w" in check["hint"]
    assert [p.name for p in shared.iterdir()] == []  # no probe written there
    shared.chmod(0o1777)  # shared on purpose: accepted
    assert (
        checks(preflight("--cache-dir", str(shared), "--json", env=no_driver))["cache_dir"][
            "status"
        ]
        == "ok"
    )
