"""Loader: keeps the device pipelines (staging ring, core threads, CUDA streams) and the storage
connections between loads, and runs each load: a request, prepared by the one load sequence
(loading.prepare), started by a fetch strategy, handed out as a Checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

from blob2gpu.cache.fill import CacheFill, FillResult
from blob2gpu.errors import BlobChanged, InvalidArgument
from blob2gpu.loading.checkpoint import Checkpoint
from blob2gpu.loading.frameworks import Tensor, converter
from blob2gpu.loading.pipelines import DevicePipelines, sized_settings
from blob2gpu.loading.prepare import FetchStrategy, Reusable, StorageFetch, prepare_load
from blob2gpu.loading.request import (
    PIPELINE_SETTINGS,
    LoadRequest,
    normalize_device,
    source_uri,
)
from blob2gpu.loading.selection import selection_from_arguments
from blob2gpu.settings import ResolvedSettings, resolve
from blob2gpu.sources import Connections

RESTARTS_ON_BLOB_CHANGE = 3  # on_blob_change='restart': list again at most this many times


class Loader:
    """A reusable loader. Settings given here apply to every load (see blob2gpu.settings);
    `config` names a YAML settings file (else $BLOB2GPU_CONFIG).

    Pinned staging and streams are allocated on the first load to each device and kept until
    close(), so later loads skip that cost. On that first load they are made on a thread while
    the checkpoint is listed, so CUDA's start-up overlaps the storage round trips. Connections
    to storage are kept too: a later load from the same account skips connecting (and the TLS
    handshakes).
    """

    def __init__(self, config: str | os.PathLike[str] | None = None, **settings: object) -> None:
        self._settings: ResolvedSettings = resolve(settings, config_path=config)
        self._pipelines = DevicePipelines(self._settings)
        self._connections = Connections()  # what its loads' sources keep (HTTP pools)
        self._fills: list[CacheFill] = []  # the cache fills this Loader's loads started

    @property
    def settings(self) -> ResolvedSettings:
        return self._settings

    def request(
        self,
        uri: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        framework: str = "torch",
        credential: object = None,
        tensor_names: Iterable[str] | None = None,
        tensor_filter: Callable[[str], bool] | None = None,
        streamed: bool = True,
        overrides: Mapping[str, object] | None = None,
    ) -> LoadRequest:
        """The checked request of one load by this Loader, as every entry point makes it:
        `overrides` are settings for this load only, over the Loader's (arguments as for open();
        streamed: see LoadRequest). Raises InvalidArgument (no URI, an unknown device, a
        selection given twice, a pipeline setting given per load) or ConfigError (a bad
        setting)."""
        names, name_filter = selection_from_arguments(tensor_names, tensor_filter)
        settings = dict(overrides or {})
        bad = [k for k in settings if k in PIPELINE_SETTINGS]
        if bad:
            raise InvalidArgument(f"{', '.join(bad)} must be given to Loader(...), not per load")
        device = normalize_device(device)
        return LoadRequest(
            uri=source_uri(uri),
            settings=sized_settings(self._settings.with_overrides(settings), device),
            device=device,
            framework=framework,
            credential=credential,
            tensor_names=names,
            tensor_filter=name_filter,
            streamed=streamed,
        )

    def open(
        self,
        uri: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        framework: str = "torch",
        credential: object = None,
        tensor_names: Iterable[str] | None = None,
        tensor_filter: Callable[[str], bool] | None = None,
        **settings: object,
    ) -> Checkpoint:
        """Start loading `uri` and return a Checkpoint at once (tensors arrive as it is iterated).

        uri: a local file, directory or index, or a Blob URI (az://, https://, path-style http://);
        None takes $MODEL_SOURCE_URI. credential: for Blob URIs, an azure credential, account key
        or SAS (else see sources.azure.credentials.resolve_credential for the environment it reads).
        tensor_names / tensor_filter: load only these tensors, reading only their bytes (see
        blob2gpu.loading.selection). Raises, before any weight is read: SourceUnavailable
        (BlobNotFound, AccessDenied, ...), InsufficientGPUMemory / InsufficientHostMemory,
        ShardCountMismatch, TensorNotFound (with an index), InvalidArgument, ConfigError. Errors
        of the load itself (InvalidHeader, GPUOutOfMemory, BlobChanged, StorageUnavailable,
        TensorNotFound without an index, ...) surface while iterating.
        """
        return self.start(
            self.request(
                uri,
                device=device,
                framework=framework,
                credential=credential,
                tensor_names=tensor_names,
                tensor_filter=tensor_filter,
                overrides=settings,
            )
        )

    def start(
        self,
        request: LoadRequest,
        strategy: FetchStrategy | None = None,
        reuse: Reusable | None = None,
    ) -> Checkpoint:
        """Prepare `request` (every check of a load), start it with `strategy` (who fetches which
        bytes; by default every byte from storage) and return its Checkpoint. `reuse`: complete
        shards an earlier attempt kept (see load()). Raises as open() does."""
        convert = converter(request.framework, request.device, request.settings.unsupported_dtype)
        fetch: FetchStrategy = strategy or StorageFetch()
        self._pipelines.start(request.device)  # CUDA's start-up beside the listing
        prepared = prepare_load(
            request,
            lambda: self._pipelines.get(request.device),
            self._connections,
            fetch,
            reuse,
        )
        pipeline = self._pipelines.get(request.device)
        try:
            started = fetch.start(prepared, pipeline)
        except BaseException:
            prepared.abandon()
            raise
        checkpoint = Checkpoint(
            prepared,
            started,
            convert,
            pipeline,
            keep_completed=reuse is not None,
            fills=self._fills,
        )
        started.start()
        return checkpoint

    def load(
        self,
        uri: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        framework: str = "torch",
        credential: object = None,
        tensor_names: Iterable[str] | None = None,
        tensor_filter: Callable[[str], bool] | None = None,
        **settings: object,
    ) -> dict[str, Tensor]:
        """Load every tensor of `uri` onto `device`; returns {name: tensor} (it keeps them all:
        the load's device memory is the checkpoint's, not bounded by streamed_device_bytes).
        Arguments as for open(); see load_all()."""
        request = self.request(
            uri,
            device=device,
            framework=framework,
            credential=credential,
            tensor_names=tensor_names,
            tensor_filter=tensor_filter,
            streamed=False,
            overrides=settings,
        )
        return self.load_all(request)

    def load_all(self, request: LoadRequest) -> dict[str, Tensor]:
        """Load every tensor `request` selects; returns {name: tensor}.

        Returns once every byte has landed. Raises the load's typed error (see blob2gpu.errors)
        after releasing everything the load allocated. With on_blob_change='restart', a blob
        overwritten during the load makes it list again and start over (at most 3 times). A
        damaged NVMe cache entry is fetched again from Blob within the load, whatever the entry
        point (cache/source.py).
        """
        restart = request.settings.on_blob_change == "restart"
        restarts_left = RESTARTS_ON_BLOB_CHANGE if restart else 0
        reuse: Reusable = {}
        while True:
            try:
                with self.start(request, reuse=reuse if restart else None) as checkpoint:
                    return checkpoint.to_dict()
            except BlobChanged as error:
                # The caller's traceback must not pin the tensors of complete shards.
                completed, error.completed_shards = error.completed_shards, {}
                if restarts_left == 0:
                    raise
                restarts_left -= 1
                reuse.update(completed)

    def wait_for_cache_fill(self, timeout: float | None = None) -> FillResult:
        """Wait until the background fills of the node's cache that this Loader's loads started
        have ended (at most `timeout` seconds in all); returns what they wrote and skipped
        (`finished` False when the timeout passed first). Works after close() too: the fills
        use connections of their own."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        merged = FillResult(finished=True)
        for fill in list(self._fills):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            result = fill.wait(left)
            merged.written += result.written
            merged.skipped.update(result.skipped)
            merged.finished = merged.finished and fill.done and result.finished
        return merged

    def close(self) -> None:
        """Release the staging ring, threads, streams and storage connections. Tensors already
        loaded stay valid; a cache fill goes on in the background (wait_for_cache_fill)."""
        self._pipelines.close()
        self._connections.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
