"""vLLM serving through the load format `blob2gpu`, with vLLM's CPU build and a real Azurite.

Tiny transformers models (random bf16 weights, written here, six shards) are published with
`blob2gpu publish`; engines started the way users start them (tests/support/vllm_engine.py, vLLM's
own processes) must generate exactly the greedy tokens of vLLM's default loader on the local
files, for a model with tied embeddings (Qwen2) and one without (Llama); a second start on the
same node reads every shard from the NVMe cache; two tensor-parallel workers share one copy
from Blob; a corrupted shard, a deleted shard or a wrong account key stop the engine's start with
blob2gpu's typed error in its output.

Each engine start costs about a minute on two cores, so the engines of this module start in three
runs of the engine script (one that serves, one whose starts must fail, one with TP=2), shared by
the tests.

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
from pathlib import Path

import pytest

if os.environ.get("BLOB2GPU_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/test_vllm.sh has it)")

from support.tiny_models import write_tiny_model

ENGINE_SCRIPT = Path(__file__).resolve().parents[1] / "support" / "vllm_engine.py"
PROMPTS = [[1, 2, 3, 4], [100, 7, 42], [511, 0, 255, 19, 8]]
ENGINE_RUN_TIMEOUT = 1500  # seconds for one run of the engine script (several engine starts)


def run_engines(cases: list[dict], env: dict[str, str]) -> tuple[str, dict[str, object]]:
    """Run the engine script over `cases`; returns (its whole output, {case name: tokens, or the
    failure line})."""
    for case in cases:
        case.setdefault("prompts", PROMPTS)
    result = subprocess.run(
        [sys.executable, str(ENGINE_SCRIPT), json.dumps(cases)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=ENGINE_RUN_TIMEOUT,
    )
    output = result.stdout
    assert result.returncode == 0, output[-5000:]
    outcomes: dict[str, object] = {}
    for line in output.splitlines():
        if m := re.match(r"== RESULT (\S+) (.*)$", line):
            outcomes[m.group(1)] = json.loads(m.group(2))["tokens"]
        elif m := re.match(r"== FAILED (\S+) (.*)$", line):
            outcomes[m.group(1)] = f"FAILED {m.group(2)}"
    return output, outcomes


def case_output(output: str, name: str) -> str:
    """The part of the engine script's output that belongs to case `name`."""
    start = output.index(f"== CASE {name}\n")
    end = output.find("== CASE ", start + 1)
    return output[start : end if end >= 0 else len(output)]


def publish(directory: Path, uri: str, env: dict[str, str]) -> None:
    """`blob2gpu publish DIRECTORY URI`, as a user publishes a checkpoint."""
    subprocess.run(
        [sys.executable, "-m", "blob2gpu", "publish", str(directory), uri], env=env, check=True
    )


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
    aux = work / "qwen2-aux"
    subprocess.run(
        [sys.executable, "-m", "blob2gpu", "fetch-aux", "az://serving/qwen2", str(aux)],
        env=blob_env,
        check=True,
    )
    assert not list(aux.glob("*.safetensors")) and (aux / "config.json").exists()
    reports = {name: work / f"{name}.json" for name in ("llama-cold", "llama-warm", "qwen2")}
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
        {"name": "qwen2-default", "model": str(models["qwen2"])},
        {
            "name": "qwen2",
            "model": str(aux),
            "load_format": "blob2gpu",
            "extra": {"verify": "crc32c", "report_path": str(reports["qwen2"])},
            "env": {"MODEL_SOURCE_URI": "az://serving/qwen2"},
        },
    ]
    output, outcomes = run_engines(cases, blob_env)
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


def test_each_worker_logs_its_load_report(serving):
    output, _, _ = serving
    for name in ("llama-cold", "llama-warm", "qwen2"):
        assert re.search(r"blob2gpu load \(worker 0, .*\): .* 6 shard", case_output(output, name))


@pytest.fixture(scope="module")
def refused(models, azurite, blob_env):
    """Starts that must fail: a shard corrupted after publishing, a shard deleted, a wrong
    account key. Returns (output, outcomes)."""
    service = azurite.service()
    service.create_container("refused")
    for prefix in ("corrupted", "deleted"):
        publish(models["llama"], f"az://refused/{prefix}", blob_env)
    client = service.get_container_client("refused")
    shard = "model-00003-of-00006.safetensors"
    data = bytearray(client.download_blob(f"corrupted/{shard}").readall())
    data[-100] ^= 0xFF  # a weight byte: the header still parses
    client.upload_blob(f"corrupted/{shard}", bytes(data), overwrite=True)
    client.delete_blob(f"deleted/{shard}")
    wrong_key = azurite.connection_string().replace("AccountKey=", "AccountKey=AAAA")
    llama = str(models["llama"])
    cases = [
        {
            "name": name,
            "model": llama,
            "load_format": "blob2gpu",
            "extra": {"source": f"az://refused/{prefix}"},
            "env": env,
        }
        for name, prefix, env in (
            ("corrupted", "corrupted", {}),
            ("deleted", "deleted", {}),
            ("wrong-key", "corrupted", {"AZURE_STORAGE_CONNECTION_STRING": wrong_key}),
        )
    ]
    return run_engines(cases, blob_env)


@pytest.mark.parametrize(
    ("case", "error", "names"),
    [
        ("corrupted", "ChecksumMismatch", "model-00003-of-00006.safetensors"),
        ("deleted", "SourceUnavailable", "model-00003-of-00006.safetensors"),
        ("wrong-key", "AccessDenied", "refused"),
    ],
)
def test_engine_refuses_to_start(refused, case, error, names):
    output, outcomes = refused
    assert str(outcomes[case]).startswith("FAILED"), outcomes[case]
    text = case_output(output, case)
    assert f"blob2gpu.errors.{error}" in text, text[-4000:]
    assert names in text


def test_tensor_parallel_workers_share_one_copy_from_blob(serving, models, blob_env, tmp_path):
    # vLLM's CPU build runs TP=2 here with one core per worker. Both workers load through the
    # fan-out over vLLM's tensor-parallel group (its byte accounting: test_distributed.py).
    publish(models["llama"], "az://serving/llama-tp", blob_env)
    report = tmp_path / "tp-{rank}.json"
    case = {
        "name": "llama-tp2",
        "model": str(models["llama"]),
        "load_format": "blob2gpu",
        "tensor_parallel_size": 2,
        "extra": {"source": "az://serving/llama-tp", "report_path": str(report)},
        "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        "prompts": PROMPTS[:2],
    }
    output, outcomes = run_engines([case], blob_env)
    _, served, _ = serving
    assert outcomes["llama-tp2"] == served["llama-default"][:2]  # vLLM's TP=1 default loader
    for rank in (0, 1):
        assert f"blob2gpu load (worker {rank}, shared with the tensor-parallel group)" in output
        written = json.loads((tmp_path / f"tp-{rank}.json").read_text())
        assert written["source"] == "azure-blob" and written["shard_count"] == 6
