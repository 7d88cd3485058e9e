"""Loader: keeps the staging ring, core threads and CUDA streams between loads."""

from __future__ import annotations

import time
from typing import Any

from . import _core
from .checkpoint import Checkpoint
from .errors import BlobChanged, InvalidArgument
from .frameworks import converter
from .report import LoadReport
from .settings import ResolvedSettings, resolve
from .sources import resolve as resolve_source
from .sources.azure_blob import is_blob_uri

# Settings fixed when a target's pipeline is built; the others may change per load.
PIPELINE_SETTINGS = (
    "staging_slots",
    "staging_slot_bytes",
    "copy_streams",
    "io_threads",
    "use_pinned_host_fallback",
)


def normalize_device(device: str) -> str:
    """'cpu', 'cuda' or 'cuda:N' -> the canonical form; raises InvalidArgument otherwise."""
    device = str(device).strip().lower()
    if device == "cpu":
        return device
    if device == "cuda":
        return "cuda:0"
    if device.startswith("cuda:") and device[5:].isdigit():
        return f"cuda:{int(device[5:])}"
    raise InvalidArgument(f"device '{device}' is not one of 'cpu', 'cuda', 'cuda:N'")


class Loader:
    """A reusable loader. Settings given here apply to every load (see blob2gpu.settings).

    Pinned staging and streams are allocated on the first load to each device and kept until
    close(), so later loads skip that cost.
    """

    def __init__(self, **settings: Any) -> None:
        self._settings: ResolvedSettings = resolve(settings)
        self._pipelines: dict[str, _core.LoadPipeline] = {}
        self._closed = False

    @property
    def settings(self) -> ResolvedSettings:
        return self._settings

    def _pipeline(self, device: str) -> _core.LoadPipeline:
        if self._closed:
            raise InvalidArgument("this Loader is closed")
        if device not in self._pipelines:
            s = self._settings
            self._pipelines[device] = _core.LoadPipeline(
                device, **{name: s.values[name] for name in PIPELINE_SETTINGS}
            )
        return self._pipelines[device]

    def open(
        self,
        uri: str,
        device: str = "cpu",
        framework: str = "torch",
        credential: Any = None,
        **settings: Any,
    ) -> Checkpoint:
        """Start loading `uri` and return a Checkpoint at once (tensors arrive as it is iterated).

        uri: a local file, directory or index, or a Blob URI (az://, https://, path-style http://).
        credential: for Blob URIs, an azure credential, account key or SAS (without it, see
        sources.azure_blob.resolve_credential for the environment variables read).
        Raises SourceUnavailable (BlobNotFound, AccessDenied, ...), InvalidArgument, ConfigError
        before any weight is read; errors of the load itself (InvalidHeader, GPUOutOfMemory,
        BlobChanged, StorageUnavailable, ...) surface while iterating.
        """
        device = normalize_device(device)
        bad = [k for k in settings if k in PIPELINE_SETTINGS]
        if bad:
            raise InvalidArgument(f"{', '.join(bad)} must be given to Loader(...), not per load")
        effective = self._settings.with_overrides(settings)
        convert = converter(framework, device, effective.unsupported_dtype)
        started_at, clock_start = time.time(), time.perf_counter()
        if is_blob_uri(uri):
            return self._open_blob(
                uri, device, framework, convert, effective, credential, started_at, clock_start
            )
        plan = resolve_source(uri)
        pipeline = self._pipeline(device)
        report = LoadReport(
            uri=plan.uri,
            device=device,
            framework=framework,
            started_at=started_at,
            settings=dict(effective.values),
            source="local",
            _clock_start=clock_start,
        )
        report.phases["artifact_fetch_start"] = 0.0
        session = pipeline.start_local(
            [s.path for s in plan.shards],
            [s.name for s in plan.shards],
            mmap=bool(effective.mmap_local_files and device == "cpu"),
        )
        return Checkpoint(session, plan, convert, report)

    def _open_blob(
        self,
        uri: str,
        device: str,
        framework: str,
        convert: Any,
        effective: ResolvedSettings,
        credential: Any,
        started_at: float,
        clock_start: float,
    ) -> Checkpoint:
        from .sources.blob_client import open_container
        from .sources.blob_feeder import BlobFeeder

        container = open_container(uri, effective, credential)
        plan = container.list_checkpoint().plan
        pipeline = self._pipeline(device)
        slot_bytes = self._settings.staging_slot_bytes
        chunk = effective.chunk_bytes or slot_bytes
        if device != "cpu":
            chunk = min(chunk, slot_bytes)  # a range lands in one staging slot
        report = LoadReport(
            uri=container.display_uri,
            device=device,
            framework=framework,
            started_at=started_at,
            settings=dict(effective.values),
            source="azure-blob",
            credential=container.credential_source,
            _clock_start=clock_start,
        )
        report.phases["artifact_fetch_start"] = 0.0
        session = pipeline.start_fed([s.name for s in plan.shards], [s.size for s in plan.shards])
        feeder = BlobFeeder(
            session, plan, container.client, container.retry, effective.prefetch_concurrency, chunk
        )
        checkpoint = Checkpoint(session, plan, convert, report, feeder=feeder)
        feeder.start()
        return checkpoint

    def load(
        self,
        uri: str,
        device: str = "cpu",
        framework: str = "torch",
        credential: Any = None,
        **settings: Any,
    ) -> dict[str, Any]:
        """Load every tensor of `uri` onto `device`; returns {name: tensor}.

        Returns once every byte has landed. Raises the load's typed error (see blob2gpu.errors)
        after releasing everything the load allocated. With on_blob_change='restart', a blob
        overwritten during the load makes it list again and start over (at most 3 times).
        """
        restart = self._settings.with_overrides(settings).on_blob_change == "restart"
        restarts_left = 3 if restart else 0
        while True:
            try:
                with self.open(
                    uri, device=device, framework=framework, credential=credential, **settings
                ) as checkpoint:
                    return checkpoint.to_dict()
            except BlobChanged:
                if restarts_left == 0:
                    raise
                restarts_left -= 1

    def close(self) -> None:
        """Release the staging ring, threads and streams. Tensors already loaded stay valid."""
        self._closed = True
        pipelines, self._pipelines = self._pipelines, {}
        for pipeline in pipelines.values():
            pipeline.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
