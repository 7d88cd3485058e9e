"""`blob2gpu report show`: the phase and shard tables of a report file, and its timeline PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import random_tensor

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blob2gpu", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def report_file(write_checkpoint, tmp_path):
    """A report written by `blob2gpu load --report` for a 3-shard checkpoint, first token marked."""
    directory = write_checkpoint(
        [{f"s{s}.w{i}": random_tensor(torch.float16, (128, 64), s * 3 + i) for i in range(3)}
         for s in range(3)]
    )  # fmt: skip
    path = tmp_path / "report.json"
    result = run("load", str(directory), "--report", str(path), "--quiet")
    assert result.returncode == 0, result.stderr
    doc = json.loads(path.read_text())
    doc["phases"]["first_token"] = doc["phases"]["model_load_complete"] + 0.5
    path.write_text(json.dumps(doc))
    return path


def test_show_prints_the_phase_and_shard_tables(report_file):
    result = run("report", "show", str(report_file))
    assert result.returncode == 0, result.stderr
    doc = json.loads(report_file.read_text())
    out = result.stdout
    assert "GB/s" in out and "9 tensors from 3 shards to cpu" in out
    for phase, t in doc["phases"].items():
        line = next(ln for ln in out.splitlines() if ln.startswith(phase))
        assert line.split()[-1] == f"{t:.3f}"
    shard_lines = [ln for ln in out.splitlines() if ln.startswith("model-0000")]
    assert [ln.split()[0] for ln in shard_lines] == [s["name"] for s in doc["shards"]]
    for line, shard in zip(shard_lines, doc["shards"], strict=True):
        assert line.split()[1] == f"{shard['bytes'] / 1e6:.1f}" and line.split()[2] == "3"


def test_show_says_what_making_host_memory_resident_cost(report_file):
    doc = json.loads(report_file.read_text())
    doc["host_populate_seconds"] = 0.25
    report_file.write_text(json.dumps(doc))
    result = run("report", "show", str(report_file))
    assert result.returncode == 0, result.stderr
    assert "0.250 CPU s making new host memory resident" in result.stdout
    del doc["host_populate_seconds"]  # a report written before the field existed
    report_file.write_text(json.dumps(doc))
    result = run("report", "show", str(report_file))
    assert result.returncode == 0, result.stderr
    assert "resident" not in result.stdout


def test_show_says_how_a_throttled_load_adapted_and_its_pace(report_file):
    doc = json.loads(report_file.read_text())
    doc.update(
        throttled=5,
        throttle_decreases=2,
        concurrency_lowest=1,
        concurrency_settled=3,
        range_bytes_settled=1 << 20,
        pace_bytes_per_second=6.5e6,
    )
    report_file.write_text(json.dumps(doc))
    result = run("report", "show", str(report_file))
    assert result.returncode == 0, result.stderr
    assert "5 throttled answer(s): concurrency lowered 2 time(s)" in result.stdout
    assert "ranges settled at 1024 KiB; paced at 6.5 MB/s" in result.stdout
    doc.update(pace_bytes_per_second=None, pace_requests_per_second=12.0)
    report_file.write_text(json.dumps(doc))
    result = run("report", "show", str(report_file))
    assert "paced at 12.0 requests/s" in result.stdout and "MB/s;" not in result.stdout


def test_png_is_produced(report_file, tmp_path):
    out = tmp_path / "timeline.png"
    result = run("report", "show", str(report_file), "--png", str(out))
    assert result.returncode == 0, result.stderr
    assert f"timeline written to {out}" in result.stdout
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000


def test_png_grows_with_the_shard_count(report_file, tmp_path):
    import matplotlib.image

    doc = json.loads(report_file.read_text())
    doc["shards"] = [dict(doc["shards"][0], name=f"shard-{i:03d}") for i in range(60)]
    many = tmp_path / "many.json"
    many.write_text(json.dumps(doc))
    heights = []
    for source, png in ((report_file, tmp_path / "few.png"), (many, tmp_path / "many.png")):
        assert run("report", "show", str(source), "--png", str(png)).returncode == 0
        heights.append(matplotlib.image.imread(str(png)).shape[0])
    assert heights[1] > heights[0] * 2  # a readable row per shard, not a squeezed picture


def test_secrets_in_the_uri_are_not_shown(report_file, tmp_path):
    doc = json.loads(report_file.read_text())
    doc["uri"] = "https://acct.blob.core.windows.net/models/llama?sv=2024-01-01&sig=TOPSECRET%3D"
    path = tmp_path / "sas.json"
    path.write_text(json.dumps(doc))
    result = run("report", "show", str(path))
    assert result.returncode == 0 and "TOPSECRET" not in result.stdout
    assert "https://acct.blob.core.windows.net/models/llama" in result.stdout


def test_bad_files_are_one_line_errors(tmp_path):
    result = run("report", "show", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and result.stderr.startswith("blob2gpu: InvalidArgument:")
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a report"}')
    result = run("report", "show", str(bad))
    assert result.returncode == 2 and "not a blob2gpu load report" in result.stderr


def test_png_without_matplotlib_says_what_to_install(report_file, tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from blob2gpu.cli import main\n"
        f"sys.exit(main(['report', 'show', {str(report_file)!r}, '--png', 'x.png']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 2 and "blob2gpu[plot]" in result.stderr
    assert "model_load_complete" in result.stdout  # the tables still print
    assert not (tmp_path / "x.png").exists()


def test_a_report_path_that_is_no_report_file_fails_at_once_quoting_nothing(tmp_path):
    import os

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # read, it would wait for a writer forever
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)  # RecursionError in the JSON parser, before
    for path in (fifo, deep, "/dev/zero"):
        result = run("report", "show", str(path))
        assert result.returncode == 2 and result.stderr.startswith("blob2gpu: InvalidArgument:")
        assert len(result.stderr) < 500
