"""The command line: `blob2gpu load` shows progress, prints a summary and writes the report;
`config show` lists every setting and its source; errors exit 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from blob2gpu.settings import SCHEMA
from conftest import random_tensor, upload_directory

PROGRESS_LINE = r"blob2gpu: [0-9.]+ [kMG]B of [0-9.]+ [kMG]B \(([0-9]+)%\), [0-9.]+ GB/s, ETA .+"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blob2gpu", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_load_prints_summary_and_writes_report(write_checkpoint, tmp_path):
    directory = write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.bfloat16, (128, 32), s)} for s in range(2)]
    )
    out = tmp_path / "report.json"
    result = run("load", str(directory), "--device", "cpu", "--report", str(out))
    assert result.returncode == 0, result.stderr
    assert "GB/s" in result.stdout and "2 tensors from 2 shards" in result.stdout
    assert "model_load_complete" in result.stdout
    report = json.loads(out.read_text())
    total = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    assert report["bytes"] == total and report["tensors"] == 2 and report["shard_count"] == 2
    assert report["seconds"] > 0 and len(report["shards"]) == 2


def test_a_report_that_cannot_be_written_fails_before_the_load(write_checkpoint, tmp_path):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (64, 64))}])
    result = run("load", str(directory), "--report", str(tmp_path / "no-such-dir" / "r.json"))
    assert result.returncode == 2 and "LocalWriteError" in result.stderr
    assert "no-such-dir' is not a directory" in result.stderr
    assert "GB/s" not in result.stdout and "GB/s" not in result.stderr  # no load, no progress


def test_a_cache_directory_that_cannot_be_used_is_said_not_skipped_quietly(
    write_checkpoint, tmp_path, azurite, container, blob_env
):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (64, 64))}])
    upload_directory(azurite, container, directory, "m")
    not_a_directory = tmp_path / "afile"
    not_a_directory.write_text("")
    result = run(
        "load",
        f"az://{container}/m",
        "--set",
        "local_nvme_cache_enabled=true",
        "--set",
        f"cache_dir={not_a_directory}",
    )
    assert result.returncode == 0, result.stderr
    assert "NVMe cache: not used for 1 shard(s)" in result.stdout
    assert "the cache directory is unusable" in result.stdout
    assert "NVMe cache not used by this load" in result.stderr  # the log's warning


def test_load_on_cuda_with_settings(fake_driver, write_checkpoint):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (64, 64))}])
    result = run("load", str(directory), "--device", "cuda", "--set", "staging_slots=3")
    assert result.returncode == 0, result.stderr
    assert "to cuda:0" in result.stdout


def test_load_a_selection_by_name_and_glob(write_checkpoint, tmp_path):
    directory = write_checkpoint(
        [{f"layers.{s}.w": random_tensor(torch.bfloat16, (128, 32), s) for s in range(3)}]
    )
    out = tmp_path / "report.json"
    result = run("load", str(directory), "--match", "layers.[02].*", "--report", str(out))
    assert result.returncode == 0, result.stderr
    assert "2 tensors" in result.stdout and json.loads(out.read_text())["tensor_selection"] == 2
    result = run("load", str(directory), "--tensor", "layers.1.w", "--tensor", "nope")
    assert result.returncode == 2
    assert "TensorNotFound" in result.stderr and "'nope'" in result.stderr


def test_tensor_and_match_together_load_the_union(write_checkpoint, tmp_path):
    directory = write_checkpoint(
        [{f"layers.{s}.w": random_tensor(torch.bfloat16, (128, 32), s) for s in range(4)}]
    )
    out = tmp_path / "report.json"
    result = run(
        "load",
        str(directory),
        "--tensor",
        "layers.3.w",
        "--match",
        "layers.[01].*",
        "--report",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "3 tensors" in result.stdout and json.loads(out.read_text())["tensor_selection"] == 3
    # Each part is still checked: a name no shard holds, a glob that matches nothing.
    result = run("load", str(directory), "--tensor", "nope", "--match", "layers.0.*")
    assert result.returncode == 2 and "TensorNotFound" in result.stderr
    assert "'nope'" in result.stderr and "tensor_names" not in result.stderr


def test_a_glob_matching_nothing_fails_naming_it(write_checkpoint, tmp_path):
    import blob2gpu
    from blob2gpu.errors import TensorNotFound
    from blob2gpu.loading.selection import TensorMatch

    directory = write_checkpoint(
        [{f"layers.{s}.w": random_tensor(torch.bfloat16, (128, 32), s)} for s in range(2)]
    )  # with an index
    for checkpoint in (directory, directory / "model-00001-of-00002.safetensors"):
        result = run("load", str(checkpoint), "--match", "layer.*", "--match", "layers.0.*")
        assert result.returncode == 2, result.stderr
        assert "TensorNotFound" in result.stderr and "no tensor matching 'layer.*'" in result.stderr
        assert "layers.0.*" not in result.stderr
    try:
        blob2gpu.load(str(directory), tensor_filter=TensorMatch(patterns=("x*",)))
    except TensorNotFound as e:
        assert e.patterns == ("x*",) and e.names == ()
    else:
        raise AssertionError("a glob that matches nothing loaded")


def test_errors_are_one_line_and_exit_2(tmp_path):
    result = run("load", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.startswith("blob2gpu: SourceUnavailable:")
    result = run("load", str(tmp_path), "--set", "staging_slots=1")
    assert result.returncode == 2 and "ConfigError" in result.stderr
    for command in ("load", "fetch-aux", "bench"):  # a malformed --set is a usage error
        args = [command, "az://c/m", str(tmp_path)][: 3 if command == "fetch-aux" else 2]
        result = run(*args, "--set", "staging_slots")
        assert result.returncode == 2 and "expected KEY=VALUE" in result.stderr
        assert "Traceback" not in result.stderr


def test_config_show_json_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOB2GPU_COPY_STREAMS", "3")
    monkeypatch.delenv("BLOB2GPU_CONFIG", raising=False)
    config = tmp_path / "blob2gpu.yaml"
    config.write_text("storage:\n  prefetch_concurrency: 16\nstaging:\n  copy_streams: 5\n")
    result = run("config", "show", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {s.key for s in SCHEMA}
    assert doc["staging.copy_streams"] == {
        "name": "copy_streams",
        "value": 3,  # the environment beats the file
        "source": "env BLOB2GPU_COPY_STREAMS",
        "default": 2,
        "env": "BLOB2GPU_COPY_STREAMS",
    }
    assert doc["storage.prefetch_concurrency"]["value"] == 16
    assert doc["storage.prefetch_concurrency"]["source"] == f"config {config}"
    assert doc["storage.retry_max_attempts"]["source"] == "default"


def test_config_show_table(monkeypatch, tmp_path):
    config = tmp_path / "blob2gpu.yaml"
    config.write_text("model:\n  direct_gpu_load: false\n")
    monkeypatch.setenv("BLOB2GPU_CONFIG", str(config))
    monkeypatch.setenv("MODEL_LOAD_STRATEGY", "direct-gpu")
    result = run("config", "show")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"config file: {config} (from BLOB2GPU_CONFIG)"
    row = next(ln for ln in lines if ln.startswith("model.direct_gpu_load "))
    assert row.split()[1:] == ["true", "env", "MODEL_LOAD_STRATEGY"]
    assert lines[1].startswith("at load: what a load to ")
    assert len(lines) == 3 + len(SCHEMA)
    result = run("config", "show", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "ConfigError" in result.stderr


def test_config_show_says_what_a_load_uses_for_settings_left_to_it(monkeypatch, tmp_path):
    monkeypatch.delenv("BLOB2GPU_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu = json.loads(run("config", "show", "--json", "--device", "cpu").stdout)
    at_load = {key: doc["at_load"] for key, doc in cpu.items() if "at_load" in doc}
    assert {doc["device"] for doc in at_load.values()} == {"cpu"}
    assert at_load["staging.io_threads"]["value"] == 4
    assert at_load["staging.staging_slots"]["value"] == 8
    assert at_load["storage.chunk_bytes"]["value"] == 32 << 20
    assert at_load["staging.streamed_device_bytes"]["how"] == "not bounded on cpu"
    assert at_load["storage.cache_dir"]["value"] == str(tmp_path / "blob2gpu")
    assert "storage.copy_streams" not in at_load  # set to a value: nothing to size

    # a GPU load: the fake GPU's memory sizes the streamed bound; a setting given is left alone
    gpu = run("config", "show", "--json", "--device", "cuda:0", "--set", "staging_slots=16")
    doc = json.loads(gpu.stdout)
    total = 8 << 30  # the fake GPU's memory in a new process
    streamed = doc["staging.streamed_device_bytes"]["at_load"]
    assert streamed["value"] == min(4 << 30, total // 10) and streamed["device"] == "cuda:0"
    assert "at_load" not in doc["staging.staging_slots"]
    assert doc["staging.pinned_staging_bytes"]["at_load"]["value"] >= 64 << 20

    table = run("config", "show", "--device", "cpu").stdout.splitlines()
    assert table[1] == "at load: what a load to cpu on this host uses where a setting is left to it"
    row = next(line for line in table if line.startswith("staging.staging_slots "))
    assert row.split()[1:] == ["0", "default", "8", "(sized", "from", "this", "host", "for", "cpu)"]


def test_ctrl_c_ends_a_command_with_one_line_and_code_130(monkeypatch, capsys):
    from blob2gpu import phrasing
    from blob2gpu.cli import arguments, entry

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(arguments, "cmd_load", interrupted)
    # main() switches this process's hints to command-line words: back to Python's afterwards.
    monkeypatch.setattr(phrasing, "_command_line", phrasing._command_line)
    assert entry.main(["load", "some/checkpoint"]) == 130
    assert capsys.readouterr().err == "blob2gpu: interrupted\n"  # no traceback


def test_settings_command_is_gone():
    assert run("settings").returncode == 2  # replaced by `config show`


def test_progress_lines_when_not_a_terminal(azurite, container, fault_proxy, write_checkpoint):
    import time

    directory = write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float32, (256, 256), s)} for s in range(2)]
    )
    upload_directory(azurite, container, directory, "m")
    # Slow every ranged GET down so that the load spans several progress intervals.
    fault_proxy.faults.on_range_get = lambda path, count: time.sleep(0.05)
    result = run(
        "load", f"{azurite.endpoint(fault_proxy.port)}/{container}/m",
        "--set", "chunk_bytes=32768", "--set", "prefetch_concurrency=1",
        "--progress-interval", "0.2",
        env={"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string(fault_proxy.port)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr  # plain lines, no bar
    lines = result.stderr.splitlines()
    periodic = [ln for ln in lines if re.fullmatch(PROGRESS_LINE, ln)]
    assert len(periodic) >= 3, result.stderr
    done = [int(re.fullmatch(PROGRESS_LINE, ln).group(1)) for ln in periodic]
    assert done == sorted(done) and done[0] < 100
    assert re.fullmatch(r"blob2gpu: .* read in [0-9.]+ s, [0-9.]+ GB/s", lines[-1])
    assert "model_load_complete" in result.stdout  # the phase table at the end


def test_progress_bar_on_a_terminal(write_checkpoint):
    import os
    import pty

    directory = write_checkpoint([{"w": random_tensor(torch.float32, (256, 256))}])
    master, slave = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "blob2gpu", "load", str(directory)],
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            timeout=120,
            env={**os.environ, "TERM": "xterm"},
        )
        os.close(slave)
        slave = -1
        stderr = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            stderr += chunk
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    assert result.returncode == 0
    text = stderr.decode()
    assert text.startswith("\r[") and "100%" in text and "GB/s" in text and "ETA" in text
    assert "#" * 10 in text


def test_quiet_prints_nothing(write_checkpoint, tmp_path):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (64, 64))}])
    out = tmp_path / "report.json"
    result = run("load", str(directory), "--quiet", "--report", str(out))
    assert result.returncode == 0
    assert result.stdout == "" and result.stderr == ""
    assert json.loads(out.read_text())["tensors"] == 1


def test_load_defaults_to_model_source_uri(write_checkpoint, tmp_path):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (64, 64))}])
    result = run("load", env={"MODEL_SOURCE_URI": str(directory)})
    assert result.returncode == 0, result.stderr
    assert "1 tensor from 1 shard to" in result.stdout
    assert "read in" in result.stderr  # the final progress line
    result = run("load", env={"MODEL_SOURCE_URI": ""})
    assert result.returncode == 2 and "MODEL_SOURCE_URI" in result.stderr


def test_fetch_aux_writes_the_other_files_for_an_init_container(
    azurite, container, write_checkpoint, tmp_path
):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (64, 64))}])
    (directory / "config.json").write_text('{"hidden_size": 64}')
    (directory / "tokenizer.json").write_text("{}")
    upload_directory(azurite, container, directory, "m")
    env = {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string()}
    result = run("fetch-aux", f"az://{container}/m", str(tmp_path / "a"), env=env)
    assert result.returncode == 0, result.stderr
    names = ["config.json", "model.safetensors.index.json", "tokenizer.json"]
    assert [line.rsplit("/", 1)[-1] for line in result.stdout.split()] == names
    assert (tmp_path / "a" / "config.json").read_text() == '{"hidden_size": 64}'
    env["MODEL_SOURCE_URI"] = f"az://{container}/m"
    result = run("fetch-aux", str(tmp_path / "b"), "--quiet", "--set", "verify=none", env=env)
    assert result.returncode == 0 and result.stdout == ""
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == names
    result = run("fetch-aux", str(directory), str(tmp_path / "c"))
    assert result.returncode == 2 and "InvalidArgument" in result.stderr


def test_load_reads_a_config_file(write_checkpoint, tmp_path):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (64, 64))}])
    config = tmp_path / "blob2gpu.yaml"
    config.write_text("storage:\n  prefetch_concurrency: 3\n")
    out = tmp_path / "report.json"
    result = run("load", str(directory), "--config", str(config), "--report", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["settings"]["prefetch_concurrency"] == 3
    config.write_text("storage:\n  prefetch_concurrenc: 3\n")
    result = run("load", str(directory), "--config", str(config))
    assert result.returncode == 2 and "prefetch_concurrency" in result.stderr


def test_progress_renders_bar_and_lines():
    import io
    import time

    from blob2gpu.operations.progress import LoadProgress

    state = {"done": 0}

    def poll():
        state["done"] = min(state["done"] + 10**8, 10**9)
        return state["done"], 10**9

    stream = io.StringIO()
    with LoadProgress(poll, stream, mode="lines", interval=0.01):
        time.sleep(0.2)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3 and all(re.fullmatch(PROGRESS_LINE, ln) for ln in lines[:-1])
    assert "100%" in lines[-2] or "read in" in lines[-1]

    state["done"] = 0
    stream = io.StringIO()
    progress = LoadProgress(poll, stream, mode="bar", interval=0.01)
    bar = progress.start().bar(5 * 10**8, 10**9, width=80)
    time.sleep(0.05)
    progress.stop()
    assert len(bar) <= 79 and " 50% " in bar and bar.startswith("[") and "ETA" in bar
    assert stream.getvalue().startswith("\r[") and stream.getvalue().endswith("\n")

    stream = io.StringIO()
    with LoadProgress(poll, stream, mode="none", interval=0.01):
        time.sleep(0.05)
    assert stream.getvalue() == ""


def test_demo_runs(tmp_path):
    result = run("demo", "--device", "cpu", "--size-mb", "8")
    assert result.returncode == 0, result.stderr
    assert "tensors" in result.stdout and "GB/s" in result.stdout
    # A weights-only load generates no token: its first_token phase stays empty.
    first_token = next(ln for ln in result.stdout.splitlines() if ln.startswith("first_token"))
    assert first_token.split()[-1] == "-"


def test_a_demo_that_gets_the_cpu_says_why_and_what_to_try_next():
    result = run("demo", "--size-mb", "8", env={"BLOB2GPU_CUDA_DRIVER": "/nowhere/libcuda.so.1"})
    assert result.returncode == 0, result.stderr
    assert "loading to cpu (no GPU: /nowhere/libcuda.so.1: " in result.stdout
    assert result.stdout.splitlines()[-2].startswith("next: `blob2gpu load")


@pytest.mark.parametrize("size_mb", [8, 24])
def test_demo_writes_the_size_asked_for(size_mb):
    result = run("demo", "--device", "cpu", "--source", "local", "--size-mb", str(size_mb))
    assert result.returncode == 0, result.stderr
    written = re.search(r"demo checkpoint: ([0-9]+) MB in 4 shards", result.stdout)
    assert written is not None, result.stdout
    assert abs(int(written.group(1)) - size_mb) <= size_mb * 0.1
    assert run("demo", "--size-mb", "0").returncode == 2  # argparse: must be at least 1


def test_load_says_one_speed_in_its_last_progress_line_and_its_summary(write_checkpoint):
    directory = write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float32, (256, 256), s)} for s in range(3)]
    )
    result = run("load", str(directory))  # stderr is a pipe: plain lines
    assert result.returncode == 0, result.stderr
    summary = re.search(r"GB in ([0-9.]+) s = ([0-9.]+) GB/s", result.stdout)
    last = re.fullmatch(r"blob2gpu: .* read in ([0-9.]+) s, ([0-9.]+) GB/s", result.stderr.strip())
    assert summary is not None and last is not None, result.stdout + result.stderr
    assert last.groups() == summary.groups()


def test_every_option_and_command_has_a_help_text():
    import argparse

    from blob2gpu.cli import build_parser

    def undocumented(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest for a in action._choices_actions if a.help}
                for name, sub in action.choices.items():
                    if name not in helped:
                        yield f"{path} {name}"
                    yield from undocumented(sub, f"{path} {name}")
            elif not action.help:
                yield f"{path} {'/'.join(action.option_strings) or action.dest}"

    assert list(undocumented(build_parser(), "blob2gpu")) == []


def demo_in(directory, path, *args):
    env = {k: v for k, v in os.environ.items() if k != "AZURITE_BLOB"}
    env["PATH"] = path
    env["XDG_DATA_HOME"] = str(directory / "data")  # not the Azurite a demo installed for this user
    return subprocess.run(
        [sys.executable, "-m", "blob2gpu", "demo", "--device", "cpu", "--size-mb", "8", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=directory,
        env=env,
    )


def test_demo_finds_azurite_on_path_and_says_so_when_there_is_none(tmp_path):
    launcher = Path(__file__).resolve().parents[2] / ".azurite/node_modules/.bin/azurite-blob"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "azurite-blob").symlink_to(launcher)
    node = shutil.which("node")
    assert node is not None
    path = os.pathsep.join([str(bin_dir), os.path.dirname(node), "/usr/bin", "/bin"])
    found = demo_in(tmp_path, path)  # no ./.azurite here: PATH has it
    assert found.returncode == 0, found.stderr
    assert "served by Azurite" in found.stdout
    no_azurite = os.pathsep.join([os.path.dirname(node), "/usr/bin", "/bin"])
    missing = demo_in(tmp_path, no_azurite, "--source", "azurite")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "azurite-blob was found neither" in missing.stderr and "--source local" in missing.stderr


def test_config_show_takes_set_and_reports_unknown_variables(monkeypatch):
    monkeypatch.delenv("BLOB2GPU_CONFIG", raising=False)
    result = run("config", "show", "--json", "--set", "staging_slots=16")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)["staging.staging_slots"]
    assert (doc["value"], doc["source"]) == (16, "argument")
    bad = run("config", "show", env={"BLOB2GPU_PREFETCH_CONCURENCY": "4"})
    assert bad.returncode == 2 and "ConfigError" in bad.stderr
    assert "'BLOB2GPU_PREFETCH_CONCURRENCY'" in bad.stderr and "Traceback" not in bad.stderr


def test_hints_speak_command_line_syntax_on_the_command_line(tmp_path):
    import blob2gpu
    from blob2gpu.errors import InsufficientHostMemory
    from conftest import sparse_checkpoint

    directory = tmp_path / "big.safetensors"  # 4 GB of weights that take no disk (sparse)
    sparse_checkpoint(directory, 4 << 30)
    with_cli = run("load", str(directory), "--set", "host_headroom_factor=100")
    assert with_cli.returncode == 2 and "InsufficientHostMemory" in with_cli.stderr
    assert (
        "--device cuda" in with_cli.stderr and "--set host_headroom_factor=1.0" in with_cli.stderr
    )
    try:  # the Python API names its own arguments
        blob2gpu.load(str(directory), host_headroom_factor=100)
    except InsufficientHostMemory as e:
        assert "device='cuda'" in str(e) and "host_headroom_factor=1.0" in str(e)
        assert "--set" not in str(e)
    else:
        raise AssertionError("400 GB fit in host memory")


def test_the_emulator_finds_the_azurite_the_demo_installed_from_any_directory(
    monkeypatch, tmp_path
):
    from blob2gpu.tools import emulator

    monkeypatch.delenv("AZURITE_BLOB", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # no .azurite here
    assert emulator.find_azurite() is None
    said = emulator.missing()
    assert f"npm install --prefix {tmp_path / 'data' / 'blob2gpu' / 'azurite'} azurite@" in said
    launcher = tmp_path / "data" / "blob2gpu" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    launcher.parent.mkdir(parents=True)
    launcher.write_text("#!/bin/sh\n")
    assert emulator.find_azurite() == str(launcher) and emulator.missing() is None


def start_emulator(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    from blob2gpu.tools.emulator import find_azurite
    from support.azurite import REPO

    launcher = find_azurite((REPO,))
    assert launcher is not None
    return subprocess.Popen(
        [sys.executable, "-m", "blob2gpu", "emulator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "AZURITE_BLOB": launcher, **(env or {})},
    )


def test_emulator_runs_until_interrupted_and_says_the_connection_string(write_checkpoint, tmp_path):
    import signal
    import socket

    directory = write_checkpoint([{"w": random_tensor(torch.float32, (64, 64))}])
    for first in (True, False):  # --location keeps the blobs across a restart
        process = start_emulator("--port", "0", "--location", str(tmp_path / "blobs"))
        said = ""
        while "Ctrl-C stops it." not in said and (line := process.stdout.readline()):
            said += line
        found = re.search(r"export AZURE_STORAGE_CONNECTION_STRING='([^']+)'", said)
        assert found is not None, said + process.stderr.read()
        env = {"AZURE_STORAGE_CONNECTION_STRING": found.group(1)}
        port = int(re.search(r"127\.0\.0\.1:([0-9]+)/", said).group(1))
        if first:
            published = run("publish", str(directory), "az://models/m", env=env)
            assert published.returncode == 0, published.stderr
        loaded = run("load", "az://models/m", env=env)
        assert loaded.returncode == 0 and "1 tensor from" in loaded.stdout, loaded.stderr
        process.send_signal(signal.SIGINT if first else signal.SIGTERM)  # Ctrl-C, a stop
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0 and "Azurite stopped." in out, err
        with socket.socket() as s:  # Azurite went with it
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_emulator_on_a_port_in_use_says_so_in_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start_emulator("--port", str(port))
        out, err = process.communicate(timeout=60)
    assert process.returncode == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and f"port {port} on 127.0.0.1 is in use" in err
    assert "--port 0" in err


def test_load_fetches_a_damaged_cache_entry_again(
    published, azurite, container, cache_dir, blob_env, tmp_path
):
    from blob2gpu.cache.nvme import NvmeCache

    uri = f"az://{container}/m"
    cache = ["--set", "local_nvme_cache_enabled=true", "--set", f"cache_dir={cache_dir}"]
    assert run("load", uri, *cache).returncode == 0
    for entry in sorted(NvmeCache(cache_dir).entries(), key=lambda e: e.key)[:2]:
        data = bytearray(entry.data_path.read_bytes())
        data[len(data) // 2] ^= 0x01
        entry.data_path.write_bytes(bytes(data))
    out = tmp_path / "report.json"
    result = run("load", uri, *cache, "--report", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("failed its check") == 2 and "fetched again" in result.stdout
    report = json.loads(out.read_text())
    assert len(report["cache_repaired"]) == 2 and report["shard_count"] == 3
    assert sum(s["cache_hit"] for s in report["shards"]) == 1
