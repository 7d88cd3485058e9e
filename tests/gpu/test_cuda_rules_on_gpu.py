"""The CUDA rules of tests/fake_driver/test_cuda_hardware_rules.py, checked on a real GPU
(BLOB2GPU_TEST_REAL_GPU=1: bench/gpu_check.sh runs them and gives each a line of its table).

- busy_wait: a load whose copy is held on the GPU (stall_driver.cpp) waits for it asleep: the
  process spends little CPU while it waits. The control, a wait on an event made without
  CU_EVENT_BLOCKING_SYNC measured the same way, shows what a spinning wait costs on this host.
- activation: after loads whose tensors were all dropped, the device's primary context is still
  active (cuDevicePrimaryCtxGetState): blob2gpu keeps its one retain, so no load creates it again.
- fork: a child forked while a load is in flight gets a clear error from CUDA, drops what it
  inherited without calling the driver, and exits; the parent's load then completes, bytes intact.
- deinit: the interpreter exits cleanly with blob2gpu objects alive, and with a copy still in
  flight while the driver shuts down at exit.
- current_device: device="cuda" is the device torch.cuda.set_device made current.

What one GPU cannot show skips and says why (a second device). The pinned-memory refusals are
faults only the fake driver can inject; gpu_check.sh's pinning row shows this host's answer.

Each check runs in a fresh interpreter under a time limit: a broken rule can hang or crash it, and
the check must say so rather than take the test run with it. Off a GPU every test here skips;
scripts/rehearse_gpu_check.sh runs them on the fake driver, the way the GPU machine runs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REAL_GPU, checkpoint_bytes, random_tensor

pytestmark = pytest.mark.skipif(
    not REAL_GPU, reason="runs on a real GPU only (BLOB2GPU_TEST_REAL_GPU=1, bench/gpu_check.sh)"
)

HERE = Path(__file__).resolve().parent
CHILD_TIMEOUT_S = 120
HOLD_S = 2.0  # how long the busy_wait check measures a held wait
CRASHES = ("terminate called", "Aborted", "Segmentation fault", "Fatal Python error", "Traceback")

# What every child script starts with: blob2gpu imported on the driver in BLOB2GPU_CUDA_DRIVER,
# `drv` the driver itself through ctypes, and a way to hand a result back.
PRELUDE = """
import ctypes, gc, hashlib, json, os, signal, sys, threading, time
import blob2gpu
from blob2gpu import _core, errors

drv = ctypes.CDLL({driver!r})
if hasattr(drv, "fake_cuda_set_fail_in_forked_child"):  # a rehearsal: answer a fork as CUDA does
    drv.fake_cuda_set_fail_in_forked_child(1)

def check(rc, what):
    if rc != 0:
        raise RuntimeError(f"{{what}} failed: CUresult {{rc}}")

def digest(tensors):
    return {{n: hashlib.sha256(v.to_bytes()).hexdigest() for n, v in tensors.items()}}

def result(**fields):
    print("RESULT " + json.dumps(fields), flush=True)

def finish(**fields):
    # Ends a measuring script without the interpreter's exit, which other checks test.
    result(**fields)
    sys.stderr.flush()
    os._exit(0)
"""


# With the stall library in front of the driver: `stall`, its stall_* functions.
STALL = """
stall = ctypes.CDLL({stall!r})
stall.stall_wait_held.argtypes = [ctypes.c_int, ctypes.c_double]
"""


def driver() -> str:
    """The driver the core loads (BLOB2GPU_CUDA_DRIVER, else libcuda.so.1)."""
    return os.environ.get("BLOB2GPU_CUDA_DRIVER") or "libcuda.so.1"


def shards(count: int, per_shard: int = 3, shape: tuple[int, ...] = (256, 512)):
    return [
        {f"s{s}.w{i}": random_tensor(torch.float16, shape, s * 10 + i) for i in range(per_shard)}
        for s in range(count)
    ]


def digests(directory: Path) -> dict[str, str]:
    return {n: hashlib.sha256(b).hexdigest() for n, b in checkpoint_bytes(directory).items()}


def run_child(body: str, stall: str | None = None) -> tuple[dict, subprocess.CompletedProcess[str]]:
    """Runs PRELUDE + body in a fresh interpreter on driver(), or with `stall` (the stall
    library) in front of it, bound to `stall` in the script; returns the last `result(...)` it
    printed, and the process. A child that outlives CHILD_TIMEOUT_S is killed and the test fails
    saying so; one that asks to skip skips."""
    path = stall or driver()
    code = PRELUDE.format(driver=path)
    if stall:
        code += STALL.format(stall=stall)
    code += textwrap.dedent(body)
    child_env = dict(os.environ, BLOB2GPU_CUDA_DRIVER=path, PYTHONUNBUFFERED="1")
    try:
        run = subprocess.run(
            [sys.executable, "-c", code],
            env=child_env,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"hung: killed after {CHILD_TIMEOUT_S} s\n{out}\n{err[-3000:]}")
    lines = [line[7:] for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    fields = json.loads(lines[-1]) if lines else {}
    if "skip" in fields:
        pytest.skip(fields["skip"])
    return fields, run


def assert_clean_exit(run: subprocess.CompletedProcess[str]) -> None:
    assert run.returncode == 0, f"exit status {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    for crash in CRASHES:
        assert crash not in run.stderr, run.stderr[-3000:]


def teardown_note(stderr: str) -> str:
    """What the core said about teardown (the first failed driver call is printed once)."""
    found = re.search(r"failed during teardown: (CUDA_ERROR_\w+)", stderr)
    return f"{found.group(1)} printed" if found else "no failure printed"


def compiler() -> str:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    pytest.fail("no C++ compiler (c++, g++, clang++ or $CXX) to build the stall library")


def driver_file(name: str) -> str:
    """The file of the driver `name` (a path, or a library name the loader finds)."""
    if "/" in name:
        return os.path.realpath(name)
    stem = name.split(".so")[0] + ".so"  # libcuda.so.1: the mapped file is libcuda.so.<version>
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ctypes, sys; ctypes.CDLL(sys.argv[1]); "
            "print('\\n'.join(line.split()[-1] for line in open('/proc/self/maps') "
            "if len(line.split()) >= 6 and line.split()[-1].rsplit('/', 1)[-1]"
            ".startswith(sys.argv[2])))",
            name,
            stem,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    files = [f for f in probe.stdout.split() if f.startswith("/")]
    if probe.returncode != 0 or not files:
        pytest.fail(f"cannot find the file of {name}: {probe.stderr[-2000:]}")
    return os.path.realpath(files[0])


@pytest.fixture(scope="session")
def stall_library(tmp_path_factory: pytest.TempPathFactory) -> str:
    """stall_driver.cpp built against this host's driver: the path to name in
    BLOB2GPU_CUDA_DRIVER (and to load with ctypes for its stall_* functions)."""
    name = driver()
    out = tmp_path_factory.mktemp("stall") / "libstall_driver.so"
    command = [
        compiler(),
        "-std=c++17",
        "-O1",
        "-shared",
        "-fPIC",
        "-pthread",
        f'-DSTALL_DRIVER="{name}"',
        str(HERE / "stall_driver.cpp"),
        "-o",
        str(out),
        "-Wl,--no-as-needed",
        driver_file(name),
        "-ldl",
    ]
    built = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if built.returncode != 0:
        pytest.fail(f"building the stall library failed: {' '.join(command)}\n{built.stderr}")
    return str(out)


# -- busy_wait ------------------------------------------------------------------------------------
def test_busy_wait_a_load_waits_for_a_held_copy_asleep(
    stall_library, write_checkpoint, record_property
):
    directory = write_checkpoint(shards(4))
    fields, run = run_child(
        f"""
        box = {{}}

        def load():
            try:
                with blob2gpu.Loader(staging_slots=2, staging_slot_bytes=1 << 20) as loader:
                    tensors = loader.load({str(directory)!r}, device="cuda", framework="dlpack")
                    box["digest"] = digest(tensors)
                    del tensors
            except BaseException as exc:
                box["error"] = repr(exc)

        stall.stall_arm(60)
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        if stall.stall_wait_held(1, 60.0) < 1:
            stall.stall_release()
            thread.join(60)
            finish(error=f"no copy reached the gate (cuLaunchHostFunc: "
                         f"{{stall.stall_launch_error()}}; load: {{box}})")
        time.sleep(0.5)  # every thread of the load gets to its wait
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep({HOLD_S})
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        waited = thread.is_alive()
        stall.stall_release()
        thread.join(120)
        if thread.is_alive():
            finish(error="the load did not finish within 120 s of the release")

        # The control: the same hold waited on through an event without CU_EVENT_BLOCKING_SYNC.
        device, ctx = ctypes.c_int(), ctypes.c_void_p()
        check(drv.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
        check(drv.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "cuDevicePrimaryCtxRetain")
        check(drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        stream, event = ctypes.c_void_p(), ctypes.c_void_p()
        check(drv.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")
        check(drv.cuEventCreate(ctypes.byref(event), 2), "cuEventCreate")  # DISABLE_TIMING only
        stall.stall_reset(60)
        hold = ctypes.cast(stall.stall_hold, ctypes.c_void_p)
        check(drv.cuLaunchHostFunc(stream, hold, None), "cuLaunchHostFunc")
        check(drv.cuEventRecord(event, stream), "cuEventRecord")

        def spin():
            drv.cuCtxSetCurrent(ctx)
            box["sync"] = drv.cuEventSynchronize(event)

        waiter = threading.Thread(target=spin, daemon=True)
        waiter.start()
        stall.stall_wait_held(2, 60.0)
        time.sleep(0.3)
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(1.0)
        control_cpu, control_wall = time.process_time() - cpu0, time.monotonic() - wall0
        stall.stall_release()
        waiter.join(60)
        drv.cuEventDestroy_v2(event)
        drv.cuStreamDestroy_v2(stream)
        drv.cuCtxSetCurrent(None)
        drv.cuDevicePrimaryCtxRelease_v2(device)
        finish(cpu=cpu, wall=wall, waited=waited, control_cpu=control_cpu,
               control_wall=control_wall, **box)
        """,
        stall=stall_library,
    )
    assert "error" not in fields, fields["error"] + run.stderr[-3000:]
    assert fields.get("digest") == digests(directory), run.stderr[-3000:]
    assert fields["waited"], "the load finished during the hold: nothing held its copy"
    record_property("cpu_s", f"{fields['cpu']:.3f}")
    record_property("wall_s", f"{fields['wall']:.2f}")
    record_property("control_cpu_s", f"{fields['control_cpu']:.3f}")
    record_property("control_wall_s", f"{fields['control_wall']:.2f}")
    # Asleep, the whole process spends next to nothing; a spinning waiter alone would spend ~wall.
    assert fields["cpu"] < 0.25 * fields["wall"], (
        f"the process spent {fields['cpu']:.2f} CPU s while its load waited {fields['wall']:.2f} s"
        f" on a held copy (a spinning wait without blocking sync spent"
        f" {fields['control_cpu']:.2f} s in {fields['control_wall']:.2f} s)"
    )


# -- activation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ordinal", [0, 1], ids=["cuda0", "cuda1"])
def test_activation_the_primary_context_stays_active_across_loads(
    write_checkpoint, record_property, ordinal
):
    directory = write_checkpoint(shards(2))
    fields, run = run_child(
        f"""
        check(drv.cuInit(0), "cuInit")
        count = ctypes.c_int()
        check(drv.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        if count.value <= {ordinal}:
            finish(skip=f"needs {ordinal + 1} GPUs (one context per device): this host has "
                        f"{{count.value}}")
        device = ctypes.c_int()
        check(drv.cuDeviceGet(ctypes.byref(device), {ordinal}), "cuDeviceGet")

        def active():
            flags, on = ctypes.c_uint(), ctypes.c_int()
            check(drv.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(on)),
                  "cuDevicePrimaryCtxGetState")
            return on.value

        before = active()
        after = []
        for _ in range(3):
            tensors = blob2gpu.load({str(directory)!r}, device="cuda:{ordinal}", framework="dlpack")
            got = digest(tensors)
            del tensors
            gc.collect()
            after.append(active())
        finish(before=before, after=after, digest=got, live_arenas=_core.live_arena_count())
        """
    )
    assert fields.get("digest") == digests(directory), run.stdout + run.stderr[-3000:]
    record_property("active_after_each_load", ",".join(map(str, fields["after"])))
    assert fields["before"] == 0, "the context was active before any load: the check shows nothing"
    assert fields["after"] == [1, 1, 1], "a load whose tensors were dropped released the context"
    assert fields["live_arenas"] == 0  # the dropped tensors' memory went back all the same


# -- fork -----------------------------------------------------------------------------------------
def test_fork_child_forked_during_a_load_exits_cleanly(stall_library, write_checkpoint):
    directory = write_checkpoint(shards(2))
    other = write_checkpoint(shards(3), name="other")
    fields, run = run_child(
        f"""
        first = blob2gpu.load({str(directory)!r}, device="cuda", framework="dlpack")
        first_digest = digest(first)
        box = {{}}

        def load():
            try:
                with blob2gpu.Loader(staging_slots=2, staging_slot_bytes=1 << 20) as loader:
                    tensors = loader.load({str(other)!r}, device="cuda", framework="dlpack")
                    box["digest"] = digest(tensors)
                    del tensors
            except BaseException as exc:
                box["error"] = repr(exc)

        stall.stall_arm(60)
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        if stall.stall_wait_held(1, 60.0) < 1:
            stall.stall_release()
            finish(error=f"no copy reached the gate (cuLaunchHostFunc: "
                         f"{{stall.stall_launch_error()}})")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: CUDA does not survive fork()
            os.close(read_end)
            verdict = "ok"
            try:
                blob2gpu.load({str(directory)!r}, device="cuda", framework="dlpack")
                verdict = "a load worked in the forked child"
            except errors.Blob2GpuError as exc:
                if "forked" not in str(exc):
                    verdict = f"the child's error does not say it was forked: {{exc!r}}"
            del first
            gc.collect()
            if _core.teardown_failures():
                verdict += f"; {{_core.teardown_failures()}} teardown failures"
            os.write(write_end, verdict.encode())
            os.close(write_end)
            sys.exit(0)  # the interpreter's whole exit, with what the child inherited
        os.close(write_end)
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
                break
            time.sleep(0.05)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        verdict = os.read(read_end, 65536).decode()
        stall.stall_release()
        thread.join(120)
        finish(child_status=status, verdict=verdict, first_digest=first_digest,
               first_after=digest(first), loading=thread.is_alive(), **box)
        """,
        stall=stall_library,
    )
    assert "error" not in fields, fields["error"] + run.stderr[-3000:]
    assert fields["child_status"] is not None, "the forked child hung (killed after 60 s)"
    assert fields["child_status"] == 0, run.stderr[-3000:]
    assert fields["verdict"] == "ok", fields["verdict"]
    assert not fields["loading"], "the parent's load never finished"
    assert fields["digest"] == digests(other)  # the parent's load in flight at the fork
    assert fields["first_digest"] == fields["first_after"] == digests(directory)


# -- deinit ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["tensors", "loader", "capsule"])
def test_deinit_interpreter_exit_with_live_objects_exits_cleanly(
    write_checkpoint, record_property, what
):
    directory = write_checkpoint(shards(2))
    _, run = run_child(
        f"""
        loader = blob2gpu.Loader(staging_slots=2, staging_slot_bytes=1 << 20)
        tensors = loader.load({str(directory)!r}, device="cuda", framework="dlpack")
        if {what!r} == "capsule":
            capsule = tensors["s0.w1"].__dlpack__(max_version=(1, 0))
        if {what!r} != "loader":
            loader.close()
        result(loaded=len(tensors))
        """
    )
    record_property("teardown", teardown_note(run.stderr))
    assert_clean_exit(run)


def test_deinit_interpreter_exit_with_a_copy_in_flight_exits_cleanly(
    stall_library, write_checkpoint, record_property
):
    # The load is left running (its session never freed: a leak, as a server that exits without
    # closing has one) with a copy held on the GPU, so the driver shuts down at exit under it.
    directory = write_checkpoint(shards(3))
    files = sorted(directory.glob("*.safetensors"))
    sources = [(f.name, f.stat().st_size, str(f)) for f in files]
    _, run = run_child(
        f"""
        pipeline = _core.LoadPipeline("cuda:0", 2, 1 << 20, 1, 1, True)
        sources = [_core.ShardSource(n, size=s, path=p) for n, s, p in {sources!r}]
        stall.stall_arm(5)
        session = pipeline.start_local(sources)
        held = stall.stall_wait_held(1, 60.0)
        for leaked in (pipeline, session):
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(leaked))
        result(held=held)
        sys.exit(0)
        """,
        stall=stall_library,
    )
    record_property("teardown", teardown_note(run.stderr))
    assert_clean_exit(run)


# -- current_device -------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["first", "last"])
def test_current_device_follows_torch_set_device(write_checkpoint, record_property, which):
    directory = write_checkpoint(shards(1))
    fields, run = run_child(
        f"""
        import torch
        if not torch.cuda.is_available():
            finish(skip=f"torch {{torch.__version__}} has no CUDA (the check needs its CUDA build)")
        count = torch.cuda.device_count()
        if {which!r} == "last" and count < 2:
            finish(skip="needs two GPUs: with one, 'cuda' is cuda:0 whatever torch made current")
        ordinal = 0 if {which!r} == "first" else count - 1
        torch.cuda.set_device(ordinal)
        torch.zeros(1, device="cuda")  # torch has initialized CUDA: its context is current
        from blob2gpu.loading.request import normalize_device

        core_device, meant = _core.current_device(), normalize_device("cuda")
        tensors = blob2gpu.load({str(directory)!r}, device="cuda", framework="torch")
        devices = sorted({{str(t.device) for t in tensors.values()}})
        total = sum(float(t.float().sum()) for t in tensors.values())  # torch computes on them
        torch.cuda.synchronize()
        got = {{n: hashlib.sha256(t.cpu().contiguous().view(-1).view(torch.uint8).numpy()
                                  .tobytes()).hexdigest() for n, t in tensors.items()}}
        finish(ordinal=ordinal, core_device=core_device, meant=meant, devices=devices,
               digest=got, total=total)
        """
    )
    ordinal = fields["ordinal"]
    record_property("device", f"cuda:{ordinal}")
    assert fields["core_device"] == ordinal, run.stderr[-3000:]
    assert fields["meant"] == f"cuda:{ordinal}"
    assert fields["devices"] == [f"cuda:{ordinal}"]
    assert fields["digest"] == digests(directory)
