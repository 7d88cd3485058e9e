"""What a vLLM load through blob2gpu reads, from vLLM's ``--model-loader-extra-config`` JSON:

    {"source": "az://models/llama/", "verify": "crc32c", "local_nvme_cache_enabled": true}

`source` is the checkpoint's URI (else $MODEL_SOURCE_URI, else the model directory vLLM was given:
its own safetensors files, read through blob2gpu). `config` names a blob2gpu settings file (YAML,
or JSON; a regular file of at most 1 MiB, of which no content is echoed in an error),
`report_path` where each worker writes its LoadReport as JSON ('{rank}': its rank among all the
engine's workers), `distributed` (default true) whether tensor-parallel workers share one copy of
a Blob checkpoint (the fan-out). Every other
key is a blob2gpu setting (blob2gpu.settings), checked by its schema: an unknown key or a bad
value stops the engine with ConfigError before anything is read. Imports nothing of vLLM.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blob2gpu.documents import clipped_repr
from blob2gpu.errors import ConfigError
from blob2gpu.loading.request import SOURCE_URI_ENV
from blob2gpu.settings import resolve

# The keys of the extra config that are this integration's, not blob2gpu settings.
OPTION_KEYS = ("source", "config", "report_path", "distributed")


@dataclass(frozen=True)
class VllmLoadOptions:
    """The integration's options and the blob2gpu settings given in vLLM's extra config."""

    source: str | None = None
    config: str | None = None
    report_path: str | None = None
    distributed: bool = True
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> VllmLoadOptions:
        """The options of `extra` (vLLM's model_loader_extra_config; None or {} for none).
        Raises ConfigError for a bad option, an unknown setting or a bad value (the schema's
        message: the key, where it came from, the valid values)."""
        if extra is None:
            extra = {}
        if not isinstance(extra, Mapping):
            raise ConfigError(
                f"--model-loader-extra-config for load format 'blob2gpu' must be a JSON object, "
                f"not {type(extra).__name__}"
            )
        values = dict(extra)
        options = {key: values.pop(key) for key in OPTION_KEYS if key in values}
        problems = []
        for key in ("source", "config", "report_path"):
            value = options.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                problems.append(f"'{key}' must be a non-empty string, not {clipped_repr(value)}")
        distributed = options.get("distributed", True)
        if not isinstance(distributed, bool):
            problems.append(f"'distributed' must be true or false, not {clipped_repr(distributed)}")
        settings = dict(values)
        config = options.get("config") if isinstance(options.get("config"), str) else None
        problems += settings_problems(settings, config or None)
        if problems:
            raise ConfigError("--model-loader-extra-config: " + "; ".join(problems))
        return cls(
            source=options.get("source"),
            config=config or None,
            report_path=options.get("report_path"),
            distributed=distributed,
            settings=settings,
        )

    def uri(self, model_dir: str) -> str:
        """The checkpoint to load: `source`, else $MODEL_SOURCE_URI, else `model_dir` (the model
        vLLM was given: a directory of safetensors files)."""
        return self.source or os.environ.get(SOURCE_URI_ENV) or model_dir

    def report_file(self, rank: int, world: int) -> str | None:
        """Where worker `rank` of `world` writes its report: report_path with '{rank}' replaced,
        or, without '{rank}' and with several workers, report_path with '.rank<N>' added; None
        when no report_path is set."""
        path = self.report_path
        if path is None:
            return None
        if "{rank}" in path:
            return path.replace("{rank}", str(rank))
        return f"{path}.rank{rank}" if world > 1 else path


def settings_problems(settings: Mapping[str, Any], config_path: str | None) -> list[str]:
    """What is wrong with each bad key of `settings` (unknown, or a bad value: the schema's
    message for each), so that a start that fails on the extra config says all there is to fix.
    Checked in the process that reads the option, before anything is fetched; each worker
    resolves them again with its own environment. Raises ConfigError, unchanged, for a bad
    environment variable or config file (which name themselves: not the extra config's)."""
    base = resolve({}, config_path=config_path)
    problems = []
    for key, value in settings.items():
        try:
            base.with_overrides({key: value})
        except ConfigError as error:
            problems.append(error.message)
    return problems
