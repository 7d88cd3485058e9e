"""FakeFramework: plays a GPU framework (torch in a serving engine) on the fake CUDA driver.

It does what torch does with a loaded tensor, through the driver entry points: it has its own
stream and its own device memory (a model's parameters), imports a tensor with
``__dlpack__(stream=<its stream>)`` (so its stream waits for the load's copies), copies it into a
parameter on that stream (a device-to-device copy that runs later, like a kernel) and drops it.
Tests use it to check what a streamed load does with memory its consumer may still be reading.
"""

from __future__ import annotations

import ctypes
from typing import Any

CU_STREAM_NON_BLOCKING = 0x1
CU_EVENT_BLOCKING_SYNC = 0x1
CU_EVENT_DISABLE_TIMING = 0x2


class FakeFrameworkError(RuntimeError):
    """A driver entry point returned a CUresult other than CUDA_SUCCESS."""


class FakeFramework:
    """One framework on one device of the fake driver (see the module docstring). Bind it on the
    thread that uses it (the current context is per thread); close() frees what it made."""

    def __init__(self, driver_path: str, device: int = 0) -> None:
        self._lib = ctypes.CDLL(driver_path)  # the same instance the core loaded
        self.device = device
        self._allocations: list[int] = []
        self._streams: list[int] = []
        self._events: list[int] = []
        self._context: ctypes.c_void_p | None = None  # retained once, released by close()

    def _call(self, name: str, *args: Any) -> None:
        code = getattr(self._lib, name)(*args)
        if code != 0:
            raise FakeFrameworkError(f"{name} failed with CUresult {code}")

    def bind(self) -> None:
        """Make the device's primary context current on this thread (as torch.cuda.set_device
        does), retaining it the first time. The driver must be initialized (any blob2gpu CUDA
        call)."""
        if self._context is None:
            ctx = ctypes.c_void_p()
            self._call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), ctypes.c_int(self.device))
            self._context = ctx
        self._call("cuCtxSetCurrent", self._context)

    def stream(self) -> int:
        """A new non-blocking stream; its handle (what __dlpack__(stream=...) takes)."""
        handle = ctypes.c_void_p()
        self._call("cuStreamCreate", ctypes.byref(handle), ctypes.c_uint(CU_STREAM_NON_BLOCKING))
        assert handle.value is not None
        self._streams.append(handle.value)
        return handle.value

    def alloc(self, nbytes: int) -> int:
        """nbytes of device memory (a parameter); its address."""
        ptr = ctypes.c_uint64()
        self._call("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(nbytes))
        self._allocations.append(ptr.value)
        return ptr.value

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Queue a device-to-device copy on `stream` (it runs when the stream gets there)."""
        self._call(
            "cuMemcpyDtoDAsync_v2",
            ctypes.c_uint64(dst),
            ctypes.c_uint64(src),
            ctypes.c_size_t(nbytes),
            ctypes.c_void_p(stream),
        )

    def load_into(self, parameter: int, view: Any, stream: int) -> None:
        """What a weight loader does with a tensor handed to it: import it on `stream` (the
        stream then waits for its bytes), copy it into `parameter` there, and drop it: the
        capsule's deleter runs now, while the copy may still be queued."""
        capsule = view.__dlpack__(stream=stream, max_version=(1, 0))
        self.copy(parameter, view.data_ptr, view.nbytes, stream)
        del capsule

    def record(self, stream: int) -> int:
        """A new event recorded on `stream` now (freed by close())."""
        event = ctypes.c_void_p()
        flags = CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING
        self._call("cuEventCreate", ctypes.byref(event), ctypes.c_uint(flags))
        self._call("cuEventRecord", event, ctypes.c_void_p(stream))
        assert event.value is not None
        self._events.append(event.value)
        return event.value

    def wait(self, stream: int, event: int) -> None:
        """Make `stream` wait (on the device) for `event`, as a collective's streams do."""
        self._call("cuStreamWaitEvent", ctypes.c_void_p(stream), ctypes.c_void_p(event), 0)

    def synchronize(self, stream: int) -> None:
        """Wait (asleep) until everything queued on `stream` has run."""
        event = ctypes.c_void_p()
        flags = CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING
        self._call("cuEventCreate", ctypes.byref(event), ctypes.c_uint(flags))
        try:
            self._call("cuEventRecord", event, ctypes.c_void_p(stream))
            self._call("cuEventSynchronize", event)
        finally:
            self._lib.cuEventDestroy_v2(event)

    def close(self) -> None:
        """Wait for its streams, then free its memory and streams and release the context;
        idempotent."""
        if self._context is None:
            return
        self.bind()
        for stream in self._streams:
            self.synchronize(stream)
        for ptr in self._allocations:
            self._call("cuMemFree_v2", ctypes.c_uint64(ptr))
        for event in self._events:
            self._lib.cuEventDestroy_v2(ctypes.c_void_p(event))
        self._events.clear()
        for stream in self._streams:
            self._call("cuStreamDestroy_v2", ctypes.c_void_p(stream))
        self._allocations.clear()
        self._streams.clear()
        self._lib.cuCtxSetCurrent(ctypes.c_void_p())
        self._call("cuDevicePrimaryCtxRelease_v2", ctypes.c_int(self.device))
        self._context = None
