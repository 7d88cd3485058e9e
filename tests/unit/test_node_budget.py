"""node_budget: where a Blob load's node throttling state lives, and that a node without a usable
cache directory (a read-only one, or no home at all) leaves the load to adapt alone rather than
fail it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from blob2gpu.cache import nvme
from blob2gpu.errors import ConfigError
from blob2gpu.settings import resolve
from blob2gpu.sources.azure.source import node_budget
from blob2gpu.sources.azure.throttle import NodeThrottle
from support.node_state import wait_left


def _prepared(cache_dir: str | None, retry_throttled_seconds: float = 120.0) -> Any:
    """The settings of a load with the cache off, as node_budget reads them."""
    return resolve(
        {"cache_dir": cache_dir or "", "retry_throttled_seconds": retry_throttled_seconds},
        environ={},
    )


def _no_home() -> Path:
    raise RuntimeError("Could not determine home directory.")


def test_the_node_state_is_in_the_default_cache_dir_with_the_cache_off(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(Path, "home", _no_home)  # not looked up when XDG_CACHE_HOME says
    node = node_budget(_prepared(None))
    assert isinstance(node, NodeThrottle)
    assert node.path.parent == tmp_path / "blob2gpu" / "locks"


def test_no_home_and_no_cache_dir_means_the_load_adapts_alone(monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(Path, "home", _no_home)
    with pytest.raises(ConfigError, match="set cache_dir"):
        nvme.default_cache_dir()
    assert node_budget(_prepared(None)) is None


def test_a_configured_cache_dir_needs_no_home(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "home", _no_home)
    node = node_budget(_prepared(str(tmp_path / "cache")))
    assert isinstance(node, NodeThrottle) and node.path.parent == tmp_path / "cache" / "locks"


def test_the_node_s_waits_are_bounded_by_the_load_s_retry_throttled_seconds(tmp_path):
    # A wait further ahead than the load could be asked to stay away was not written by a loader.
    node = node_budget(_prepared(str(tmp_path), retry_throttled_seconds=5.0))
    assert isinstance(node, NodeThrottle) and node.max_wait_seconds == 5.0
    NodeThrottle(tmp_path / "locks").publish(60.0)
    assert wait_left(node) == 0.0


def test_a_cache_dir_that_cannot_be_made_means_the_load_adapts_alone(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    assert node_budget(_prepared(str(tmp_path / "file" / "cache"))) is None


def test_the_cache_on_without_a_home_is_a_config_error_naming_the_fix(monkeypatch):
    # Not Path.home()'s untyped RuntimeError from deep inside the load.
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(Path, "home", _no_home)
    with pytest.raises(ConfigError, match=r"set cache_dir \(BLOB2GPU_CACHE_DIR\)"):
        nvme.NvmeCache(None)
