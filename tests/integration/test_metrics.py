"""Prometheus metrics: loads, bytes, seconds, throughput, storage retries, the GPU memory peak and
first-token latency move in the registry after real loads; without prometheus_client, nothing
breaks."""

from __future__ import annotations

import subprocess
import sys

import blob2gpu
import pytest
import torch
from blob2gpu.operations import metrics
from conftest import random_tensor, upload_directory
from prometheus_client import CollectorRegistry

FAST_RETRIES = {"retry_backoff_seconds": 0.01, "retry_backoff_max_seconds": 0.02}


@pytest.fixture
def registry():
    """A fresh registry for blob2gpu's metrics during the test; the previous one after."""
    saved = metrics._registry, metrics._metrics
    reg = CollectorRegistry()
    metrics.use_registry(reg)
    yield reg
    metrics._registry, metrics._metrics = saved


def load(uri, device, **settings):
    framework = "torch" if device == "cpu" else "dlpack"
    with blob2gpu.open(str(uri), device=device, framework=framework, **settings) as checkpoint:
        checkpoint.to_dict()
        return checkpoint.report


@pytest.fixture
def checkpoint_dir(write_checkpoint):
    return write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float32, (128, 128), s)} for s in range(2)]
    )


def test_a_load_moves_the_counters(device, registry, checkpoint_dir):
    assert metrics.registry() is registry
    labels = {"device": "cpu" if device == "cpu" else "cuda:0", "source": "local"}
    labels["strategy"] = "cpu" if device == "cpu" else "direct-gpu"
    assert registry.get_sample_value("blob2gpu_loads_total", labels) is None
    report = load(checkpoint_dir, device)
    report2 = load(checkpoint_dir, device)
    assert registry.get_sample_value("blob2gpu_loads_total", labels) == 2
    assert registry.get_sample_value("blob2gpu_load_bytes_total") == report.bytes + report2.bytes
    assert registry.get_sample_value("blob2gpu_load_seconds_count") == 2
    assert registry.get_sample_value("blob2gpu_load_seconds_sum") == pytest.approx(
        report.seconds + report2.seconds
    )
    assert registry.get_sample_value("blob2gpu_load_throughput_gbps") == pytest.approx(
        report2.throughput_gbps
    )
    assert registry.get_sample_value("blob2gpu_storage_retries_total") == 0
    peak = registry.get_sample_value("blob2gpu_gpu_memory_peak_used_bytes")
    if device == "cpu":
        assert peak == 0  # never set: no GPU in a cpu load
    else:
        assert report2.gpu_memory_peak_used is not None and report2.gpu_memory_peak_used > 0
        assert peak == report2.gpu_memory_peak_used


def test_host_staging_is_labelled(fake_driver, registry, checkpoint_dir):
    load(checkpoint_dir, "cuda", direct_gpu_load=False)
    labels = {"device": "cuda:0", "source": "local", "strategy": "host-staging"}
    assert registry.get_sample_value("blob2gpu_loads_total", labels) == 1


def test_storage_retries_are_counted(
    registry, checkpoint_dir, azurite, container, fault_proxy, monkeypatch
):
    upload_directory(azurite, container, checkpoint_dir, "m")
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    fault_proxy.faults.statuses = 2  # two ranged GETs answered 503, then retried
    report = load(f"az://{container}/m", "cpu", chunk_bytes=32768, **FAST_RETRIES)
    assert report.retries == 2
    assert registry.get_sample_value("blob2gpu_storage_retries_total") == 2
    waited = registry.get_sample_value("blob2gpu_storage_retry_wait_seconds_total")
    assert waited == pytest.approx(report.retry_wait_seconds) and waited > 0
    labels = {"device": "cpu", "source": "azure-blob", "strategy": "cpu"}
    assert registry.get_sample_value("blob2gpu_loads_total", labels) == 1


def test_first_token_latency_is_observed(registry, checkpoint_dir):
    report = load(checkpoint_dir, "cpu")
    seconds = report.mark_first_token()
    assert registry.get_sample_value("blob2gpu_first_token_seconds_count") == 1
    assert registry.get_sample_value("blob2gpu_first_token_seconds_sum") == pytest.approx(seconds)
    quiet = load(checkpoint_dir, "cpu", emit_first_token_latency=False)
    quiet.mark_first_token()
    assert registry.get_sample_value("blob2gpu_first_token_seconds_count") == 1


def test_the_default_registry_is_prometheus_clients(checkpoint_dir):
    code = (
        "import blob2gpu, prometheus_client\n"
        "from blob2gpu.operations import metrics\n"
        f"blob2gpu.load({str(checkpoint_dir)!r})\n"
        "assert metrics.registry() is prometheus_client.REGISTRY\n"
        "print(prometheus_client.generate_latest().decode())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert 'blob2gpu_loads_total{device="cpu",source="local",strategy="cpu"} 1.0' in result.stdout
    assert "blob2gpu_load_seconds_bucket" in result.stdout


def test_without_prometheus_client_metrics_are_no_ops(checkpoint_dir):
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import blob2gpu\n"
        "from blob2gpu.operations import metrics\n"
        f"with blob2gpu.open({str(checkpoint_dir)!r}) as c:\n"
        "    c.to_dict()\n"
        "c.report.mark_first_token()\n"
        "assert not metrics.available() and metrics.registry() is None\n"
        "print('loaded', c.report.tensors)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded 2"
