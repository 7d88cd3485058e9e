"""Expert parallelism in vLLM through the load format `blob2gpu`: each worker reads the dense
tensors and only its own experts, as vLLM's default loader does with --enable-ep-weight-filter.

The model is a tiny Mixtral (tests/support/tiny_models.py: 8 experts per layer, one tensor per
expert, 83% of its bytes), published with `blob2gpu publish` in 64 KiB manifest chunks, so that
a selection's verified reads stay close to its tensors. vLLM's CPU build (0.32) starts it with
expert parallelism over two workers (tensor_parallel_size=2 with enable_expert_parallel: EP size
2, experts 0-3 of each layer on worker 0, 4-7 on worker 1) and loads it, but cannot generate
with it: its CPU MoE kernel (cpu_fused_moe) takes no expert map, so the first token routed to
an expert of the other worker reads past the local weights and kills the worker. The EP engines
here therefore compare what generation would use: each worker's parameters after loading (a
SHA-256 per parameter) with vLLM's default loader under the same flags; the model's tokens are
compared without expert parallelism (one worker). Data-parallel EP (the other way vLLM spreads
experts) is not run: vLLM's LLM() refuses data_parallel_size > 1 in one process; blob2gpu asks
vLLM's own code for the worker's experts (integrations/vllm/expert_parallel.py), which counts
data-parallel ranks the same way.

These tests need vLLM's environment (scripts/test_vllm.sh); elsewhere they are skipped.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest

if os.environ.get("BLOB2GPU_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/test_vllm.sh has it)")

from support.fault_proxy import FaultProxy
from support.tiny_models import write_tiny_model
from support.vllm_engine import case_digests, case_output, publish, run_engines

EXPERTS = 8
CHUNK_BYTES = 65536  # the manifest's chunks: a verified selection reads whole chunks
EXPERT_ID = re.compile(r"\.experts\.(\d+)\.")


def tensor_bytes(directory: Path) -> dict[str, int]:
    """{tensor name: its data bytes} of every shard of the checkpoint in `directory`."""
    sizes = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with open(shard, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                sizes[name] = end - begin
    return sizes


def owned_by(rank: int, name: str) -> bool:
    """Whether worker `rank` of two reads tensor `name`: every tensor but the per-expert weights
    of experts the other worker owns (vLLM's linear placement: 0-3, then 4-7)."""
    m = EXPERT_ID.search(name)
    return m is None or int(m.group(1)) // (EXPERTS // 2) == rank


def test_vllm_decides_expert_ownership_where_blob2gpu_asks():
    # The vLLM functions and config fields integrations/vllm/expert_parallel.py uses (vLLM
    # 0.32.0; the EP tests below check it decides as vLLM's own loader). If this fails after
    # a vLLM upgrade, that vLLM moved them: blob2gpu then reads every expert (the fallback,
    # logged) until expert_parallel.py follows.
    import inspect

    import vllm
    from vllm.config import ParallelConfig
    from vllm.model_executor.model_loader.ep_weight_filter import (
        compute_local_expert_ids,
        should_skip_weight,
    )

    assert list(inspect.signature(compute_local_expert_ids).parameters) == [
        "num_experts",
        "ep_size",
        "ep_rank",
        "placement",
    ], f"vLLM {vllm.__version__}"
    assert list(inspect.signature(should_skip_weight).parameters) == [
        "weight_name",
        "local_expert_ids",
    ]
    fields = set(ParallelConfig.__dataclass_fields__)
    assert {
        "enable_expert_parallel",
        "enable_ep_weight_filter",
        "enable_eplb",
        "data_parallel_size",
        "tensor_parallel_size",
        "prefill_context_parallel_size",
        "expert_placement_strategy",
    } <= fields


def test_a_worker_keeps_everything_but_the_other_workers_expert_weights():
    from blob2gpu.integrations.vllm.expert_parallel import OwnedExperts
    from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight

    first = OwnedExperts(frozenset({0, 1, 2, 3}), 8, should_skip_weight)
    layer = "model.layers.0.block_sparse_moe"
    assert first.keeps(f"{layer}.experts.3.w1.weight")
    assert not first.keeps(f"{layer}.experts.4.w1.weight")
    assert first.keeps(f"{layer}.experts.4.w1.weight_scale")  # scales: every worker's
    assert first.keeps("model.layers.0.mlp.experts.gate_up_proj")  # fused 3D: read whole
    assert first.keeps("model.layers.0.mlp.shared_expert.up_proj.weight")
    assert first.keeps(f"{layer}.gate.weight") and first.keeps("lm_head.weight")
    assert str(first) == "experts 0-3 of 8"
    odd = OwnedExperts(frozenset({1, 3, 5, 7}), 8, should_skip_weight)  # round-robin placement
    assert str(odd) == "experts 1, 3, 5, 7 of 8"


def test_a_vllm_without_the_ep_weight_filter_reads_every_expert(monkeypatch, caplog):
    # A vLLM from before the filter (its module does not import): no selection, every expert
    # read, and the worker's log says so.
    import logging
    import sys

    from blob2gpu.integrations.vllm.expert_parallel import owned_experts
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config

    monkeypatch.setitem(sys.modules, "vllm.model_executor.model_loader.ep_weight_filter", None)
    caplog.set_level(logging.INFO, logger="vllm.blob2gpu")
    config = VllmConfig(parallel_config=ParallelConfig(enable_expert_parallel=True))
    with set_current_vllm_config(config):
        assert owned_experts(model_config=None) is None
    assert "every worker reads every expert" in caplog.text


@pytest.fixture(scope="module")
def moe(tmp_path_factory, azurite):
    """Publish the tiny Mixtral, then start: vLLM's default loader and blob2gpu from Blob on one
    worker (tokens); and with expert parallelism over two workers (parameter digests): vLLM's
    default loader, blob2gpu with each worker loading on its own, and blob2gpu with the
    tensor-parallel fan-out. Each blob2gpu EP engine reads through a fault proxy of its own that
    counts its bytes. Returns (output, outcomes, the model's directory, report files, proxies)."""
    directory = write_tiny_model(tmp_path_factory.mktemp("vllm-moe") / "mixtral", "mixtral")
    env = dict(
        os.environ,
        AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string(),
        VLLM_CPU_KVCACHE_SPACE="1",
    )
    azurite.service().create_container("experts")
    publish(directory, "az://experts/mixtral", env, "--chunk-bytes", str(CHUNK_BYTES))
    work = tmp_path_factory.mktemp("vllm-moe-reports")
    reports = {name: str(work / f"{name}-{{rank}}.json") for name in ("moe", "ep", "ep-fan-out")}
    proxies = {name: FaultProxy(azurite.port) for name in ("ep", "ep-fan-out")}
    expert_parallel = {
        "tensor_parallel_size": 2,
        "engine_args": {"enable_expert_parallel": True, "enable_ep_weight_filter": True},
        "digests": True,
        "generate": False,
    }
    ep_env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    blob = {"load_format": "blob2gpu", "model": str(directory)}
    cases = [
        {"name": "moe-default", "model": str(directory)},
        dict(
            blob,
            name="moe",
            extra={"source": "az://experts/mixtral", "report_path": reports["moe"]},
        ),
        dict(expert_parallel, name="ep-default", model=str(directory), env=ep_env),
    ]
    for name, distributed in (("ep", False), ("ep-fan-out", True)):
        through = azurite.connection_string(port=proxies[name].port)
        extra = {
            "source": "az://experts/mixtral",
            "report_path": reports[name],
            "distributed": distributed,
            # Ranges of 64 KiB: a shard's first range (its header, and the data after it up to
            # 1 MiB on the CPU) is then small beside its ~1 MB, as it is beside a real shard's GBs.
            "chunk_bytes": CHUNK_BYTES,
        }
        cases.append(
            dict(
                blob,
                **expert_parallel,
                name=name,
                extra=extra,
                env=dict(ep_env, AZURE_STORAGE_CONNECTION_STRING=through),
            )
        )
    try:
        output, outcomes = run_engines(cases, env)
    finally:
        for proxy in proxies.values():
            proxy.stop()
    return output, outcomes, directory, reports, proxies


def worker_report(reports: dict[str, str], case: str, rank: int) -> dict:
    return json.loads(Path(reports[case].replace("{rank}", str(rank))).read_text())


def test_moe_model_from_blob_generates_the_default_loaders_tokens(moe):
    _, outcomes, directory, reports, _ = moe
    assert isinstance(outcomes["moe-default"], list), outcomes["moe-default"]
    assert outcomes["moe"] == outcomes["moe-default"]
    report = worker_report(reports, "moe", 0)
    assert report["tensors"] == len(tensor_bytes(directory))  # one worker: every expert


def test_each_expert_parallel_worker_holds_the_default_loaders_parameters(moe):
    output, outcomes, _, _, _ = moe
    for case in ("ep-default", "ep", "ep-fan-out"):
        assert outcomes[case] is None, case_output(output, case)[-4000:]  # started and loaded
    expected = case_digests(output, "ep-default")
    assert len(expected) == 2
    # The workers hold different experts (else expert parallelism was not on).
    experts = [n for n in expected[0] if "experts" in n]
    assert experts and all(expected[0][n] != expected[1][n] for n in experts)
    assert case_digests(output, "ep") == expected
    assert case_digests(output, "ep-fan-out") == expected


def test_each_expert_parallel_worker_reads_the_dense_tensors_and_its_own_experts(moe):
    output, _, directory, reports, proxies = moe
    sizes = tensor_bytes(directory)
    expert_bytes = sum(size for name, size in sizes.items() if EXPERT_ID.search(name))
    assert expert_bytes > 0.8 * sum(sizes.values())
    read = []
    for rank in (0, 1):
        report = worker_report(reports, "ep", rank)
        mine = {name: size for name, size in sizes.items() if owned_by(rank, name)}
        assert report["tensors"] == len(mine)
        # Its tensors, plus headers and the edges of 64 KiB verified chunks: far from the
        # other worker's half of the experts.
        assert sum(mine.values()) <= report["bytes"] < sum(mine.values()) + expert_bytes / 8
        read.append(report["bytes"])
        experts = f"experts {4 * rank}-{4 * rank + 3} of 8"
        assert f"blob2gpu load (worker {rank}, from its source, {experts})" in output
    # What the account served: those reads (and the headers read to size the selection).
    served = proxies["ep"].counters.range_bytes
    assert sum(read) <= served <= sum(read) + 2 * 8 * 65536, (served, read)


def test_expert_parallel_fan_out_fetches_one_copy_and_each_worker_keeps_its_own_experts(moe):
    output, _, directory, reports, proxies = moe
    sizes = tensor_bytes(directory)
    for rank in (0, 1):
        report = worker_report(reports, "ep-fan-out", rank)
        assert report["tensors"] == len([n for n in sizes if owned_by(rank, n)])
        experts = f"experts {4 * rank}-{4 * rank + 3} of 8"
        how = f"shared with the tensor-parallel group, {experts}"
        assert f"blob2gpu load (worker {rank}, {how})" in output
    # Every shard holds some worker's tensors: the group reads each once, half each.
    checkpoint = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    served = proxies["ep-fan-out"].counters.range_bytes
    assert checkpoint <= served < checkpoint + 64 * 1024, (served, checkpoint)
