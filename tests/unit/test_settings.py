"""Settings: one schema; keyword > environment > YAML file > default; the case study's keys and
deployment variables; clear errors naming key, source and valid values; docs generated from it."""

from __future__ import annotations

import typing
from pathlib import Path

import blob2gpu
import pytest
import torch
from blob2gpu.errors import ConfigError, InvalidArgument, ShardCountMismatch
from blob2gpu.settings import (
    SCHEMA,
    ResolvedSettings,
    read_config_file,
    resolve,
    settings_doc,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "settings.md"
CASE_STUDY_YAML = """\
model:
  format: safetensors
  shard_count: 16
  direct_gpu_load: true
startup:
  readiness_probe_initial_delay_seconds: 20
  warmup_prompt: "hello"
storage:
  prefetch_concurrency: 8
observability:
  emit_phase_timings: true
  emit_gpu_memory_watermark: true
  emit_first_token_latency: true
"""


def test_defaults():
    s = resolve(environ={})
    # The pipeline's shape is sized from the host where a load uses it (0: see
    # tests/unit/test_pipeline_sizing.py).
    assert s.staging_slots == 0 and s.staging_slot_bytes == 0 and s.io_threads == 0
    assert s.pinned_staging_bytes == 0 and s.bind_numa_node is True
    assert s.copy_streams == 2 and s.use_pinned_host_fallback is True
    assert s.direct_gpu_load is True and s.prefetch_concurrency == 8
    assert set(s.sources.values()) == {"default"}


def test_the_case_study_config_file_is_understood(tmp_path):
    path = tmp_path / "startup.yaml"
    path.write_text(CASE_STUDY_YAML)
    s = resolve(environ={}, config_path=path)
    assert s.shard_count == 16 and s.warmup_prompt == "hello"
    assert s.readiness_probe_initial_delay_seconds == 20.0
    assert s.sources["prefetch_concurrency"] == f"config {path}"


def test_precedence_keyword_over_environment_over_file_over_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("staging:\n  staging_slots: 12\n  copy_streams: 3\nstorage.chunk_bytes: 1MiB\n")
    env = {"BLOB2GPU_STAGING_SLOTS": "16", "BLOB2GPU_CONFIG": str(path)}
    s = resolve({"staging_slots": 5}, environ=env)
    assert (s.staging_slots, s.sources["staging_slots"]) == (5, "argument")
    s = resolve(environ=env)
    assert (s.staging_slots, s.sources["staging_slots"]) == (16, "env BLOB2GPU_STAGING_SLOTS")
    assert (s.copy_streams, s.sources["copy_streams"]) == (3, f"config {path}")
    assert s.chunk_bytes == 1 << 20
    assert s.io_threads == 0 and s.sources["io_threads"] == "default"


@pytest.mark.parametrize(
    ("value", "expected"), [("direct-gpu", True), ("host-staging", False), ("HOST-STAGING", False)]
)
def test_model_load_strategy_deployment_variable(value, expected):
    s = resolve(environ={"MODEL_LOAD_STRATEGY": value})
    assert s.direct_gpu_load is expected
    assert s.sources["direct_gpu_load"] == "env MODEL_LOAD_STRATEGY"


def test_pinned_fallback_deployment_variable_and_its_blob2gpu_name():
    s = resolve(environ={"USE_PINNED_HOST_FALLBACK": "false"})
    assert s.use_pinned_host_fallback is False
    s = resolve(
        environ={"USE_PINNED_HOST_FALLBACK": "false", "BLOB2GPU_USE_PINNED_HOST_FALLBACK": "true"}
    )
    assert s.use_pinned_host_fallback is True


@pytest.mark.parametrize(
    ("value", "expected"), [("64MiB", 64 << 20), ("1g", 1 << 30), ("65536", 65536), ("8_192", 8192)]
)
def test_sizes_accept_suffixes(value, expected):
    assert resolve(environ={"BLOB2GPU_STAGING_SLOT_BYTES": value}).staging_slot_bytes == expected


@pytest.mark.parametrize(
    ("overrides", "environ", "match"),
    [
        (
            {"staging_slots": 1},
            {},
            r"'staging_slots' \(staging.staging_slots\) from argument .* 0 \(sized from the "
            r"host\) or an integer of at least 2",
        ),
        ({}, {"BLOB2GPU_COPY_STREAMS": "many"}, r"from env BLOB2GPU_COPY_STREAMS .* integer"),
        ({"unsupported_dtype": "ignore"}, {}, r"one of 'raise', 'bytes'"),
        ({}, {"BLOB2GPU_USE_PINNED_HOST_FALLBACK": "maybe"}, r"true or false"),
        ({"stagingslots": 4}, {}, r"unknown setting 'stagingslots'.*did you mean 'staging_slots'"),
        ({"io_threads": True}, {}, r"'io_threads'"),
        ({"gpu_headroom_factor": 0.5}, {}, r"at least 1"),
        (
            {},
            {"MODEL_LOAD_STRATEGY": "teleport"},
            r"MODEL_LOAD_STRATEGY='teleport' is not one of "
            r"'direct-gpu', 'host-staging'",
        ),
    ],
)
def test_errors_name_key_source_and_valid_values(overrides, environ, match):
    with pytest.raises(ConfigError, match=match) as info:
        resolve(overrides, environ=environ)
    if "did you mean" in match:  # the guess is the hint too
        assert info.value.hint == "did you mean 'staging_slots'?"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "storage:\n  prefetch_concurency: 4\n",
            r"unknown setting 'storage.prefetch_concurency' "
            r"from config .*did you mean 'storage.prefetch_"
            r"concurrency'",
        ),
        ("model:\n  direct_gpu_load: sometimes\n", r"direct_gpu_load.*from config .*true or false"),
        ("- a\n- b\n", r"must be a mapping"),
        ("storage: [unclosed\n", r"not valid YAML"),
    ],
)
def test_config_file_errors_name_the_file_and_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_config_file(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve(environ={"BLOB2GPU_CONFIG": "/nonexistent/blob2gpu.yaml"})


def test_pipeline_settings_belong_to_the_loader(write_checkpoint):
    directory = write_checkpoint([{"w": torch.ones(2)}])
    with blob2gpu.Loader() as loader, pytest.raises(InvalidArgument, match="Loader"):
        loader.load(str(directory), staging_slots=4)


def test_environment_reaches_the_core(write_checkpoint, monkeypatch):
    directory = write_checkpoint([{"w": torch.ones(2)}])
    monkeypatch.setenv("BLOB2GPU_IO_THREADS", "3")
    with blob2gpu.open(str(directory)) as checkpoint:
        checkpoint.to_dict()
        assert checkpoint.report.io_threads == 3
        assert checkpoint.report.settings["io_threads"] == 3


def test_model_source_uri_is_the_default_checkpoint(write_checkpoint, monkeypatch):
    directory = write_checkpoint([{"w": torch.ones(3)}])
    monkeypatch.setenv("MODEL_SOURCE_URI", str(directory))
    assert torch.equal(blob2gpu.load()["w"], torch.ones(3))
    monkeypatch.delenv("MODEL_SOURCE_URI")
    with pytest.raises(InvalidArgument, match="MODEL_SOURCE_URI"):
        blob2gpu.load()


def test_shard_count_is_checked(write_checkpoint, tmp_path):
    directory = write_checkpoint([{"a": torch.ones(1)}, {"b": torch.ones(1)}])
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  shard_count: 3\n")
    with pytest.raises(ShardCountMismatch, match=r"2 shard\(s\) but model.shard_count is 3"):
        blob2gpu.load(str(directory), config=str(config))
    assert len(blob2gpu.load(str(directory), shard_count=2)) == 2


def test_docs_list_every_setting_and_are_generated():
    text = DOCS.read_text()
    assert text == settings_doc(), "regenerate: python -m blob2gpu.settings > docs/settings.md"
    for s in SCHEMA:
        assert f"`{s.env}`" in text and f"`{s.key}`" in text


def test_every_setting_is_a_typed_attribute():
    # What mypy --strict reads: each setting a declared field of its type, and no catch-all
    # __getattr__ that would let a misspelt name through as Any.
    hints = typing.get_type_hints(ResolvedSettings)
    assert {s.name: s.type for s in SCHEMA} == {n: t for n, t in hints.items() if n != "sources"}
    assert "__getattr__" not in vars(ResolvedSettings)
    with pytest.raises(AttributeError):
        resolve(environ={}).prefetch_concurency  # noqa: B018


def test_an_unknown_blob2gpu_variable_is_an_error_naming_the_closest(write_checkpoint):
    with pytest.raises(ConfigError, match=r"'BLOB2GPU_STAGING_SLOT'.*'BLOB2GPU_STAGING_SLOTS'"):
        resolve(environ={"BLOB2GPU_STAGING_SLOT": "16"})
    # What blob2gpu reads besides the settings is known too.
    resolve(environ={"BLOB2GPU_CUDA_DRIVER": "libcuda.so.1", "BLOB2GPU_TEST_REAL_GPU": "1"})


# -- a config file is a file the user names: anything may be there ------------------------------
SHADOW = "root:*:19700:0:99999:7:::\ndaemon:*:19700:0:99999:7:::\n"


def refused_at_once(fn, *args):
    """The ConfigError fn(*args) raises, on a thread that must end (a hang guard, not a timing)."""
    import threading

    raised: list[BaseException] = []

    def run():
        try:
            fn(*args)
        except BaseException as e:  # the test inspects whatever it was
            raised.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), f"{fn.__name__} hangs"
    assert raised and isinstance(raised[0], ConfigError), raised
    return raised[0]


def test_a_file_that_is_no_config_file_is_not_echoed(tmp_path):
    # /etc/shadow's lines are YAML keys ('root:*:19700:0:99999:7::': None): not shown.
    path = tmp_path / "shadow"
    path.write_text(SHADOW)
    with pytest.raises(ConfigError, match="a key that is no setting name") as info:
        read_config_file(path)
    assert "root:" not in str(info.value) and "19700" not in str(info.value)
    # A key that could be a setting's name is still named (clipped).
    path.write_text(f"storage:\n  {'x' * 500}: 1\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'storage\.xxx") as info:
        read_config_file(path)
    assert "x" * 100 not in str(info.value)


def test_a_yaml_error_says_where_without_quoting_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("storage:\n  password: hunter2-secret\n  prefetch_concurrency: [4\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: .* at line \d+, column \d+") as info:
        read_config_file(path)
    assert "hunter2" not in str(info.value) and "password" not in str(info.value)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_a_config_path_that_is_no_regular_file_is_refused_at_once(tmp_path, kind):
    import os

    path = tmp_path / "blob2gpu.yaml"
    if kind == "fifo":
        os.mkfifo(path)  # opened for reading, it would wait for a writer
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")  # read whole, it never ends
    else:
        path.mkdir()
    error = refused_at_once(read_config_file, path)
    assert "not a regular file" in str(error)
    error = refused_at_once(resolve, None, {"BLOB2GPU_CONFIG": str(path)})
    assert "not a regular file" in str(error)


def test_a_huge_config_file_or_value_makes_no_huge_message(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("storage:\n  prefetch_concurrency: " + "7" * (50 << 20) + "x\n")
    with pytest.raises(ConfigError, match="larger than 1 MiB") as info:
        read_config_file(path)
    assert len(str(info.value)) < 500
    # Below the cap, a long bad value is clipped in the message.
    path.write_text("storage:\n  prefetch_concurrency: " + "7" * 500_000 + "x\n")
    with pytest.raises(ConfigError, match="bad value") as info:
        read_config_file(path)
    assert len(str(info.value)) < 500
    with pytest.raises(ConfigError, match="bad value") as info:
        resolve({"verify": "v" * (50 << 20)})
    assert len(str(info.value)) < 500


# Each mapping holds the one before twice: 2**40 leaves, were they all visited.
ALIASES = "l{0}: &l{0} {{p: *l{1}, q: *l{1}}}\n"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.json", "[" * 100_000),
        ("deep.yaml", "[" * 100_000),
        ("deep-block.yaml", "- " * 50_000 + "x\n"),
        (
            "aliases.yaml",
            "a: &l0 {x: 1, y: 1}\n" + "".join(ALIASES.format(i, i - 1) for i in range(1, 40)),
        ),
    ],
    ids=["json", "yaml-flow", "yaml-block", "yaml-aliases"],
)
def test_a_deep_or_self_multiplying_config_is_a_config_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    error = refused_at_once(read_config_file, path)
    assert len(str(error)) < 2000


def test_a_json_config_file_is_read(tmp_path):
    path = tmp_path / "blob2gpu.json"
    path.write_text('{"storage": {"prefetch_concurrency": 3}, "integrity.verify": "crc32c"}')
    assert read_config_file(path) == {"prefetch_concurrency": 3, "verify": "crc32c"}
    path.write_text('{"storage": {"prefetch_concurrency": 3,}}')
    with pytest.raises(ConfigError, match=r"not valid JSON: .* at line 1, column"):
        read_config_file(path)
