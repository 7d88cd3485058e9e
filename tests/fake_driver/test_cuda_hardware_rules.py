"""The CUDA driver's rules that only a real GPU would otherwise show, held on the fake driver: no
thread spins in a wait (busy_wait), one primary context activation per device and process
(activation), device='cuda' is the caller's current device (current_device), teardown never throws
when the driver is shutting down (deinit) or in a forked child (fork), only out-of-memory pinning
falls back (pinned), and O_DIRECT reads land in the pinned slots (direct_io, also on a real GPU).
tests/gpu/test_cuda_rules_on_gpu.py checks them on a real GPU where hardware can show them."""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import blob2gpu
import pytest
import torch
from blob2gpu import _core, errors
from blob2gpu.loading.request import normalize_device
from conftest import REAL_GPU, random_tensor
from conftest import checkpoint_bytes as expected

CUDA_ERROR_OUT_OF_MEMORY = 2
CU_EVENT_BLOCKING_SYNC = 0x1
CU_EVENT_DISABLE_TIMING = 0x2
FAKE_DIR = Path(__file__).resolve().parents[1] / "fake_cuda"


def shards(count: int, per_shard: int = 3):
    return [
        {
            f"s{s}.w{i}": random_tensor(torch.float16, (64, 128), s * 10 + i)
            for i in range(per_shard)
        }
        for s in range(count)
    ]


def run_script(body: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs `body` in a fresh interpreter on the fake driver (its state starts from zero there),
    with `fake` bound to its control API."""
    prelude = textwrap.dedent(
        f"""
        import gc, os, sys
        sys.path.insert(0, {str(FAKE_DIR)!r})
        from build import FakeDriver
        import blob2gpu
        from blob2gpu import _core, errors
        fake = FakeDriver(os.environ["BLOB2GPU_CUDA_DRIVER"])
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(body)],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_clean_exit(run: subprocess.CompletedProcess[str]) -> None:
    assert run.returncode == 0, run.stdout + run.stderr
    for crash in ("terminate called", "Aborted", "Segmentation fault", "Traceback"):
        assert crash not in run.stderr, run.stderr


# -- busy_wait ------------------------------------------------------------------------------------
class _Driver:
    """The fake's driver entry points, called the way a consumer would (for the detector test)."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        p, u64, sz, i = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int
        for name, args in {
            "cuDevicePrimaryCtxRetain": (ctypes.POINTER(p), i),
            "cuDevicePrimaryCtxRelease_v2": (i,),
            "cuCtxSetCurrent": (p,),
            "cuStreamCreate": (ctypes.POINTER(p), ctypes.c_uint),
            "cuStreamDestroy_v2": (p,),
            "cuMemAlloc_v2": (ctypes.POINTER(u64), sz),
            "cuMemFree_v2": (u64,),
            "cuMemcpyHtoDAsync_v2": (u64, p, sz, p),
            "cuEventCreate": (ctypes.POINTER(p), ctypes.c_uint),
            "cuEventDestroy_v2": (p,),
            "cuEventRecord": (p, p),
            "cuEventSynchronize": (p,),
        }.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
            setattr(self, name, fn)

    def check(self, code: int) -> None:
        assert code == 0, f"CUresult {code}"


def test_busy_wait_fake_flags_a_wait_on_an_event_without_blocking_sync(fake_driver):
    # The detector itself: the same slow copy waited on through each kind of event.
    assert _core.driver_info()["available"]  # the core has loaded (and cuInit'ed) the fake
    d = _Driver(str(fake_driver.path))
    ctx, stream, dptr = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_uint64()
    d.check(d.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0))
    d.check(d.cuCtxSetCurrent(ctx))
    src = ctypes.create_string_buffer(4096)
    try:
        d.check(d.cuStreamCreate(ctypes.byref(stream), 1))
        d.check(d.cuMemAlloc_v2(ctypes.byref(dptr), 4096))
        fake_driver.set_copy_delay_us(100_000)  # the copy is still queued when the wait starts
        for flags, spins in (
            (CU_EVENT_DISABLE_TIMING, True),
            (CU_EVENT_DISABLE_TIMING | CU_EVENT_BLOCKING_SYNC, False),
        ):
            before = fake_driver.violations()
            event = ctypes.c_void_p()
            d.check(d.cuEventCreate(ctypes.byref(event), flags))
            d.check(d.cuMemcpyHtoDAsync_v2(dptr.value, src, 4096, stream))
            d.check(d.cuEventRecord(event, stream))
            d.check(d.cuEventSynchronize(event))
            d.check(d.cuEventDestroy_v2(event))
            assert (fake_driver.violations() == before + 1) is spins
            if spins:
                assert fake_driver.last_violation().startswith("busy_wait: cuEventSynchronize")
    finally:
        fake_driver.set_copy_delay_us(0)
        d.cuMemFree_v2(dptr.value)
        d.cuStreamDestroy_v2(stream)
        d.cuCtxSetCurrent(None)
        d.cuDevicePrimaryCtxRelease_v2(0)
        fake_driver.reset_counters()  # the deliberate violation above is not this test's failure


def test_busy_wait_never_happens_in_a_load_whose_copies_are_slow(fake_driver, write_checkpoint):
    # Slow copies make the reaper, the fences, wait_ready and to_bytes wait for real; a wait that
    # would spin a core on a GPU is a violation, which the fixture turns into a failure.
    directory = write_checkpoint(shards(3))
    fake_driver.set_copy_delay_us(3000)
    with blob2gpu.Loader(staging_slots=2, staging_slot_bytes=8192) as loader:
        tensors = loader.load(str(directory), device="cuda", framework="dlpack")
        for view in tensors.values():
            view.wait_ready()
        assert {n: v.to_bytes() for n, v in tensors.items()} == expected(directory)
        del tensors


# -- activation -----------------------------------------------------------------------------------
def test_activation_loading_repeatedly_activates_one_context_per_device(write_checkpoint):
    # A fresh process (the fake counts activations per process): three loads to each of two
    # devices, every tensor dropped in between, which used to release the context each time.
    if REAL_GPU:
        pytest.skip(
            "counts the fake driver's context activations (on a GPU: tests/gpu, activation)"
        )
    directory = write_checkpoint(shards(2))
    run = run_script(
        f"""
        fake.set_device_count(2)
        for _ in range(3):
            for device in ("cuda:0", "cuda:1"):
                tensors = blob2gpu.load({str(directory)!r}, device=device, framework="dlpack")
                assert tensors["s0.w0"].device == device
                del tensors
                gc.collect()
        with blob2gpu.Loader() as loader:
            loader.load({str(directory)!r}, device="cuda:1", framework="dlpack")
        print(fake.context_activations(), fake.primary_context_refcount(0),
              fake.primary_context_refcount(1), fake.live_device_allocations())
        """
    )
    assert_clean_exit(run)
    activations, ref0, ref1, live = map(int, run.stdout.split())
    assert activations == 2  # one per device, for the whole process
    assert (ref0, ref1) == (1, 1)  # blob2gpu's one retain each, kept for the process
    assert live == 0  # the memory of dropped tensors went back all the same


# -- current_device -------------------------------------------------------------------------------
@pytest.fixture
def two_gpus(fake_driver):
    fake_driver.set_device_count(2)
    yield fake_driver
    gc.collect()
    fake_driver.set_device_count(1)


def test_current_device_is_the_device_of_the_threads_current_context(two_gpus, write_checkpoint):
    # What torch.cuda.set_device(1) or CuPy's Device(1).use() leaves behind: device 1's primary
    # context current on this thread.
    directory = write_checkpoint(shards(1))
    two_gpus.make_current(1)
    try:
        assert _core.current_device() == 1 and normalize_device("cuda") == "cuda:1"
        view = blob2gpu.load(str(directory), device="cuda", framework="dlpack")["s0.w1"]
        assert view.device == "cuda:1" and view.__dlpack_device__() == (2, 1)
        assert view.to_bytes() == expected(directory)["s0.w1"]
        # The core means the same by "cuda" when it is asked directly.
        pipeline = _core.LoadPipeline("cuda", 2, 8192, 1, 1, True)
        assert pipeline.device == "cuda:1"
        pipeline.close()
        del view, pipeline
    finally:
        two_gpus.clear_current(1)
    assert _core.current_device() == -1 and normalize_device("cuda") == "cuda:0"


def test_current_device_is_torchs_once_torch_has_initialized_cuda(
    two_gpus, write_checkpoint, monkeypatch
):
    # This torch has no CUDA; pretend it has, with torch.cuda.set_device(1) done.
    directory = write_checkpoint(shards(1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _core.current_device() == -1  # the driver has no current context: torch decides
    view = blob2gpu.load(str(directory), device="cuda", framework="dlpack")["s0.w0"]
    assert view.device == "cuda:1"
    assert normalize_device("cuda:0") == "cuda:0"  # an explicit device is never overridden
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert normalize_device("cuda") == "cuda:0"  # not asked: it would initialize CUDA to say 0
    del view


# -- deinit ---------------------------------------------------------------------------------------
def test_deinit_dropping_tensors_and_closing_loaders_never_throws(write_checkpoint):
    if REAL_GPU:
        pytest.skip("needs the fake driver's deinitialized switch (on a GPU: tests/gpu, deinit)")
    directory = write_checkpoint(shards(2))
    run = run_script(
        f"""
        loader = blob2gpu.Loader(staging_slots=2, staging_slot_bytes=8192)
        tensors = loader.load({str(directory)!r}, device="cuda", framework="dlpack")
        capsule = tensors["s1.w0"].__dlpack__(max_version=(1, 0))  # the deleter path
        fake.set_deinitialized(True)
        try:
            tensors["s0.w0"].to_bytes()
        except errors.CudaError as e:
            assert "CUDA_ERROR_DEINITIALIZED" in str(e), e
        else:
            raise AssertionError("a call on a deinitialized driver succeeded")
        del tensors, capsule
        gc.collect()
        loader.close()
        print(_core.teardown_failures())
        """
    )
    assert_clean_exit(run)
    assert int(run.stdout) > 0  # counted...
    assert run.stderr.count("failed during teardown: CUDA_ERROR_DEINITIALIZED") == 1  # ...told once


@pytest.mark.parametrize("what", ["tensors", "loader", "capsule"])
def test_deinit_interpreter_exit_with_live_objects_exits_cleanly(write_checkpoint, what):
    # Whatever the consumer still holds is torn down during interpreter exit, while the driver
    # answers CUDA_ERROR_DEINITIALIZED.
    if REAL_GPU:
        pytest.skip("needs the fake driver's deinitialized switch (on a GPU: tests/gpu, deinit)")
    directory = write_checkpoint(shards(2))
    run = run_script(
        f"""
        loader = blob2gpu.Loader(staging_slots=2, staging_slot_bytes=8192)
        tensors = loader.load({str(directory)!r}, device="cuda", framework="dlpack")
        if {what!r} == "capsule":
            capsule = tensors["s0.w1"].__dlpack__(max_version=(1, 0))
        if {what!r} != "loader":
            loader.close()
        fake.set_deinitialized(True)
        """
    )
    assert_clean_exit(run)


# -- fork -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("drop", [True, False], ids=["drop", "exit-with-live"])
def test_fork_child_drops_inherited_tensors_and_loader_and_exits_cleanly(write_checkpoint, drop):
    # A DataLoader-style worker: forked after a load, it inherits tensors and the loader. CUDA does
    # not survive fork(): its calls fail, and tearing down what it inherited must not try.
    if REAL_GPU:
        pytest.skip("needs the fake driver's forked-child mode (on a GPU: tests/gpu, fork)")
    directory = write_checkpoint(shards(2))
    other = write_checkpoint(shards(1), name="other")
    run = run_script(
        f"""
        fake.set_fail_in_forked_child(True)
        loader = blob2gpu.Loader(staging_slots=2, staging_slot_bytes=8192)
        tensors = loader.load({str(directory)!r}, device="cuda", framework="dlpack")
        expected = {{n: v.to_bytes() for n, v in tensors.items()}}
        pid = os.fork()
        if pid == 0:
            try:
                blob2gpu.load({str(other)!r}, device="cuda", framework="dlpack")
            except errors.CudaError as e:
                assert "CUDA_ERROR_NOT_INITIALIZED" in str(e) and "forked" in str(e), e
            else:
                raise AssertionError("CUDA worked in a forked child")
            if {drop!r}:
                del tensors
                gc.collect()
                loader.close()
            assert _core.teardown_failures() == 0  # skipped, not failed: nothing was the child's
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        # The parent's tensors and loader are untouched by the child.
        assert {{n: v.to_bytes() for n, v in tensors.items()}} == expected
        again = loader.load({str(other)!r}, device="cuda", framework="dlpack")
        del tensors, again
        gc.collect()
        loader.close()
        print(fake.violations(), fake.live_device_allocations(), _core.teardown_failures())
        """
    )
    assert_clean_exit(run)
    assert run.stdout.split() == ["0", "0", "0"]


# -- pinned ---------------------------------------------------------------------------------------
def test_pinned_out_of_memory_is_the_only_refusal_that_falls_back(fake_driver, write_checkpoint):
    directory = write_checkpoint(shards(1))
    fake_driver.fail_host_alloc_after(0)
    assert _core.pinned_probe(0, 1 << 20) is False  # out of memory: a refusal, not an error
    fake_driver.fail_host_alloc_after(0)
    with blob2gpu.open(str(directory), device="cuda", framework="dlpack") as checkpoint:
        assert {n: v.to_bytes() for n, v in checkpoint.to_dict().items()} == expected(directory)
        assert checkpoint.report.pinned_fallback and not checkpoint.report.pinned


@pytest.mark.parametrize(
    "code,name",
    [
        (201, "CUDA_ERROR_INVALID_CONTEXT"),
        (304, "CUDA_ERROR_OPERATING_SYSTEM"),
        (719, "CUDA_ERROR_LAUNCH_FAILED"),
        (999, "CUDA_ERROR_UNKNOWN"),
    ],
)
def test_pinned_errors_other_than_out_of_memory_raise(fake_driver, write_checkpoint, code, name):
    # A broken context or a sticky error would otherwise hide behind a quietly slower load.
    directory = write_checkpoint(shards(1))
    host_before = fake_driver.live_host_allocations()
    fake_driver.set_host_alloc_error(code)
    fake_driver.fail_host_alloc_after(1)  # the second slot fails
    with pytest.raises(errors.CudaError, match=f"cuMemHostAlloc.*{name}"):
        blob2gpu.load(str(directory), device="cuda", use_pinned_host_fallback=True)
    assert fake_driver.live_host_allocations() == host_before
    fake_driver.fail_host_alloc_after(0)
    with pytest.raises(errors.CudaError, match=name):
        _core.pinned_probe(0, 1 << 20)


def test_pinned_refusal_message_names_what_the_driver_said_not_ulimit(
    fake_driver, write_checkpoint
):
    directory = write_checkpoint(shards(1))
    fake_driver.fail_host_alloc_after(0)
    with pytest.raises(errors.PinnedMemoryUnavailable) as info:
        blob2gpu.load(str(directory), device="cuda", use_pinned_host_fallback=False)
    assert "CUDA_ERROR_OUT_OF_MEMORY" in str(info.value) and "ulimit" not in str(info.value)


# -- direct_io ------------------------------------------------------------------------------------
def test_direct_io_reads_land_in_pinned_slots_on_cuda(request, write_checkpoint):
    # Cache hits are read with O_DIRECT straight into the cuMemHostAlloc slots; on a real GPU
    # (bench/gpu_check.sh) this is the case that has never run elsewhere.
    if not REAL_GPU:
        request.getfixturevalue("fake_driver")
    directory = write_checkpoint(shards(3, per_shard=4))
    files = sorted(directory.glob("*.safetensors"))
    try:
        os.close(os.open(files[0], os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{directory} is on a filesystem without O_DIRECT (tmpfs?)")
    pipeline = _core.LoadPipeline("cuda:0", 4, 1 << 16, 2, 2, False)
    try:
        sources = [_core.ShardSource(f.name, size=f.stat().st_size, path=str(f)) for f in files]
        session = pipeline.start_fed(sources, direct_io=True)
        got = {}
        while (shard := session.next_shard()) is not None:
            got.update({t.name: t.to_bytes() for t in shard.tensors})
        stats = session.stats()
        session.close()
    finally:
        pipeline.close()
    assert got == expected(directory)
    assert stats.pinned and stats.direct_io_bytes > 0
