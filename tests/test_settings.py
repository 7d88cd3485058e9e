"""Settings: one schema, keyword > environment > default, clear errors, docs generated from it."""

from __future__ import annotations

from pathlib import Path

import blob2gpu
import pytest
from blob2gpu.errors import ConfigError, InvalidArgument
from blob2gpu.settings import SCHEMA, resolve, settings_doc

DOCS = Path(__file__).parent.parent / "docs" / "settings.md"


def test_defaults():
    s = resolve(environ={})
    assert s.staging_slots == 8 and s.staging_slot_bytes == 32 << 20
    assert s.copy_streams == 2 and s.use_pinned_host_fallback is True
    assert set(s.sources.values()) == {"default"}


def test_precedence_keyword_over_environment_over_default():
    env = {"BLOB2GPU_STAGING_SLOTS": "16", "BLOB2GPU_COPY_STREAMS": "4"}
    s = resolve({"staging_slots": 3}, environ=env)
    assert s.staging_slots == 3 and s.sources["staging_slots"] == "argument"
    assert s.copy_streams == 4 and s.sources["copy_streams"] == "env BLOB2GPU_COPY_STREAMS"


def test_deployment_variable_and_its_blob2gpu_name():
    s = resolve(environ={"USE_PINNED_HOST_FALLBACK": "false"})
    assert s.use_pinned_host_fallback is False
    assert s.sources["use_pinned_host_fallback"] == "env USE_PINNED_HOST_FALLBACK"
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
        ({"staging_slots": 1}, {}, r"'staging_slots' from argument .* at least 2"),
        ({}, {"BLOB2GPU_COPY_STREAMS": "many"}, r"from env BLOB2GPU_COPY_STREAMS .* integer"),
        ({"unsupported_dtype": "ignore"}, {}, r"one of 'raise', 'bytes'"),
        ({}, {"BLOB2GPU_USE_PINNED_HOST_FALLBACK": "maybe"}, r"true or false"),
        ({"stagingslots": 4}, {}, r"unknown setting 'stagingslots'.*staging_slots"),
        ({"io_threads": True}, {}, r"'io_threads'"),
    ],
)
def test_errors_name_key_source_and_valid_values(overrides, environ, match):
    with pytest.raises(ConfigError, match=match):
        resolve(overrides, environ=environ)


def test_pipeline_settings_belong_to_the_loader(write_checkpoint):
    directory = write_checkpoint([{"w": __import__("torch").ones(2)}])
    with blob2gpu.Loader() as loader, pytest.raises(InvalidArgument, match="Loader"):
        loader.load(str(directory), staging_slots=4)


def test_environment_reaches_the_core(write_checkpoint, monkeypatch):
    directory = write_checkpoint([{"w": __import__("torch").ones(2)}])
    monkeypatch.setenv("BLOB2GPU_IO_THREADS", "3")
    with blob2gpu.open(str(directory)) as checkpoint:
        checkpoint.to_dict()
        assert checkpoint.report.io_threads == 3
        assert checkpoint.report.settings["io_threads"] == 3


def test_docs_list_every_setting_and_are_generated():
    text = DOCS.read_text()
    assert text == settings_doc(), "regenerate: python -m blob2gpu.settings > docs/settings.md"
    for s in SCHEMA:
        assert f"`{s.env}`" in text
