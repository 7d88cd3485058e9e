"""The one schema of blob2gpu's settings: every tunable has one name, one default, one environment
variable, one config-file key and one line of documentation, here and nowhere else.

Sources, highest precedence first:
  1. keyword arguments        blob2gpu.load(uri, prefetch_concurrency=16)
  2. environment variables    BLOB2GPU_PREFETCH_CONCURRENCY=16, and the deployment variables
                              MODEL_LOAD_STRATEGY (direct-gpu | host-staging) and
                              USE_PINNED_HOST_FALLBACK
  3. a YAML or JSON file      --config FILE or BLOB2GPU_CONFIG=FILE, keys by section:
                              storage: {prefetch_concurrency: 16}
  4. defaults
``python -m blob2gpu.settings`` prints docs/settings.md.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from blob2gpu.documents import (
    CONFIG_MAX_BYTES,
    clip,
    clipped_repr,
    parse_json,
    parse_yaml,
    read_regular_file,
)
from blob2gpu.errors import ConfigError

ENV_PREFIX = "BLOB2GPU_"
CONFIG_ENV = "BLOB2GPU_CONFIG"
MiB = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class EnvAlias:
    """A deployment variable that also sets a setting (below the BLOB2GPU_ name in precedence).
    `values` maps its words to the setting's values; None takes the setting's own syntax."""

    name: str
    values: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Setting:
    """One tunable: its section and name, type, default and what it does."""

    section: str
    name: str
    default: Any
    type: type
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    aliases: tuple[EnvAlias, ...] = ()
    sized: bool = False  # 0 means "sized from the host", below the minimum

    @property
    def key(self) -> str:
        """The config-file key, e.g. 'storage.prefetch_concurrency'."""
        return f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


@dataclass(frozen=True)
class _Declared:
    """What a field of Settings says besides its name, type and default."""

    section: str
    doc: str
    choices: tuple[str, ...]
    minimum: float | None
    maximum: float | None
    aliases: tuple[EnvAlias, ...]
    sized: bool


def setting(
    section: str,
    default: T,
    doc: str,
    *,
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
    aliases: tuple[EnvAlias, ...] = (),
    sized: bool = False,
) -> T:
    """Declare one field of Settings: its default, section, doc line, choices or limits, and the
    deployment variables that also set it. sized: 0 is allowed below the minimum (the value is
    then sized from the host where it is used)."""
    declared = _Declared(section, doc, choices, minimum, maximum, aliases, sized)
    return field(default=default, metadata={"setting": declared})


@dataclass(frozen=True)
class Settings:
    """Every setting, a typed attribute each: the one declaration of every tunable (its name,
    type and default here; section, doc line and limits in setting()). SCHEMA, the config file's
    keys, the environment variables and docs/settings.md are derived from it, and a misspelt
    name fails the type check."""

    # -- the case study's keys ---------------------------------------------------------------------
    format: str = setting(
        "model",
        "safetensors",
        "Checkpoint format.",
        choices=("safetensors",),
    )
    direct_gpu_load: bool = setting(
        "model",
        True,
        "true: stream through the pinned ring into device memory (direct-gpu). false: read each "
        "whole shard into host memory, then copy it (host-staging: the baseline, kept to "
        "compare).",
        aliases=(EnvAlias("MODEL_LOAD_STRATEGY", {"direct-gpu": True, "host-staging": False}),),
    )
    shard_count: int = setting(
        "model",
        0,
        "If not 0, the number of shards the checkpoint must have (a deployment check).",
        minimum=0,
    )
    readiness_probe_initial_delay_seconds: float = setting(
        "startup",
        0.0,
        "Carried for deployment configs (the Kubernetes probe reads it); the loader only "
        "reports it.",
    )
    warmup_prompt: str = setting(
        "startup",
        "",
        "Prompt a serving integration sends to produce the first token; the loader only reports "
        "it.",
    )
    fail_if_checksum_mismatch: bool = setting(
        "startup",
        True,
        "A chunk that differs from the manifest fails the load (ChecksumMismatch) and returns "
        "no tensor; false completes the load and lists the mismatches in the report.",
    )
    emit_phase_timings: bool = setting(
        "observability",
        True,
        "Log the load's phases and throughput (logger 'blob2gpu') when a load completes.",
    )
    emit_gpu_memory_watermark: bool = setting(
        "observability",
        True,
        "Sample free GPU memory at each shard and report the lowest (the watermark) and the after.",
    )
    emit_first_token_latency: bool = setting(
        "observability",
        True,
        "Log each mark_first_token() and keep the process-wide first-token p50/p95.",
    )
    # -- staging and copies ------------------------------------------------------------------------
    staging_slots: int = setting(
        "staging",
        0,
        "Slots in the pinned staging ring; host memory used by a GPU load is slots x slot "
        "bytes, whatever the checkpoint size. 0: sized from the host: on a GPU, io_threads + "
        "2 x copy_streams + 2 (a slot per reading thread, two queued per stream, two spare) "
        "within pinned_staging_bytes; on cpu 8.",
        minimum=2,
        maximum=4096,
        sized=True,
    )
    staging_slot_bytes: int = setting(
        "staging",
        0,
        "Bytes per staging slot: one read and one host-to-device copy. 0: 32 MiB (on a GPU, "
        "less when pinned_staging_bytes cannot hold the slots at that size; never under 8 MiB). "
        "Accepts 32MiB, 64M, ...",
        minimum=4096,
        maximum=1 << 34,
        sized=True,
    )
    pinned_staging_bytes: int = setting(
        "staging",
        0,
        "GPU targets: the most host memory the staging ring may pin when staging_slots or "
        "staging_slot_bytes is sized from the host (0). 0: 1/32 of the host's memory (within the "
        "process's cgroup limit, shared among $LOCAL_WORLD_SIZE ranks), at least 64 MiB and at "
        "most 1 GiB. Accepts 512MiB, 1G, ...",
        minimum=0,
        maximum=1 << 40,
    )
    use_pinned_host_fallback: bool = setting(
        "staging",
        True,
        "When the driver has no memory left to pin the ring (out of memory), use pageable "
        "memory (slower copies, recorded in the report) instead of failing; other driver errors "
        "always fail the load.",
        aliases=(EnvAlias("USE_PINNED_HOST_FALLBACK"),),
    )
    copy_streams: int = setting(
        "staging",
        2,
        "CUDA streams that carry host-to-device copies.",
        minimum=1,
        maximum=64,
    )
    io_threads: int = setting(
        "staging",
        0,
        "Core threads that read local shards and NVMe cache hits, and check them (no GIL). 0: "
        "sized from the host: on a GPU, the CPUs this process may run on, at least 4 and at "
        "most 16; on cpu 4.",
        minimum=1,
        maximum=256,
        sized=True,
    )
    bind_numa_node: bool = setting(
        "staging",
        True,
        "GPU targets: pin the staging ring on the GPU's host NUMA node "
        "(CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID, else the PCI device's numa_node in sysfs) and run "
        "the io threads on that node's CPUs (those this process may use). Nothing is bound on a "
        "host without NUMA nodes.",
    )
    streamed_device_bytes: int = setting(
        "staging",
        0,
        "GPU device memory a streamed load (Checkpoint.stream(), iterating open(), the vLLM "
        "loader) holds beside what its consumer keeps: tensors landed and not yet handed out, "
        "or handed out by stream() and not yet dropped. Later tensor groups wait for it; the "
        "memory-fit check counts it, not the checkpoint. 0: min(4 GiB, 10% of the GPU's memory). "
        "A tensor larger than it (or a shard checked by Content-MD5, handed out only whole) "
        "raises it. load() is not bounded: it keeps what it returns. Accepts 2GiB, 512M, ...",
        minimum=0,
        maximum=1 << 50,
    )
    mmap_local_files: bool = setting(
        "staging",
        True,
        "cpu target, local files and NVMe cache hits: map shards copy-on-write instead of "
        "reading them (zero-copy, like safetensors; pages are read on first touch, and a "
        "manifest or the cache's checksums still check every chunk). false: read them into "
        "fresh memory (the file may change later without effect).",
    )
    # -- storage -----------------------------------------------------------------------------------
    prefetch_concurrency: int = setting(
        "storage",
        8,
        "Most concurrent ranged GETs to Blob Storage (bytes go from the socket straight into "
        "staging): a ceiling; a load opens at it (at one, growing back to it, when a load on "
        "its node was throttled in the last 30 s) and lowers it while throttled.",
        minimum=1,
        maximum=256,
    )
    chunk_bytes: int = setting(
        "storage",
        0,
        "Bytes per ranged GET; 0 means staging_slot_bytes (and on a GPU it is capped there).",
        minimum=0,
        maximum=1 << 34,
    )
    retry_max_attempts: int = setting(
        "storage",
        6,
        "Attempts per range (and per listing call) before a transient failure fails the load.",
        minimum=1,
        maximum=100,
    )
    retry_backoff_seconds: float = setting(
        "storage",
        0.25,
        "First retry's backoff; it doubles each attempt, with jitter. A 429 or 503 without a "
        "Retry-After waits at least 0.5-1 s (up to retry_throttled_seconds), or this backoff if "
        "longer: an account enforces its limits per second.",
    )
    retry_backoff_max_seconds: float = setting(
        "storage",
        8.0,
        "Longest backoff between two attempts.",
    )
    retry_throttled_seconds: float = setting(
        "storage",
        120.0,
        "A throttled request (429, 503 ServerBusy) keeps retrying past retry_max_attempts until "
        "it has waited this long: a fleet starting at once is shed, not failed. A server's "
        "Retry-After, and the wait of a throttled answer without one, are honoured up to this "
        "long.",
    )
    read_timeout_seconds: float = setting(
        "storage",
        30.0,
        "A storage socket silent this long is a transient failure (retried from the last byte).",
    )
    connect_timeout_seconds: float = setting(
        "storage",
        10.0,
        "Time allowed to connect to the storage endpoint.",
    )
    native_http: bool = setting(
        "storage",
        True,
        "Read a Blob load's listing, index, manifest and ranges, and fetch_aux's files, with the "
        "core's HTTP/1.1 reader (TLS from the process's OpenSSL) straight into memory, without "
        "the GIL. false: through azure-storage-blob on Python threads (to debug, or where the "
        "process has no libssl). Publishing always uses azure-storage-blob.",
    )
    on_blob_change: str = setting(
        "storage",
        "fail",
        "A blob overwritten mid-load: 'fail' raises BlobChanged; 'restart' lists again and "
        "fetches again the changed blobs and the shards not complete yet, keeping complete "
        "shards whose blob is unchanged (load() only, up to 3 times). Never a mixed checkpoint.",
        choices=("fail", "restart"),
    )
    local_nvme_cache_enabled: bool = setting(
        "storage",
        False,
        "Keep Blob shards on local disk (cache_dir) as they stream, and load later starts from "
        "there; Blob stays the source of truth.",
    )
    cache_dir: str = setting(
        "storage",
        "",
        "The NVMe cache directory; empty means $XDG_CACHE_HOME/blob2gpu or ~/.cache/blob2gpu. "
        "It also holds the node's Blob throttling state (locks/throttle*.state), even with the "
        "cache off: pods share one throttling budget only when it is a shared hostPath.",
    )
    cache_max_bytes: int = setting(
        "storage",
        0,
        "Cap of the cache; least recently used entries are evicted to stay under it. 0: no cap.",
        minimum=0,
        maximum=1 << 50,
    )
    cache_direct_io: bool = setting(
        "storage",
        True,
        "Read cache hits with O_DIRECT straight into the staging ring (GPU targets), bypassing "
        "the page cache, where the cache's filesystem allows it (else buffered reads).",
    )
    cache_write_queue_bytes: int = setting(
        "storage",
        1 << 28,
        "Bytes of a load's write-through copies queued for the cache disk; a shard that would "
        "overflow it is not written during the load (the load never waits for the disk) and is "
        "left to the cache fill.",
        minimum=0,
        maximum=1 << 40,
    )
    cache_fill: bool = setting(
        "storage",
        True,
        "After a load returns, fetch from Blob what the cache still lacks of it (shards the "
        "write-through writer skipped), in the background, one shard at a time: one load leaves "
        "the cache complete. false: only the write-through writes.",
    )
    cache_fill_bytes_per_second: int = setting(
        "storage",
        200_000_000,
        "Most bytes per second the cache fill (and `blob2gpu cache warm`) fetches, so it does "
        "not crowd the serving process's network and disk. 0: no bound. Accepts 200MB, 1GB, ...",
        minimum=0,
        maximum=1 << 40,
    )
    # -- integrity ---------------------------------------------------------------------------------
    verify: str = setting(
        "integrity",
        "auto",
        "auto: check every chunk's CRC32C against blob2gpu.manifest.json when the checkpoint "
        "has one, else each blob against its Content-MD5 when every blob has one, else size and "
        "etag only (flagged in the report); crc32c: require the manifest; sha256: require it "
        "and check every chunk's SHA-256 (tamper evidence, ~1 CPU s/GB); none: no checks.",
        choices=("auto", "crc32c", "sha256", "none"),
    )
    # -- guardrails --------------------------------------------------------------------------------
    check_memory_fit: bool = setting(
        "guardrails",
        True,
        "Before any download, check free GPU memory (or host RAM) against the weights x headroom.",
    )
    gpu_headroom_factor: float = setting(
        "guardrails",
        1.1,
        "Free GPU memory needed, as a multiple of the weight bytes (allocator overhead, buffers).",
        minimum=1.0,
        maximum=100.0,
    )
    host_headroom_factor: float = setting(
        "guardrails",
        1.1,
        "Available host RAM needed for the cpu target and host-staging, as a multiple of the "
        "weight bytes.",
        minimum=1.0,
        maximum=100.0,
    )
    host_memory_limit_bytes: int = setting(
        "guardrails",
        0,
        "Host RAM the memory-fit check may count on, when less than what is available (the "
        "machine's MemAvailable, bounded by this process's cgroup memory limit, which is read "
        "on its own): room kept for others in the same pod. 0: no limit of its own.",
        minimum=0,
        maximum=1 << 50,
    )
    # -- export ------------------------------------------------------------------------------------
    unsupported_dtype: str = setting(
        "export",
        "raise",
        "When the framework cannot hold a dtype (e.g. F4 in numpy): 'raise' DTypeNotSupported, "
        "or return the raw 'bytes' as uint8.",
        choices=("raise", "bytes"),
    )


_TYPES: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}
SCHEMA: tuple[Setting, ...] = tuple(
    Setting(
        d.section,
        f.name,
        f.default,
        _TYPES[str(f.type)],
        d.doc,
        d.choices,
        d.minimum,
        d.maximum,
        d.aliases,
        d.sized,
    )
    for f in fields(Settings)
    for d in [f.metadata["setting"]]
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SCHEMA}
BY_KEY: dict[str, Setting] = {s.key: s for s in SCHEMA}
assert len(BY_NAME) == len(SCHEMA), "setting names must be unique"

# Environment variables read elsewhere, documented with the rest.
OTHER_ENVIRONMENT: dict[str, tuple[str, str]] = {
    CONFIG_ENV: ("(none)", "Path of the YAML (or JSON: *.json) config file (same as --config)."),
    "MODEL_SOURCE_URI": (
        "(none)",
        "Checkpoint URI used when load()/open()/`blob2gpu load` get none.",
    ),
    "BLOB2GPU_CUDA_DRIVER": ("libcuda.so.1", "CUDA driver library the core loads."),
    "BLOB2GPU_TEST_REAL_GPU": ("(none)", "Tests only: 1 runs the GPU tests on a real GPU."),
    "FAKE_CUDA_LINK_GBPS": (
        "(none)",
        "Tests only: the fake CUDA driver's modelled host-to-device link, in GB/s "
        "(tests/fake_cuda/README.md); unset: copies take what the fake's memcpy takes.",
    ),
    "BLOB2GPU_REQUIRE_VLLM": (
        "(none)",
        "Tests only: 1 makes the vLLM serving tests fail, not skip, without vLLM.",
    ),
    "PROMETHEUS_MULTIPROC_DIR": (
        "(none)",
        "prometheus_client's multiprocess directory (empty at start): with vLLM, the workers' "
        "load metrics then show in vLLM's /metrics.",
    ),
    "BLOB2GPU_VLLM_ENV": (
        "~/.cache/blob2gpu-ci/vllm-cpu-...",
        "scripts/test_vllm.sh only: the virtual environment vLLM's tests run in.",
    ),
    "AZURE_STORAGE_CONNECTION_STRING": ("(none)", "Account (and key or SAS) for az:// URIs."),
    "AZURE_STORAGE_ACCOUNT_NAME": (
        "(none)",
        "Account for az:// URIs (credential from AZURE_STORAGE_KEY, a SAS, or an Entra identity).",
    ),
    "AZURE_STORAGE_KEY": ("(none)", "Account key for Blob URIs."),
    "AZURE_STORAGE_SAS_TOKEN": ("(none)", "SAS token for Blob URIs."),
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
    low = s.minimum if s.minimum is not None else 0
    high = f" and at most {s.maximum:g}" if s.maximum is not None else ""
    if s.sized:
        return f"0 (sized from the host) or an integer of at least {low:g}{high}"
    if s.type is float:
        return f"a number of at least {low:g}{high}"
    if s.type is int:
        return f"an integer of at least {low:g}{high}"
    return "a string"


def _coerce(s: Setting, value: Any, source: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(
            f"setting '{s.name}' ({s.key}) from {source} has the bad value "
            f"{clipped_repr(value)}: expected {_valid_values(s)}"
        )

    if s.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    if s.type in (int, float):
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            text = value.strip().lower().replace("_", "")
            number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
            suffix = text[len(number) :]
            if suffix and (s.type is float or suffix not in _SUFFIXES):
                raise bad()
            try:
                value = (int(number) if s.type is int else float(number)) * _SUFFIXES.get(suffix, 1)
            except ValueError:
                raise bad() from None
        if s.type is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if s.type is int and not isinstance(value, int):
            raise bad()
        if not isinstance(value, (int, float)) or value != value or value in (float("inf"),):
            raise bad()
        value = s.type(value)
        low = s.minimum if s.minimum is not None else 0
        if (value < low and not (s.sized and value == 0)) or (
            s.maximum is not None and value > s.maximum
        ):
            raise bad()
        return value
    if not isinstance(value, str):
        raise bad()
    if s.choices and value not in s.choices:
        raise bad()
    return value


_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def _unknown(key: object, source: str, known: list[str]) -> ConfigError:
    """ConfigError for a key that names no setting. A key that could be a setting's name is
    shown (clipped); any other (a line of a file that is no config file: /etc/shadow's
    'root:*:...') is not: what a file holds is not echoed."""
    text = str(key)
    close: list[str] = []
    if _SETTING_NAME.fullmatch(text):
        close = difflib.get_close_matches(text, known, n=1) if len(text) <= 200 else []
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        said = f"unknown setting '{clip(text)}' from {source}{guess}"
    else:
        said = f"unknown setting from {source}: a key that is no setting name (not shown)"
    return ConfigError(
        said + "; known settings: " + ", ".join(sorted(known)),
        hint=f"did you mean '{close[0]}'?" if close else None,  # said in the message already
    )


@dataclass(frozen=True)
class ResolvedSettings(Settings):
    """Effective values (typed attributes, see Settings) and where each came from ('default',
    'env X', 'config FILE', 'argument')."""

    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, Any]:
        """Every setting's value by name."""
        return {s.name: getattr(self, s.name) for s in SCHEMA}

    def with_overrides(self, overrides: Mapping[str, Any]) -> ResolvedSettings:
        """A copy with some settings replaced by keyword arguments (validated)."""
        values, sources = {}, dict(self.sources)
        for key, value in overrides.items():
            if key not in BY_NAME:
                raise _unknown(key, "argument", list(BY_NAME))
            values[key] = _coerce(BY_NAME[key], value, "argument")
            sources[key] = "argument"
        return replace(self, **values, sources=sources)

    def as_sections(self) -> dict[str, dict[str, Any]]:
        """The values nested by section, as a config file writes them."""
        out: dict[str, dict[str, Any]] = {}
        for s in SCHEMA:
            out.setdefault(s.section, {})[s.name] = self.values[s.name]
        return out


SECTIONS = frozenset(s.section for s in SCHEMA)


def _flatten(doc: Mapping[Any, Any]) -> dict[str, Any]:
    """{section.name: value} of a config document: keys nested under their section or dotted.
    Only a section's mapping is entered (a document's other mappings are unknown keys, however
    deep or aliased they are)."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, Mapping) and key in SECTIONS:
            for name, inner in value.items():
                flat[f"{key}.{name}"] = inner
        else:
            flat[str(key)] = value
    return flat


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON (a name ending in .json) config into {setting name: value}. Keys are
    section.name, nested or dotted.

    Raises ConfigError for a file that is not a regular file or is larger than
    documents.CONFIG_MAX_BYTES, an unreadable one, bad YAML or JSON, an unknown key or a bad
    value, naming the file and the key; nothing else of the file is quoted.
    """
    source = f"config {path}"
    where = f"config file '{clip(path, 200)}'"
    data = read_regular_file(path, CONFIG_MAX_BYTES, ConfigError, "config file")
    if str(path).endswith(".json"):
        doc = parse_json(data, ConfigError, where)
    else:
        try:
            import yaml  # noqa: F401
        except ImportError:
            raise ConfigError("YAML config files need PyYAML: pip install pyyaml") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where} is not UTF-8 text (byte {e.start} is not)") from None
        doc = parse_yaml(text, ConfigError, where)
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where} must be a mapping of sections to settings")
    out: dict[str, Any] = {}
    for key, value in _flatten(doc).items():
        if key not in BY_KEY:
            raise _unknown(key, source, list(BY_KEY))
        s = BY_KEY[key]
        out[s.name] = _coerce(s, value, source)
    return out


def _check_environment_names(env: Mapping[str, str]) -> None:
    """Raises ConfigError for a BLOB2GPU_ variable that names no setting and nothing else that
    blob2gpu reads (OTHER_ENVIRONMENT), naming the closest known one: a misspelt variable is
    not silently ignored."""
    known = [s.env for s in SCHEMA] + [v for v in OTHER_ENVIRONMENT if v.startswith(ENV_PREFIX)]
    for name in env:
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown environment variable '{clip(name)}'{hint}: blob2gpu reads no such "
                "variable",
                hint="unset it, or see docs/settings.md for the known ones",
            )


def resolve(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | os.PathLike[str] | None = None,
) -> ResolvedSettings:
    """Resolve every setting: keyword arguments, then environment, then the config file, then
    defaults. The config file is `config_path`, else $BLOB2GPU_CONFIG, else none.

    Returns a ResolvedSettings. Raises ConfigError for an unknown key or a bad value, naming the
    key, its source and the valid values.
    """
    env = os.environ if environ is None else environ
    _check_environment_names(env)
    values = {s.name: s.default for s in SCHEMA}
    sources = dict.fromkeys(values, "default")
    path = config_path or env.get(CONFIG_ENV)
    if path:
        for name, value in read_config_file(path).items():
            values[name], sources[name] = value, f"config {path}"
    for s in SCHEMA:
        for alias in s.aliases:  # deployment variables first: the BLOB2GPU_ name wins
            if alias.name in env:
                raw = env[alias.name]
                if alias.values is not None:
                    word = raw.strip().lower()
                    if word not in alias.values:
                        raise ConfigError(
                            f"{alias.name}={clipped_repr(raw)} is not one of "
                            + ", ".join(repr(w) for w in alias.values)
                        )
                    values[s.name] = alias.values[word]
                else:
                    values[s.name] = _coerce(s, raw, f"env {alias.name}")
                sources[s.name] = f"env {alias.name}"
        if s.env in env:
            values[s.name] = _coerce(s, env[s.env], f"env {s.env}")
            sources[s.name] = f"env {s.env}"
    return ResolvedSettings(**values, sources=sources).with_overrides(dict(overrides or {}))


def markdown_table() -> str:
    """The settings reference as a Markdown table (docs/settings.md is generated from it)."""
    lines = [
        "| setting (keyword) | config key | environment | default | what it does |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in SCHEMA:
        env = f"`{s.env}`" + "".join(f", `{a.name}`" for a in s.aliases)
        lines.append(f"| `{s.name}` | `{s.key}` | {env} | `{s.default!r}` | {s.doc} |")
    lines.append("")
    lines.append("| other environment variable | default | what it does |")
    lines.append("| --- | --- | --- |")
    for var, (default, doc) in OTHER_ENVIRONMENT.items():
        lines.append(f"| `{var}` | `{default}` | {doc} |")
    return "\n".join(lines) + "\n"


def settings_doc() -> str:
    """The whole docs/settings.md page."""
    return (
        "# Settings\n\nGenerated from `python/blob2gpu/settings.py` by "
        "`python -m blob2gpu.settings > docs/settings.md`; a test keeps them in step.\n\n"
        "Precedence, highest first: keyword arguments (`blob2gpu.load(..., staging_slots=16)`), "
        "environment variables, the YAML or JSON config file (`--config FILE` or "
        "`BLOB2GPU_CONFIG`), defaults. In the file, keys go under their section:\n\n"
        "```yaml\nmodel:\n  direct_gpu_load: true\nstorage:\n  prefetch_concurrency: 8\n"
        "observability:\n  emit_phase_timings: true\n```\n\n" + markdown_table()
    )


if __name__ == "__main__":
    print(settings_doc(), end="")
