"""The one schema of blob2gpu's settings: every tunable has one name, one default, one environment
variable and one line of documentation, here and nowhere else.

Precedence, highest first: keyword arguments, environment variables, defaults.
``python -m blob2gpu.settings`` prints the table that docs/settings.md holds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "BLOB2GPU_"
MiB = 1 << 20


@dataclass(frozen=True)
class Setting:
    """One tunable: its name, type, default and what it does."""

    name: str
    default: Any
    doc: str
    type: type
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    env_aliases: tuple[str, ...] = ()  # deployment variables that also set it (lower precedence)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SCHEMA: tuple[Setting, ...] = (
    Setting(
        "staging_slots",
        8,
        "Slots in the pinned staging ring; host memory used by a GPU load "
        "is slots x slot bytes, whatever the checkpoint size.",
        int,
        minimum=2,
        maximum=4096,
    ),
    Setting(
        "staging_slot_bytes",
        32 * MiB,
        "Bytes per staging slot, and the size of one read and "
        "one host-to-device copy. Accepts suffixes: 32MiB, 64M.",
        int,
        minimum=4096,
        maximum=1 << 34,
    ),
    Setting(
        "copy_streams",
        2,
        "CUDA streams that carry host-to-device copies.",
        int,
        minimum=1,
        maximum=64,
    ),
    Setting(
        "io_threads",
        4,
        "Core threads that read shards and fill slots (no GIL).",
        int,
        minimum=1,
        maximum=256,
    ),
    Setting(
        "use_pinned_host_fallback",
        True,
        "When pinning the staging ring is refused, use "
        "pageable memory (slower copies, recorded in the report) instead of failing.",
        bool,
        env_aliases=("USE_PINNED_HOST_FALLBACK",),
    ),
    Setting(
        "prefetch_concurrency",
        8,
        "Concurrent ranged GETs to Blob Storage (threads; bytes go from the socket straight into "
        "staging).",
        int,
        minimum=1,
        maximum=256,
    ),
    Setting(
        "chunk_bytes",
        0,
        "Bytes per ranged GET; 0 means staging_slot_bytes. On a GPU it is capped at "
        "staging_slot_bytes.",
        int,
        minimum=0,
        maximum=1 << 34,
    ),
    Setting(
        "retry_max_attempts",
        6,
        "Attempts per range (and per listing call) before a transient storage failure fails the "
        "load.",
        int,
        minimum=1,
        maximum=100,
    ),
    Setting(
        "retry_backoff_seconds",
        0.25,
        "First retry's backoff; it doubles each attempt, with jitter.",
        float,
    ),
    Setting("retry_backoff_max_seconds", 8.0, "Longest backoff between two attempts.", float),
    Setting(
        "read_timeout_seconds",
        30.0,
        "A storage socket silent this long is a transient failure (the range is retried from the "
        "last byte received).",
        float,
    ),
    Setting(
        "connect_timeout_seconds",
        10.0,
        "Time allowed to connect to the storage endpoint.",
        float,
    ),
    Setting(
        "on_blob_change",
        "fail",
        "A blob overwritten during a load: 'fail' raises BlobChanged; 'restart' lists again and "
        "reloads (load() only, up to 3 times). Never a mixed checkpoint.",
        str,
        choices=("fail", "restart"),
    ),
    Setting(
        "mmap_local_files",
        False,
        "cpu target, local files: map shards copy-on-write instead "
        "of reading them (zero-copy; pages are read on first touch).",
        bool,
    ),
    Setting(
        "unsupported_dtype",
        "raise",
        "What to do when the framework cannot hold a dtype "
        "(e.g. F4 in numpy): 'raise' DTypeNotSupported, or return the raw 'bytes' as uint8.",
        str,
        choices=("raise", "bytes"),
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SCHEMA}

# Environment variables read by the native core itself, documented with the rest.
CORE_ENVIRONMENT: dict[str, str] = {
    "BLOB2GPU_CUDA_DRIVER": "Path of the CUDA driver library to load instead of libcuda.so.1.",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SUFFIXES = {
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": MiB,
    "mib": MiB,
    "g": 1 << 30,
    "gib": 1 << 30,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}


def _valid_values(s: Setting) -> str:
    if s.choices:
        return "one of " + ", ".join(repr(c) for c in s.choices)
    if s.type is bool:
        return "true or false"
    if s.type is float:
        return "a number of seconds (0 or more)"
    if s.type is int:
        hi = f" and at most {s.maximum}" if s.maximum is not None else ""
        return f"an integer of at least {s.minimum}{hi}"
    return f"a {s.type.__name__}"


def _coerce(s: Setting, value: Any, source: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(
            f"setting '{s.name}' from {source} has the bad value {value!r}: "
            f"expected {_valid_values(s)}"
        )

    if s.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    if s.type is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            text = value.strip().lower().replace("_", "")
            number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
            suffix = text[len(number) :]
            if not number.isdigit() or (suffix and suffix not in _SUFFIXES):
                raise bad()
            value = int(number) * _SUFFIXES.get(suffix, 1)
        if not isinstance(value, int):
            raise bad()
        if (s.minimum is not None and value < s.minimum) or (
            s.maximum is not None and value > s.maximum
        ):
            raise bad()
        return value
    if s.type is float:
        if isinstance(value, bool):
            raise bad()
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad() from None
        if not number >= 0 or number == float("inf"):
            raise bad()
        return number
    if not isinstance(value, str):
        raise bad()
    if s.choices and value not in s.choices:
        raise bad()
    return value


@dataclass(frozen=True)
class ResolvedSettings:
    """Effective values and where each came from ('default', 'env BLOB2GPU_X', 'argument')."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def with_overrides(self, overrides: Mapping[str, Any]) -> ResolvedSettings:
        """A copy with some settings replaced by keyword arguments (validated)."""
        values, sources = dict(self.values), dict(self.sources)
        for key, value in overrides.items():
            s = _lookup(key, "argument")
            values[key] = _coerce(s, value, "argument")
            sources[key] = "argument"
        return ResolvedSettings(values, sources)


def _lookup(key: str, source: str) -> Setting:
    if key not in BY_NAME:
        raise ConfigError(
            f"unknown setting '{key}' from {source}; known settings: " + ", ".join(sorted(BY_NAME))
        )
    return BY_NAME[key]


def resolve(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> ResolvedSettings:
    """Resolve every setting from keyword arguments, then the environment, then defaults.

    Returns a ResolvedSettings. Raises ConfigError for an unknown key or a bad value, naming
    the key, its source and the valid values.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SCHEMA:
        values[s.name], sources[s.name] = s.default, "default"
        for var in (*s.env_aliases, s.env):  # the BLOB2GPU_ name wins over a deployment alias
            if var in env:
                values[s.name] = _coerce(s, env[var], f"env {var}")
                sources[s.name] = f"env {var}"
    return ResolvedSettings(values, sources).with_overrides(dict(overrides or {}))


def markdown_table() -> str:
    """The settings reference as a Markdown table (docs/settings.md is generated from it)."""
    lines = [
        "| setting | environment variable | default | what it does |",
        "| --- | --- | --- | --- |",
    ]
    for s in SCHEMA:
        env = f"`{s.env}`" + "".join(f", `{a}`" for a in s.env_aliases)
        lines.append(f"| `{s.name}` | {env} | `{s.default!r}` | {s.doc} |")
    for var, doc in CORE_ENVIRONMENT.items():
        lines.append(f"| (core) | `{var}` | `libcuda.so.1` | {doc} |")
    return "\n".join(lines) + "\n"


def settings_doc() -> str:
    """The whole docs/settings.md page."""
    return (
        "# Settings\n\nGenerated from `python/blob2gpu/settings.py` by "
        "`python -m blob2gpu.settings > docs/settings.md`; a test keeps them in step.\n\n"
        "Precedence, highest first: keyword arguments (`blob2gpu.load(..., staging_slots=16)`), "
        "environment variables, defaults.\n\n" + markdown_table()
    )


if __name__ == "__main__":
    print(settings_doc(), end="")
