"""The LoadReport: the case study's phases in order, bytes that add up, per-shard numbers, the GPU
memory watermark, first-token p50/p95 across loads, and a structured log record."""

from __future__ import annotations

import json
import logging

import blob2gpu
import torch
from blob2gpu.operations.report import LoadReport, first_token_percentiles
from conftest import random_tensor


def test_phases_are_ordered_and_bytes_add_up(device, write_checkpoint):
    directory = write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float16, (256, 64), seed=s)} for s in range(3)]
    )
    framework = "torch" if device == "cpu" else "dlpack"
    with blob2gpu.open(str(directory), device=device, framework=framework) as checkpoint:
        checkpoint.to_dict()
        report = checkpoint.report
        done, total = checkpoint.progress()
    files = sorted(directory.glob("*.safetensors"))
    assert done == total == sum(f.stat().st_size for f in files)
    assert report.bytes == total == sum(s.bytes for s in report.shards)
    assert [s.name for s in sorted(report.shards, key=lambda s: s.name)] == [f.name for f in files]
    p = report.phases
    assert 0.0 == p["artifact_fetch_start"] <= p["artifact_fetch_complete"]
    assert p["artifact_fetch_complete"] <= p["host_staging_complete"] <= p["model_load_complete"]
    assert report.seconds == p["model_load_complete"] > 0
    for s in report.shards:
        assert 0 <= s.started <= s.header_parsed <= s.published <= report.seconds
    assert p["first_token"] is None
    assert report.mark_first_token() >= p["model_load_complete"]
    d = json.loads(report.to_json())
    assert d["bytes"] == total and d["shard_count"] == 3 and d["device"].startswith(device)
    assert d["phases"]["first_token"] == p["first_token"]


def test_gpu_memory_watermark(fake_driver, write_checkpoint):
    directory = write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float32, (512, 256), seed=s)} for s in range(3)]
    )  # 3 x 512 KiB
    with blob2gpu.open(str(directory), device="cuda", framework="dlpack") as checkpoint:
        tensors = checkpoint.to_dict()
        report = checkpoint.report
    weights = 3 * 512 * 256 * 4
    assert report.gpu_memory_total == 8 << 30
    assert report.gpu_memory_free_before - report.gpu_memory_free_min >= weights
    assert report.gpu_memory_peak_used >= weights
    assert report.gpu_memory_free_after <= report.gpu_memory_free_before - weights
    del tensors
    with blob2gpu.open(
        str(directory), device="cuda", framework="dlpack", emit_gpu_memory_watermark=False
    ) as checkpoint:
        checkpoint.to_dict()
        assert checkpoint.report.gpu_memory_free_min is None


def test_host_populate_seconds_counts_making_new_host_memory_resident(
    fake_driver, write_checkpoint
):
    directory = write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float32, (1024, 1024), seed=s)} for s in range(2)]
    )  # 2 x 4 MiB: arenas of whole huge pages
    with blob2gpu.open(str(directory), device="cpu", mmap_local_files=False) as checkpoint:
        checkpoint.to_dict()
        assert checkpoint.report.host_populate_seconds > 0  # read into new memory
    with blob2gpu.open(str(directory), device="cpu", mmap_local_files=True) as checkpoint:
        checkpoint.to_dict()
        assert checkpoint.report.host_populate_seconds == 0  # the files are mapped
    fake_driver.reset_counters()
    with blob2gpu.open(str(directory), device="cuda", framework="dlpack") as checkpoint:
        checkpoint.to_dict()
        assert checkpoint.report.host_populate_seconds == 0  # lands in the staging ring
    # What the fake driver did in a GPU's place (resident device memory, the copies) is counted
    # apart, for the benchmarks to take out.
    assert fake_driver.emulation_cpu_seconds() > 0
    fake_driver.reset_counters()
    assert fake_driver.emulation_cpu_seconds() == 0


def test_first_token_percentiles_across_loads(write_checkpoint):
    directory = write_checkpoint([{"w": torch.ones(4)}])
    before = first_token_percentiles()["count"]
    for _ in range(5):
        with blob2gpu.open(str(directory)) as checkpoint:
            checkpoint.to_dict()
            checkpoint.report.mark_first_token()
    stats = first_token_percentiles()
    assert stats["count"] == before + 5
    assert 0 < stats["p50"] <= stats["p95"]


def test_structured_log_record(write_checkpoint, caplog):
    directory = write_checkpoint([{"w": torch.ones(4)}])
    with caplog.at_level(logging.INFO, logger="blob2gpu"):
        blob2gpu.load(str(directory))
    records = [r for r in caplog.records if hasattr(r, "blob2gpu_report")]
    assert len(records) == 1 and "GB/s" in records[0].getMessage()
    assert records[0].blob2gpu_report["tensors"] == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="blob2gpu"):
        blob2gpu.load(str(directory), emit_phase_timings=False)
    assert not [r for r in caplog.records if hasattr(r, "blob2gpu_report")]


def test_report_round_trips_through_json(write_checkpoint):
    directory = write_checkpoint([{"w": torch.ones(4)}, {"v": torch.zeros(2)}])
    with blob2gpu.open(str(directory)) as checkpoint:
        checkpoint.to_dict()
        report = checkpoint.report
    again = LoadReport.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == report.to_dict()
