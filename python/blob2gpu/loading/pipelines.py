"""DevicePipelines: the core pipelines (CUDA context, pinned staging ring, streams; io threads on
cpu) a Loader keeps per device between loads. The first one for a device is made on a thread
while the checkpoint is listed, so CUDA's start-up overlaps the storage round trips."""

from __future__ import annotations

import threading
from typing import Any

from blob2gpu import _core
from blob2gpu.errors import InvalidArgument


class _PipelineMaker:
    """Makes one LoadPipeline on its own thread (the core releases the GIL while it does)."""

    def __init__(self, device: str, settings: dict[str, Any]) -> None:
        self.device = device
        self._pipeline: _core.LoadPipeline | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._make, args=(settings,), name=f"blob2gpu-pipeline-{device}", daemon=True
        )
        self._thread.start()

    def _make(self, settings: dict[str, Any]) -> None:
        try:
            self._pipeline = _core.LoadPipeline(self.device, **settings)
        except BaseException as e:  # handed to the load that waits for it
            self._error = e

    def result(self) -> _core.LoadPipeline:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._pipeline is not None
        return self._pipeline


class DevicePipelines:
    """One pipeline per device, made with `settings` (the pipeline settings), kept until close()."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._pipelines: dict[str, _core.LoadPipeline] = {}
        self._being_made: dict[str, _PipelineMaker] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self, device: str) -> None:
        """Begin making the device's pipeline on a thread, unless it exists or is being made."""
        with self._lock:
            if self._closed or device in self._pipelines or device in self._being_made:
                return
            self._being_made[device] = _PipelineMaker(device, self._settings)

    def get(self, device: str) -> _core.LoadPipeline:
        """The device's pipeline, waiting for it to be made; raises what making it raised, and
        InvalidArgument once closed."""
        self.start(device)
        with self._lock:
            if self._closed:
                raise InvalidArgument("this Loader is closed")
            if device in self._pipelines:
                return self._pipelines[device]
            maker = self._being_made[device]
        try:
            pipeline = maker.result()
        finally:  # made or failed: the next load asks again
            with self._lock:
                if self._being_made.get(device) is maker:
                    del self._being_made[device]
        with self._lock:
            kept = None if self._closed else self._pipelines.setdefault(device, pipeline)
        if kept is not pipeline:  # closed meanwhile, or another load's was kept first
            pipeline.close()
        if kept is None:
            raise InvalidArgument("this Loader is closed")
        return kept

    def close(self) -> None:
        """Close every pipeline, those still being made included (their errors are dropped:
        they belong to no load)."""
        with self._lock:
            self._closed = True
            pipelines, self._pipelines = self._pipelines, {}
            makers, self._being_made = self._being_made, {}
        for maker in makers.values():
            try:
                pipelines[maker.device] = maker.result()
            except Exception:
                pass
        for pipeline in pipelines.values():
            pipeline.close()
