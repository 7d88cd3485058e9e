"""bench/compare_benchmarks.py, the GPU workflow's regression gate: on two pytest-benchmark JSON
files it flags a benchmark more than 10% slower than the baseline (and only that), lists
benchmarks found in one file only, and refuses a file that is not a pytest-benchmark result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "compare_benchmarks.py"


def result(medians: dict[str, float], gb: float | None = 0.067) -> dict:
    return {
        "machine_info": {},
        "benchmarks": [
            {
                "name": name,
                "fullname": f"bench/test_core_micro.py::{name}",
                "stats": {"min": m * 0.9, "median": m, "mean": m * 1.05},
                "extra_info": {"GB": gb} if gb else {},
            }
            for name, m in medians.items()
        ],
    }


def compare(tmp_path: Path, baseline: dict, current: dict, *args: str):
    (tmp_path / "base.json").write_text(json.dumps(baseline))
    (tmp_path / "now.json").write_text(json.dumps(current))
    return subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(tmp_path / "base.json"),
            str(tmp_path / "now.json"),
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
    )


BASE = {"test_crc32c": 0.010, "test_sha256": 0.200, "test_header_parse[300]": 0.0004}


def test_a_planted_20_percent_regression_is_flagged_and_fails(tmp_path):
    now = dict(BASE, test_sha256=0.240)
    out = compare(tmp_path, result(BASE), result(now))
    assert out.returncode == 1, out.stdout
    rows = {
        line.split()[0]: line for line in out.stdout.splitlines()[2:] if line.startswith("test")
    }
    assert rows["test_sha256"].endswith("+20.0%  REGRESSED")
    assert rows["test_crc32c"].endswith("ok") and rows["test_header_parse[300]"].endswith("ok")
    assert "1 of 3 benchmarks regressed" in out.stdout


def test_noise_under_the_threshold_and_speedups_pass(tmp_path):
    now = {"test_crc32c": 0.0109, "test_sha256": 0.150, "test_header_parse[300]": 0.0004}
    out = compare(tmp_path, result(BASE), result(now))
    assert out.returncode == 0, out.stdout
    assert "no regression in 3 benchmarks" in out.stdout
    # The threshold is a setting: 5% makes the same 9% slowdown a regression.
    assert compare(tmp_path, result(BASE), result(now), "--threshold", "0.05").returncode == 1


def test_the_tracked_statistic_can_be_chosen(tmp_path):
    now = result(BASE)
    now["benchmarks"][0]["stats"]["min"] *= 2  # a slower best round, same median
    assert compare(tmp_path, result(BASE), now).returncode == 0
    assert compare(tmp_path, result(BASE), now, "--stat", "min").returncode == 1


def test_benchmarks_in_one_file_only_are_listed_not_judged(tmp_path):
    now = {"test_crc32c": 0.010, "test_new": 5.0}
    out = compare(tmp_path, result(BASE), result(now))
    assert out.returncode == 0, out.stdout
    assert "only in the baseline (not judged): bench/test_core_micro.py::test_sha256" in out.stdout
    assert "new (not judged): bench/test_core_micro.py::test_new" in out.stdout


def test_a_file_that_is_not_a_benchmark_result_is_refused(tmp_path):
    for bad in ({"benchmarks": []}, {"results": []}, result({"test_crc32c": 0.0})):
        out = compare(tmp_path, result(BASE), bad)
        assert out.returncode == 2
        assert "now.json" in out.stderr and "pytest-benchmark" in out.stderr
