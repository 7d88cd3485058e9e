"""The vLLM integration without vLLM: its options (--model-loader-extra-config) are checked by the
settings schema, and importing it imports nothing of vLLM."""

from __future__ import annotations

import subprocess
import sys

import pytest
from blob2gpu.errors import ConfigError
from blob2gpu.integrations.vllm.options import VllmLoadOptions


def test_source_and_settings_are_read_and_checked():
    options = VllmLoadOptions.from_extra_config(
        {"source": "az://models/llama/", "verify": "crc32c", "prefetch_concurrency": "16"}
    )
    assert options.source == "az://models/llama/"
    assert options.settings == {"verify": "crc32c", "prefetch_concurrency": "16"}
    assert options.distributed is True and options.report_path is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"prefetch_concurency": 4}, "did you mean 'prefetch_concurrency'"),
        ({"verify": "md5"}, r"extra-config: setting 'verify' .* bad value 'md5'"),
        ({"source": 3}, "extra-config: 'source' must be a non-empty string"),
        ({"distributed": "yes"}, "extra-config: 'distributed' must be true"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_options_are_config_errors(extra, message):
    with pytest.raises(ConfigError, match=message):
        VllmLoadOptions.from_extra_config(extra)


def test_every_bad_key_is_named_in_one_error():
    extra = {"verify": "crc32c", "prefetch_concurency": 4, "io_threads": "many"}
    with pytest.raises(ConfigError) as info:
        VllmLoadOptions.from_extra_config(extra)
    message = str(info.value)
    assert message.startswith("--model-loader-extra-config: unknown setting 'prefetch_concurency'")
    assert "setting 'io_threads'" in message and "bad value 'many'" in message
    assert "'verify'" not in message  # a good key is not a problem
    # The plugin's own keys are named in the same error.
    with pytest.raises(ConfigError) as info:
        VllmLoadOptions.from_extra_config({"source": "", "distributed": 1, "io_threads": "x"})
    assert "'source' must be" in str(info.value) and "'distributed' must be" in str(info.value)
    assert "setting 'io_threads'" in str(info.value)


def test_a_bad_environment_variable_is_not_blamed_on_the_extra_config(monkeypatch):
    monkeypatch.setenv("BLOB2GPU_IO_THREADS", "many")
    with pytest.raises(ConfigError) as info:
        VllmLoadOptions.from_extra_config({"verify": "crc32c"})
    assert "BLOB2GPU_IO_THREADS" in str(info.value)
    assert "extra-config" not in str(info.value)


def test_the_source_falls_back_to_the_environment_then_the_model_directory(monkeypatch):
    options = VllmLoadOptions.from_extra_config(None)
    monkeypatch.delenv("MODEL_SOURCE_URI", raising=False)
    assert options.uri("/srv/llama") == "/srv/llama"
    monkeypatch.setenv("MODEL_SOURCE_URI", "az://models/llama")
    assert options.uri("/srv/llama") == "az://models/llama"
    given = VllmLoadOptions.from_extra_config({"source": "az://other/m"})
    assert given.uri("/srv/llama") == "az://other/m"


def test_each_worker_writes_its_own_report():
    one = VllmLoadOptions.from_extra_config({"report_path": "/r/load.json"})
    assert one.report_file(0, 1) == "/r/load.json"
    assert one.report_file(1, 2) == "/r/load.json.rank1"
    ranked = VllmLoadOptions.from_extra_config({"report_path": "/r/load-{rank}.json"})
    assert ranked.report_file(1, 2) == "/r/load-1.json"
    assert VllmLoadOptions.from_extra_config({}).report_file(0, 1) is None


def test_importing_the_plugin_imports_neither_vllm_nor_torch():
    code = (
        "import sys, blob2gpu, blob2gpu.integrations.vllm as p, blob2gpu.integrations.vllm.options;"
        "assert callable(p.register);"
        "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_entry_point_names_register():
    from importlib.metadata import entry_points

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "blob2gpu"]
    assert plugin.value == "blob2gpu.integrations.vllm:register"


def test_the_config_key_reads_no_file_into_its_error(tmp_path):
    # Any file the engine's user may name: its content never reaches the engine's log.
    import os

    shadow = tmp_path / "shadow"
    shadow.write_text("root:*:19700:0:99999:7:::\ndaemon:*:19700:0:99999:7:::\n")
    with pytest.raises(ConfigError) as info:
        VllmLoadOptions.from_extra_config({"config": str(shadow)})
    assert "root:" not in str(info.value) and "19700" not in str(info.value)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # a read would wait for a writer forever
    with pytest.raises(ConfigError, match="not a regular file"):
        VllmLoadOptions.from_extra_config({"config": str(fifo)})
    with pytest.raises(ConfigError, match="not a regular file"):
        VllmLoadOptions.from_extra_config({"config": "/dev/zero"})


def test_a_huge_value_in_the_extra_config_makes_no_huge_message():
    huge = "A" * (50 << 20)
    for extra in ({"prefetch_concurrency": huge}, {"source": [huge]}, {"distributed": huge}):
        with pytest.raises(ConfigError) as info:
            VllmLoadOptions.from_extra_config(extra)
        assert len(str(info.value)) < 2000
    with pytest.raises(ConfigError, match="unknown setting") as info:
        VllmLoadOptions.from_extra_config({huge: 1})
    assert len(str(info.value)) < 2000
