"""vLLM serving through the load format `blob2gpu`, with vLLM's CPU build and a real Azurite.

Tiny transformers models (random bf16 weights, written here, six shards) are published with
`blob2gpu publish`; engines started the way users start them (tests/support/vllm_engine.py, vLLM's
own processes) must generate exactly the greedy tokens of vLLM's default loader on the local
files, for a model with tied embeddings (Qwen2) and one without (Llama); a second start on the
same node reads every shard from the NVMe cache; two and four tensor-parallel workers share one
copy from Blob; a corrupted shard, a deleted shard or a wrong account key stop the engine's start
with blob2gpu's typed error in its output.

Each engine start costs about a minute on two cores, so the engines of this module start in few
runs of the engine script (one that serves, one whose starts must fail, shared by the tests, and
one each with TP=2 and TP=4).

These tests need vLLM, which pins its own torch: .ci/run runs them in an environment of their
own (scripts/test_vllm.sh), where BLOB2GPU_REQUIRE_VLLM=1 makes a missing vLLM a failure. Without
it (the main test environment) they are skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

if os.environ.get("BLOB2GPU_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/test_vllm.sh has it)")

from support.fault_proxy import FaultProxy
from support.tiny_models import write_tiny_model
from support.vllm_engine import PROMPTS, case_output, publish, run_engines


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-models")
    return {arch: write_tiny_model(root / arch, arch) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def blob_env(azurite) -> dict[str, str]:
    """The environment of the engines and the CLI: Azurite's account, vLLM on the CPU."""
    return dict(
        os.environ,
        AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string(),
        VLLM_CPU_KVCACHE_SPACE="1",
    )


@pytest.fixture(scope="module")
def serving(models, azurite, blob_env, tmp_path_factory):
    """Publish both models, then start: vLLM's default loader on the local files of each; the
    Llama from Blob through the `source` option twice with the NVMe cache on (the second start
    is the node's next start); the Qwen2 as a Kubernetes pod does, config fetched by
    `blob2gpu fetch-aux` and the source in $MODEL_SOURCE_URI. Returns (output, outcomes,
    {name: report file})."""
    azurite.service().create_container("serving")
    for arch, directory in models.items():
        publish(directory, f"az://serving/{arch}", blob_env)
    work = tmp_path_factory.mktemp("vllm-serving")
    (work / "prometheus").mkdir()
    aux = work / "qwen2-aux"
    subprocess.run(
        [sys.executable, "-m", "blob2gpu", "fetch-aux", "az://serving/qwen2", str(aux)],
        env=blob_env,
        check=True,
    )
    assert not list(aux.glob("*.safetensors")) and (aux / "config.json").exists()
    reports = {
        name: work / f"{name}.json"
        for name in ("llama-cold", "llama-warm", "llama-forged", "qwen2")
    }
    llama_extra = {
        "source": "az://serving/llama",
        "local_nvme_cache_enabled": True,
        "cache_dir": str(work / "nvme-cache"),
    }
    cases = [
        {"name": "llama-default", "model": str(models["llama"])},
        {
            "name": "llama-cold",
            "model": str(models["llama"]),
            "load_format": "blob2gpu",
            "extra": dict(llama_extra, report_path=str(reports["llama-cold"])),
        },
        {
            "name": "llama-warm",
            "model": str(models["llama"]),
            "load_format": "blob2gpu",
            "extra": dict(llama_extra, report_path=str(reports["llama-warm"])),
        },
        {
            "name": "llama-forged",
            "model": str(models["llama"]),
            "load_format": "blob2gpu",
            "extra": dict(llama_extra, report_path=str(reports["llama-forged"])),
            "forge_cache": {"dir": llama_extra["cache_dir"], "entries": 2},
        },
        {"name": "qwen2-default", "model": str(models["qwen2"])},
        {
            "name": "qwen2",
            "model": str(aux),
            "load_format": "blob2gpu",
            "extra": {"verify": "crc32c", "report_path": str(reports["qwen2"])},
            "env": {"MODEL_SOURCE_URI": "az://serving/qwen2"},
        },
    ]
    # prometheus_client's multiprocess mode, as `vllm serve --api-server-count 2` sets it up (or a
    # user, for one API server): every vLLM process writes its metrics there.
    env = dict(blob_env, PROMETHEUS_MULTIPROC_DIR=str(work / "prometheus"))
    output, outcomes = run_engines(cases, env)
    return output, outcomes, reports


def test_blob_load_generates_the_default_loaders_tokens_untied_embeddings(serving):
    _, outcomes, reports = serving
    assert isinstance(outcomes["llama-default"], list), outcomes["llama-default"]
    assert outcomes["llama-cold"] == outcomes["llama-default"]
    report = json.loads(reports["llama-cold"].read_text())
    assert report["source"] == "azure-blob" and report["verification"] == "crc32c"
    assert report["shard_count"] == 6 and not any(s["cache_hit"] for s in report["shards"])


def test_blob_load_generates_the_default_loaders_tokens_tied_embeddings(serving, models):
    _, outcomes, reports = serving
    index = json.loads((models["qwen2"] / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: the head is the embedding
    assert isinstance(outcomes["qwen2-default"], list), outcomes["qwen2-default"]
    assert outcomes["qwen2"] == outcomes["qwen2-default"]
    report = json.loads(reports["qwen2"].read_text())
    assert report["source"] == "azure-blob" and report["uri"].endswith("/qwen2")


def test_second_start_reads_every_shard_from_the_nvme_cache(serving):
    _, outcomes, reports = serving
    assert outcomes["llama-warm"] == outcomes["llama-default"]
    cold = json.loads(reports["llama-cold"].read_text())
    warm = json.loads(reports["llama-warm"].read_text())
    assert len(cold["cache_written"]) == 6
    assert [s["cache_hit"] for s in warm["shards"]] == [True] * 6
    assert warm["requests"] < cold["requests"]  # only the listing and manifest from Blob


def test_a_start_fetches_forged_cache_entries_again_from_blob(serving):
    # Two entries of the node's cache hold other weights, their records recomputed to match:
    # the manifest from Blob tells, and the worker fetches those shards again within its load.
    _, outcomes, reports = serving
    assert outcomes["llama-forged"] == outcomes["llama-default"]
    forged = json.loads(reports["llama-forged"].read_text())
    assert len(forged["cache_repaired"]) == 2 and forged["verification"] == "crc32c"
    assert sum(s["cache_hit"] for s in forged["shards"]) == 4 and forged["shard_count"] == 6


def test_each_worker_logs_its_load_report(serving):
    output, _, _ = serving
    for name in ("llama-cold", "llama-warm", "llama-forged", "qwen2"):
        assert re.search(r"blob2gpu load \(worker 0, .*\): .* 6 shard", case_output(output, name))


def test_worker_load_metrics_are_in_vllms_metrics_registry(serving, monkeypatch):
    # The registry vLLM's API server serves at /metrics in multiprocess mode
    # (vllm/entrypoints/serve/instrumentator/metrics.py: get_prometheus_registry()), read from
    # the directory the engines' processes wrote: the four loads of the workers are there.
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    _, _, reports = serving
    written = [json.loads(path.read_text()) for path in reports.values()]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(reports["qwen2"].parent / "prometheus"))
    text = generate_latest(get_prometheus_registry()).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    loads = {labels: v for (name, labels), v in samples.items() if name == "blob2gpu_loads_total"}
    assert sum(loads.values()) == 4, loads  # llama cold, warm, forged, qwen2; not the defaults
    assert all(dict(labels)["device"] == "cpu" for labels in loads)
    assert samples[("blob2gpu_load_seconds_count", ())] == 4
    assert samples[("blob2gpu_load_bytes_total", ())] == sum(r["bytes"] for r in written)
    assert samples[("blob2gpu_load_throughput_gbps", ())] > 0


@pytest.fixture(scope="module")
def refused(models, azurite, blob_env):
    """Starts that must fail: a shard corrupted after publishing, a shard deleted, a wrong
    account key, a blob overwritten mid-load, a model over the host memory limit, a bad extra
    config. Returns (output, outcomes, {name: the fault proxy of that case})."""
    service = azurite.service()
    service.create_container("refused")
    for prefix in ("corrupted", "deleted", "changed"):
        publish(models["llama"], f"az://refused/{prefix}", blob_env)
    client = service.get_container_client("refused")
    shard = "model-00003-of-00006.safetensors"
    data = bytearray(client.download_blob(f"corrupted/{shard}").readall())
    data[-100] ^= 0xFF  # a weight byte: the header still parses
    client.upload_blob(f"corrupted/{shard}", bytes(data), overwrite=True)
    client.delete_blob(f"deleted/{shard}")
    wrong_key = azurite.connection_string().replace("AccountKey=", "AccountKey=AAAA")
    proxies = {name: FaultProxy(azurite.port) for name in ("changed", "bad-extra")}
    # One GET at a time (prefetch_concurrency 1): the six headers, then the shards' data in
    # order. When the first shard's data is asked for, the last shard is overwritten (with the
    # fifth's bytes); every GET waits for that, so what follows sees only the new version.
    seen: list[str] = []
    overwrite = threading.Lock()

    def overwrite_last_shard_mid_load(path: str, count: int) -> None:
        with overwrite:
            seen.append(path)
            if path.endswith("model-00001-of-00006.safetensors") and seen.count(path) == 2:
                fifth = client.download_blob("changed/model-00005-of-00006.safetensors")
                client.upload_blob(
                    "changed/model-00006-of-00006.safetensors", fifth.readall(), overwrite=True
                )

    proxies["changed"].faults.on_range_get = overwrite_last_shard_mid_load
    llama = str(models["llama"])
    blob = {"load_format": "blob2gpu", "model": llama}
    cases = [
        dict(blob, name=name, extra={"source": f"az://refused/{prefix}"}, env=env)
        for name, prefix, env in (
            ("corrupted", "corrupted", {}),
            ("deleted", "deleted", {}),
            ("wrong-key", "corrupted", {"AZURE_STORAGE_CONNECTION_STRING": wrong_key}),
        )
    ]
    via = {
        name: {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string(port=proxy.port)}
        for name, proxy in proxies.items()
    }
    cases += [
        dict(
            blob,
            name="changed",
            extra={
                "source": "az://refused/changed",
                "prefetch_concurrency": 1,
                "chunk_bytes": 65536,
            },
            env=via["changed"],
        ),
        # The CPU build's device is host memory, which cannot be exhausted on purpose here:
        # the memory-fit check refuses against a limit (a container's) smaller than the model.
        dict(blob, name="does-not-fit", extra={"host_memory_limit_bytes": "1MiB"}),
        dict(
            blob,
            name="bad-extra",
            extra={
                "source": "az://refused/changed",
                "prefetch_concurency": 4,
                "chunk_bytes": "large",
            },
            env=via["bad-extra"],
        ),
    ]
    try:
        output, outcomes = run_engines(cases, blob_env)
    finally:
        for proxy in proxies.values():
            proxy.stop()
    return output, outcomes, proxies


@pytest.mark.parametrize(
    ("case", "error", "names"),
    [
        ("corrupted", "ChecksumMismatch", ["model-00003-of-00006.safetensors"]),
        ("deleted", "SourceUnavailable", ["model-00003-of-00006.safetensors"]),
        ("wrong-key", "AccessDenied", ["refused"]),
        ("changed", "BlobChanged", ["model-00006-of-00006.safetensors", "load again"]),
        ("does-not-fit", "InsufficientHostMemory", ["host_memory_limit_bytes allows 1.05 MB"]),
        (
            "bad-extra",
            "ConfigError",
            ["'prefetch_concurency' from argument (did you mean", "'chunk_bytes'", "'large'"],
        ),
    ],
)
def test_engine_refuses_to_start(refused, case, error, names):
    output, outcomes, _ = refused
    assert str(outcomes[case]).startswith("FAILED"), outcomes[case]
    text = case_output(output, case)
    assert f"blob2gpu.errors.{error}" in text, text[-4000:]
    for name in names:
        assert name in text, (name, text[-4000:])
    assert "blob2gpu load (worker" not in text  # no load completed


def test_blob_changed_mid_load_stops_after_the_first_shards_were_handed_over(refused):
    # The overwrite came after the first shard's data was asked for: the model had weights of
    # the old version when the change was found, and the engine still did not start.
    _, _, proxies = refused
    gets = [p.rsplit("/", 1)[-1] for p in proxies["changed"].counters.paths]
    paths = [p for p in gets if p.endswith(".safetensors")]  # not the index
    first_data = paths.index("model-00001-of-00006.safetensors", 1)
    assert paths[:6] == [f"model-0000{i}-of-00006.safetensors" for i in range(1, 7)]
    assert "model-00006-of-00006.safetensors" in paths[first_data + 1 :]


def test_a_bad_extra_config_stops_the_start_before_any_request(refused):
    _, _, proxies = refused
    assert proxies["bad-extra"].counters.requests == 0


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_workers_share_one_copy_from_blob(tp, serving, models, blob_env, tmp_path):
    # vLLM's CPU build runs TP=2 and TP=4 here on two cores. The workers load through the
    # fan-out over vLLM's tensor-parallel group (its byte accounting: test_distributed.py): each
    # fetches and lands its part of the published (manifest-checked) checkpoint, and the group's
    # communicator (gloo on the CPU build; NCCL on GPUs, the same code) puts the rest in its memory.
    publish(models["llama"], f"az://serving/llama-tp{tp}", blob_env)
    report = tmp_path / "tp-{rank}.json"
    case = {
        "name": f"llama-tp{tp}",
        "model": str(models["llama"]),
        "load_format": "blob2gpu",
        "tensor_parallel_size": tp,
        "extra": {"source": f"az://serving/llama-tp{tp}", "report_path": str(report)},
        "env": {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(r % 2) for r in range(tp))},
        "prompts": PROMPTS[:2],
    }
    output, outcomes = run_engines([case], blob_env)
    _, served, _ = serving
    assert outcomes[f"llama-tp{tp}"] == served["llama-default"][:2]  # TP=1, default loader
    shards = sorted(models["llama"].glob("*.safetensors"))
    data = sum(f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") for f in shards)
    landed = []
    for rank in range(tp):
        assert f"blob2gpu load (worker {rank}, shared with the tensor-parallel group)" in output
        written = json.loads((tmp_path / f"tp-{rank}.json").read_text())
        assert written["source"] == "azure-blob" and written["shard_count"] == 6
        assert written["group_received_bytes"] == data - written["group_landed_bytes"]
        landed.append(written["group_landed_bytes"])
    assert sum(landed) == data and sum(n > 0 for n in landed) >= 2  # each part landed once
