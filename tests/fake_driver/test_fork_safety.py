"""fork() while another thread holds one of the core's process-wide locks: the child must not
inherit the lock held (it would wait forever on its first CUDA call, even one that only says CUDA
cannot be used in a forked child). The core takes its device registry's mutex and its driver
loading's mutex around every fork (pthread_atfork)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

FAKE_DIR = Path(__file__).resolve().parents[1] / "fake_cuda"

# Forks while `holder` (a thread) is inside the slow driver call, then waits for the child: it
# must finish what `child` does, not hang. Exit 3: the child hung (killed after 30 s).
SCRIPT = """
import os, sys, threading, time
sys.path.insert(0, {fake_dir!r})
from build import FakeDriver
import blob2gpu
from blob2gpu import _core
fake = FakeDriver(os.environ["BLOB2GPU_CUDA_DRIVER"])
fake.set_fail_in_forked_child(True)
{setup}
holder = threading.Thread(target=lambda: {holder})
holder.start()
time.sleep(0.3)  # the thread is inside the slow call by now (or the fork waits for it)
pid = os.fork()
if pid == 0:
    try:
        {child}
    except blob2gpu.errors.Blob2GpuError as error:
        print("child:", type(error).__name__, flush=True)
    os._exit(0)
deadline = time.monotonic() + 30
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("the forked child hung", flush=True)
        sys.exit(3)
    time.sleep(0.05)
holder.join()
sys.exit(os.waitstatus_to_exitcode(status))
"""


def fork_while(setup: str, holder: str, child: str) -> subprocess.CompletedProcess[str]:
    body = SCRIPT.format(fake_dir=str(FAKE_DIR), setup=setup, holder=holder, child=child)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_fork_while_another_thread_holds_the_device_registry(fake_driver):
    # Making a pipeline retains the device's primary context under the registry's mutex (slowed
    # down here); the child then asks for the device's memory, which takes that mutex.
    run = fork_while(
        setup="_core.driver_info()\nfake.set_retain_delay_us(1_500_000)",
        holder="_core.LoadPipeline('cuda:0', 2, 65536, 1, 1, True)",
        child="_core.device_memory(0)",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "child: CudaError" in run.stdout


def test_fork_while_another_thread_loads_the_driver(fake_driver):
    # device_memory() loads the driver without the GIL (so the fork happens during cuInit).
    run = fork_while(
        setup="fake.set_init_delay_us(1_500_000)",
        holder="_core.device_memory(0)",
        child="print('child:', _core.driver_info()['available'], flush=True)",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "child: False" in run.stdout  # CUDA answered, refusing a forked child


def test_fork_while_a_pipeline_is_being_made(fake_driver):
    # The pipeline a load makes on a core thread (slowed down here) when the process forks: that
    # thread is the parent's, so the child's result() refuses at once and dropping it waits for
    # nothing; the parent still gets its pipeline.
    run = fork_while(
        setup="_core.driver_info()\nfake.set_retain_delay_us(1_500_000)\n"
        "being_made = _core.PipelineBeingMade('cuda:0', 2, 65536, 1, 1, True)",
        holder="being_made.result().close()",
        child="globals().pop('being_made').result()",  # then dropped: its last reference
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "child: InvalidArgument" in run.stdout
