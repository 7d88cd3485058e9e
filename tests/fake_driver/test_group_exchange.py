"""A fan-out's exchange on GPUs (integrations/distributed.py with a device communicator), on the
fake CUDA driver: two ranks (threads of this process, each with its own pipeline and its own
vLLM-like consumer) load one checkpoint; each lands only its part host-to-device, and the rest
reaches its memory device to device. The communicator is a stand-in for NCCL: its broadcast is
the fake driver's device-to-device copies, ordered by events as a collective's streams are (the
receiver's stream waits for the sender's, and the sender's for the receivers' reads). What only a
real GPU checks: NCCL itself and torch's stream handling around it (DeviceCommunicator)."""

from __future__ import annotations

import gc
import threading

import blob2gpu
import pytest
import torch
from blob2gpu.integrations.distributed import GroupFanOut
from blob2gpu.integrity.manifest import MANIFEST_NAME, manifest_for_directory
from blob2gpu.loading.loader import Loader
from conftest import checkpoint_bytes as expected
from conftest import random_tensor
from fake_framework import FakeFramework
from test_device_memory import VllmOnAGpu, checkpoint_size

SLOT = 64 << 10


class FakeDeviceGroup:
    """The collectives of `world` ranks that are threads of one process: host ones through
    shared memory, broadcast_destinations as device-to-device copies on each rank's own stream
    (see the module)."""

    def __init__(self, world: int, driver_path: str) -> None:
        self.world = world
        self.driver_path = driver_path
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots: list[object] = [None] * world

    def rank(self, rank: int, default_stream: bool) -> FakeDeviceCommunicator:
        return FakeDeviceCommunicator(self, rank, default_stream)

    def gather(self, rank: int, value: object) -> list[object]:
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class FakeDeviceCommunicator:
    """One rank's view of a FakeDeviceGroup (the Communicator protocol)."""

    kind = "device"

    def __init__(self, group: FakeDeviceGroup, rank: int, default_stream: bool) -> None:
        self.group, self.rank, self.world = group, rank, group.world
        self.framework = FakeFramework(group.driver_path)
        # 1: CU_STREAM_LEGACY, the legacy default stream (DLPack's 1 too), torch's usual current
        # stream; else a stream of its own.
        self._stream = 1 if default_stream else 0
        self.broadcasts = 0

    def bind(self) -> None:
        self.framework.bind()
        if not self._stream:
            self._stream = self.framework.stream()

    def all_gather_object(self, value: object) -> list[object]:
        return self.group.gather(self.rank, value)

    def max_int(self, value: int) -> int:
        return max(int(v) for v in self.group.gather(self.rank, value))  # type: ignore[call-overload]

    def broadcast_host(self, tensor: torch.Tensor, src: int) -> None:
        sent = self.group.gather(self.rank, tensor.clone() if self.rank == src else None)[src]
        if self.rank != src:
            tensor.copy_(sent)  # type: ignore[arg-type]

    def broadcast_destinations(self, views, src: int) -> None:
        fw, stream = self.framework, self._stream
        # Imported as torch would import them (the stream waits for what they hold already).
        capsules = [v.__dlpack__(stream=stream, max_version=(1, 0)) for v in views]
        mine = ([v.data_ptr for v in views], fw.record(stream)) if self.rank == src else None
        addresses, sent = self.group.gather(self.rank, mine)[src]  # type: ignore[misc]
        if self.rank != src:
            fw.wait(stream, sent)
            for view, address in zip(views, addresses, strict=True):
                fw.copy(view.data_ptr, address, view.nbytes, stream)
        done = self.group.gather(self.rank, fw.record(stream))
        if self.rank == src:  # the sender's memory is read until every receiver's copies ran
            for rank, event in enumerate(done):
                if rank != src:
                    fw.wait(stream, event)  # type: ignore[arg-type]
        self.group.barrier.wait()
        del capsules
        self.broadcasts += 1

    def stream(self) -> int:
        return self._stream


def two_shards_one_split() -> list[dict[str, torch.Tensor]]:
    """~1.4 and ~1.6 MiB: with 2 ranks and 1 MiB parts the second shard is split between them.
    An odd int8 tensor puts the float32 after it off its alignment (a realigned tensor)."""
    return [
        {
            "a": random_tensor(torch.float32, (160, 1024), 1),
            "b": random_tensor(torch.bfloat16, (300, 1024), 2),
        },
        {
            "c": random_tensor(torch.int8, (9,), 3),
            "d": random_tensor(torch.float32, (200, 1024), 4),
            "e": random_tensor(torch.bfloat16, (400, 1024), 5),
        },
    ]


@pytest.mark.parametrize("default_stream", [False, True])
def test_each_rank_copies_its_part_and_receives_the_rest_device_to_device(
    fake_driver, write_checkpoint, default_stream
):
    directory = write_checkpoint(two_shards_one_split())
    (directory / MANIFEST_NAME).write_text(manifest_for_directory(directory, 64 << 10).to_json())
    want = expected(directory)
    total = checkpoint_size(directory)
    data = total - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in directory.glob("*.safetensors")
    )
    blob2gpu._core.driver_info()
    gc.collect()
    group = FakeDeviceGroup(2, str(fake_driver.path))
    communicators = [group.rank(r, default_stream) for r in range(2)]
    gpus = [VllmOnAGpu(fake_driver, {n: len(b) for n, b in want.items()}) for _ in range(2)]
    parameters = fake_driver.live_device_bytes()
    fake_driver.reset_peak()
    fake_driver.set_copy_delay_us(200)  # copies lag behind the calls that queue them
    cap = int(0.35 * total)
    reports: list[object] = [None, None]
    results: list[dict[str, bytes] | BaseException | None] = [None, None]

    def rank(r: int) -> None:
        try:
            gpus[r].framework.bind()
            with Loader(
                verify="crc32c",
                staging_slot_bytes=SLOT,
                streamed_device_bytes=cap,
            ) as loader:
                request = loader.request(str(directory), device="cuda", framework="dlpack")
                strategy = GroupFanOut(r, 2, communicator=communicators[r])
                with loader.start(request, strategy) as checkpoint:
                    gpus[r].load_weights(checkpoint.stream())
                reports[r] = checkpoint.report
            results[r] = gpus[r].parameter_bytes(fake_driver)
        except BaseException as error:
            results[r] = error
            group.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    try:
        assert results == [want, want]
        landed = [r.group_landed_bytes for r in reports]  # type: ignore[attr-defined]
        received = [r.group_received_bytes for r in reports]  # type: ignore[attr-defined]
        assert sum(landed) == data and all(0 < n < data for n in landed)
        assert [data - n for n in landed] == received
        assert all(c.broadcasts > 0 for c in communicators)
        for report in reports:
            assert 0 < report.streamed_peak_device_bytes <= cap  # type: ignore[attr-defined]
        # Both ranks' memory is this process's: each within its cap beside its parameters.
        assert fake_driver.peak_device_bytes() - parameters <= 2 * cap
    finally:
        for c in communicators:
            c.framework.close()
        for gpu in gpus:
            gpu.close()
