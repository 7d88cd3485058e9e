"""The fake driver holds the CUDA rules the core must live with, as a GPU would: allocating or
freeing device memory while copies are queued synchronizes the device (counted; a free waits),
destroying a stream does not wait for its work, and a stream may wait on an event of another
context. These check the fake itself: a rule it got wrong would hide a bug of the core's."""

from __future__ import annotations

import ctypes
import threading
import time

import blob2gpu
import pytest
from fake_framework import FakeFramework, FakeFrameworkError

FRESH = b"\xa5"  # what the fake fills new device memory with


@pytest.fixture
def framework(fake_driver):
    blob2gpu._core.driver_info()
    made: list[FakeFramework] = []

    def make(device: int = 0) -> FakeFramework:
        made.append(FakeFramework(str(fake_driver.path), device))
        made[-1].bind()
        return made[-1]

    yield make
    for fw in reversed(made):
        fw.close()


def lib(fake_driver) -> ctypes.CDLL:
    return ctypes.CDLL(str(fake_driver.path))


def fill(fake_driver, fw: FakeFramework, nbytes: int, byte: bytes) -> int:
    """A block of device memory holding `byte` everywhere (copied in from pinned memory)."""
    ptr = fw.alloc(nbytes)
    host = ctypes.create_string_buffer(byte * nbytes, nbytes)
    code = lib(fake_driver).cuMemcpyHtoDAsync_v2(
        ctypes.c_uint64(ptr), host, ctypes.c_size_t(nbytes), ctypes.c_void_p(0)
    )
    assert code == 0
    fw.synchronize(1)  # the legacy stream
    return ptr


def test_memory_calls_while_copies_are_queued_count_as_device_synchronizations(
    fake_driver, framework
):
    fw = framework()
    src = fill(fake_driver, fw, 4096, b"\x07")
    dst = fw.alloc(4096)
    stream = fw.stream()
    fake_driver.reset_counters()
    fw.alloc(256)  # nothing queued: no synchronization
    assert fake_driver.device_syncs() == 0
    fake_driver.set_copy_delay_us(200_000)
    fw.copy(dst, src, 4096, stream)
    spare = fw.alloc(256)  # a copy queued: the allocation is a synchronization point
    assert fake_driver.device_syncs() == 1
    # A free synchronizes the device: when it returns the queued copy has run.
    assert lib(fake_driver).cuMemFree_v2(ctypes.c_uint64(spare)) == 0
    fw._allocations.remove(spare)
    assert fake_driver.device_syncs() == 2
    assert fake_driver.read_device(dst, 4096) == b"\x07" * 4096


def test_destroying_a_stream_does_not_wait_for_its_work(fake_driver, framework):
    # The stream waits on an event of a held stream, so its copy cannot run; destroying it must
    # return anyway (the real driver frees a stream once its work is done), and the copy still
    # runs once the event completes.
    fw = framework()
    src = fill(fake_driver, fw, 4096, b"\x09")
    dst = fw.alloc(4096)
    gate = fw.stream()
    fake_driver.hold_stream(gate, True)
    fw.copy(fw.alloc(256), src, 256, gate)  # held work: an event recorded after it waits
    event = ctypes.c_void_p()
    driver = lib(fake_driver)
    assert driver.cuEventCreate(ctypes.byref(event), ctypes.c_uint(0x3)) == 0
    assert driver.cuEventRecord(event, ctypes.c_void_p(gate)) == 0
    doomed = ctypes.c_void_p()
    assert driver.cuStreamCreate(ctypes.byref(doomed), ctypes.c_uint(1)) == 0
    assert driver.cuStreamWaitEvent(doomed, event, ctypes.c_uint(0)) == 0
    fw.copy(dst, src, 4096, doomed.value)

    def destroy() -> None:
        fw.bind()  # the context is current per thread
        assert driver.cuStreamDestroy_v2(doomed) == 0

    destroyed = threading.Thread(target=destroy)
    destroyed.start()
    destroyed.join(timeout=30)
    try:
        assert not destroyed.is_alive(), "cuStreamDestroy_v2 waited for the stream's work"
        assert fake_driver.read_device(dst, 4096) == FRESH * 4096  # not run yet: it cannot
    finally:
        fake_driver.hold_stream(gate, False)
        destroyed.join()
        driver.cuEventDestroy_v2(event)
    deadline = time.monotonic() + 30
    while fake_driver.read_device(dst, 4096) != b"\x09" * 4096 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake_driver.read_device(dst, 4096) == b"\x09" * 4096  # the destroyed stream's copy ran


def test_a_stream_may_wait_on_an_event_of_another_context(fake_driver, framework):
    fake_driver.set_device_count(2)
    try:
        on_1 = framework(1)
        stream_1 = on_1.stream()
        on_0 = framework(0)  # device 0's context is current from here
        event_0 = ctypes.c_void_p()
        driver = lib(fake_driver)
        assert driver.cuEventCreate(ctypes.byref(event_0), ctypes.c_uint(0x3)) == 0
        assert driver.cuEventRecord(event_0, ctypes.c_void_p(on_0.stream())) == 0
        # A stream of device 1 waits on device 0's event while device 0's context is current.
        assert driver.cuStreamWaitEvent(ctypes.c_void_p(stream_1), event_0, ctypes.c_uint(0)) == 0
        driver.cuEventDestroy_v2(event_0)
        on_0.close()
        on_1.close()  # waits for its stream, which waited on device 0's event
    finally:
        fake_driver.set_device_count(1)


def test_a_fault_switch_fails_one_of_the_allocations_made_at_once(fake_driver, framework):
    # cuMemAlloc makes the memory outside the driver's lock: the switch must count each call
    # before that, or threads allocating at once all find it unmoved and none of them fails.
    fw = framework()
    start = threading.Barrier(8)
    refused: list[BaseException] = []

    def allocate() -> None:
        fw.bind()  # the current context is per thread
        start.wait()
        try:
            fw.alloc(8 << 20)
        except FakeFrameworkError as error:
            refused.append(error)

    fake_driver.fail_device_alloc_after(3)
    threads = [threading.Thread(target=allocate) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(refused) == 1 and "CUresult 2" in str(refused[0])  # CUDA_ERROR_OUT_OF_MEMORY
