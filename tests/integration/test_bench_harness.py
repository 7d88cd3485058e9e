"""The Blob benchmark's probe of what new memory costs the machine, and the line it prints."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bench_blob_load  # noqa: E402
from harness.machine import fresh_memory_cost  # noqa: E402


def test_fresh_memory_cost_measures_both_touches():
    facts = fresh_memory_cost(mib=16, settle_s=0)
    assert facts["first_touch_cpu_s_per_gb"] >= 0
    assert facts["retouch_cpu_s_per_gb"] >= 0
    assert isinstance(facts.get("page_reporting", False), bool)


def test_host_work_names_the_machines_memory_cost(capsys):
    row = {"cpu_s_per_gb": 1.5, "azurite_cpu_s_per_gb": 2.5, "host_populate_cpu_s_per_gb": 1.0}
    ceiling = {"cpu_s_per_gb": 0.3, "azurite_cpu_s_per_gb": 2.2}
    memory = {"first_touch_cpu_s_per_gb": 1.25, "retouch_cpu_s_per_gb": 0.3, "page_reporting": True}
    bench_blob_load.print_host_work({"blob2gpu-cpu": row, "ceiling": ceiling}, 2, memory)
    out = capsys.readouterr().out
    assert "1.25 CPU s/GB on first touch, 0.30 for pages just freed" in out
    assert "page_reporting" in out
    assert "blob2gpu-cpu less making memory resident" in out

    bench_blob_load.print_host_work({"blob2gpu-cpu": row, "ceiling": ceiling}, 2, {})
    assert "first touch" not in capsys.readouterr().out  # the probe could not run: no line
