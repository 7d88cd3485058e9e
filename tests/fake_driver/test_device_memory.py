"""Bounded device memory of streamed loads (csrc/arena_pool.hpp): a consumer that takes tensors as
they arrive and drops them (vLLM's load_weights, Checkpoint.stream()) gets the whole checkpoint
through at most streamed_device_bytes of device memory beside its own parameters, memory comes
back without synchronizing the device, and the pipeline never writes memory the consumer's
stream may still read. load() keeps what it returns, as before."""

from __future__ import annotations

import gc
import threading

import blob2gpu
import pytest
import torch
from blob2gpu import errors
from blob2gpu.integrity.manifest import MANIFEST_NAME, manifest_for_directory
from blob2gpu.integrity.publish import publish
from conftest import checkpoint_bytes as expected
from conftest import random_tensor, upload_directory
from fake_framework import FakeFramework

SLOT = 64 << 10


def varied_shards(count: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Shards of tensors from 1 KiB to 160 KiB (some larger than a 64 KiB staging slot), bf16 and
    f32, so tensor groups, slots and manifest chunks cut each other anywhere."""
    shards = []
    for s in range(count):
        tensors = {}
        for i in range(7):
            rows = [4, 64, 160, 33, 96, 8, 128][(i + s) % 7]
            dtype = torch.bfloat16 if (i + s) % 2 else torch.float32
            tensors[f"s{s}.t{i}"] = random_tensor(dtype, (rows, 256), seed=seed + s * 10 + i)
        shards.append(tensors)
    return shards


def pool_figures(report) -> dict[str, object]:
    """A streamed load's device memory figures from its report (for assertion messages)."""
    return {k: v for k, v in report.to_dict().items() if k.startswith("streamed_")}


def checkpoint_size(directory) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


class VllmOnAGpu:
    """Plays vLLM on a GPU: the model's parameters are allocated first (device memory equal to the
    checkpoint's tensors), then the checkpoint streams in and each tensor is copied into its
    parameter on the framework's stream and dropped (load_weights)."""

    def __init__(self, fake_driver, sizes: dict[str, int]) -> None:
        blob2gpu._core.driver_info()  # the driver initialized, as torch's would be
        self.framework = FakeFramework(str(fake_driver.path))
        self.framework.bind()
        self.stream = self.framework.stream()
        self.parameters = {name: self.framework.alloc(n) for name, n in sizes.items()}
        self.sizes = sizes

    def load_weights(self, weights) -> list[str]:
        loaded = []
        for name, view in weights:
            self.framework.load_into(self.parameters[name], view, self.stream)
            loaded.append(name)
            del view
        return loaded

    def parameter_bytes(self, fake_driver) -> dict[str, bytes]:
        self.framework.synchronize(self.stream)
        return {n: fake_driver.read_device(p, self.sizes[n]) for n, p in self.parameters.items()}

    def close(self) -> None:
        self.framework.close()


@pytest.fixture
def vllm_gpu(fake_driver):
    made: list[VllmOnAGpu] = []

    def make(sizes: dict[str, int]) -> VllmOnAGpu:
        made.append(VllmOnAGpu(fake_driver, sizes))
        return made[-1]

    yield make
    for gpu in made:
        gpu.close()
    fake_driver.set_vram_budget(8 << 30)


@pytest.mark.parametrize("source", ["local", "blob", "blob-manifest"])
def test_vllm_on_a_gpu_streams_a_checkpoint_beside_its_parameters_within_the_cap(
    fake_driver, vllm_gpu, write_checkpoint, source, request
):
    # The case: parameters take device memory equal to the checkpoint, the GPU has 1.6x
    # the checkpoint, and the checkpoint streams in through the rest. On the old pipeline (every
    # shard's arena made when its header parsed) this ran out of memory.
    directory = write_checkpoint(varied_shards(4))
    want = expected(directory)
    total = checkpoint_size(directory)
    uri = str(directory)
    if source != "local":
        # Blob shards are checked by their Content-MD5 (each handed out whole, so no shard may be
        # larger than the cap), or with a manifest chunk by chunk (tensor groups, the feeder's
        # ranges and the chunks cut each other anywhere).
        azurite = request.getfixturevalue("blob_env")
        container = request.getfixturevalue("container")
        uri = f"az://{container}/m"
        if source == "blob":
            upload_directory(azurite, container, directory, "m")
        else:
            publish(directory, uri, chunk_bytes=48 << 10)
    gc.collect()
    fake_driver.set_vram_budget(fake_driver.live_device_bytes() + int(1.6 * total))
    gpu = vllm_gpu({name: len(b) for name, b in want.items()})
    parameters = fake_driver.live_device_bytes()
    fake_driver.reset_peak()
    fake_driver.reset_counters()
    fake_driver.set_copy_delay_us(200)  # the framework's copies lag behind the load's
    cap = int(0.3 * total)
    with blob2gpu.open(
        uri,
        device="cuda",
        framework="dlpack",
        staging_slot_bytes=SLOT,
        streamed_device_bytes=cap,
    ) as checkpoint:
        loaded = gpu.load_weights(checkpoint.stream())
        report = checkpoint.report
    assert sorted(loaded) == sorted(want)
    assert gpu.parameter_bytes(fake_driver) == want
    peak_over_parameters = fake_driver.peak_device_bytes() - parameters
    assert peak_over_parameters <= cap <= 0.35 * total
    assert report.streamed_device_bytes == cap
    assert 0 < report.streamed_peak_device_bytes <= cap
    assert report.streamed_mid_load_allocations == 0 and report.streamed_kept_bytes == 0
    # Giving memory back and taking it again never synchronized the device mid-load.
    assert fake_driver.device_syncs() == 0


def test_load_keeps_what_it_returns_and_its_arenas_synchronize_the_device(
    fake_driver, write_checkpoint
):
    # load() is not bounded: one arena per shard, the whole checkpoint, each made while earlier
    # shards' copies are in flight, which a GPU turns into device-wide synchronizations. The
    # fake counts them: the same counter that shows a streamed load makes none.
    directory = write_checkpoint(varied_shards(4))
    fake_driver.set_copy_delay_us(500)
    tensors = blob2gpu.load(
        str(directory),
        device="cuda",
        framework="dlpack",
        staging_slot_bytes=SLOT,
        streamed_device_bytes=SLOT,
    )
    assert {n: v.to_bytes() for n, v in tensors.items()} == expected(directory)
    assert fake_driver.device_syncs() > 0
    assert fake_driver.live_device_allocations() >= 4  # one arena per shard, all kept


def test_memory_a_consumer_may_still_read_is_not_written_again(
    fake_driver, vllm_gpu, write_checkpoint
):
    # The framework's stream is held: every copy into a parameter stays queued while the load
    # goes on and the tensors are dropped. A load that reused their memory at once would overwrite
    # bytes those copies have not read yet (the failure runai-model-streamer shipped); this one
    # waits on the framework's stream for each reuse, so the load can only finish after it.
    directory = write_checkpoint(varied_shards(3, seed=7))
    want = expected(directory)
    total = checkpoint_size(directory)
    gpu = vllm_gpu({name: len(b) for name, b in want.items()})
    fake_driver.hold_stream(gpu.stream, True)
    released = threading.Event()

    def release_soon() -> None:
        released.wait(0.5)  # the load is blocked on the held stream by then, or done without it
        fake_driver.hold_stream(gpu.stream, False)

    releaser = threading.Thread(target=release_soon)
    releaser.start()
    try:
        with blob2gpu.open(
            str(directory),
            device="cuda",
            framework="dlpack",
            staging_slot_bytes=SLOT,
            streamed_device_bytes=total // 4,
        ) as checkpoint:
            gpu.load_weights(checkpoint.stream())
    finally:
        released.set()
        releaser.join()
    assert gpu.parameter_bytes(fake_driver) == want


def test_a_shard_larger_than_the_cap_loads_in_tensor_groups(
    fake_driver, vllm_gpu, write_checkpoint
):
    directory = write_checkpoint(
        [{f"w{i}": random_tensor(torch.float32, (64, 256), i) for i in range(16)}]
    )  # one 1 MiB shard
    want = expected(directory)
    cap = 256 << 10
    gpu = vllm_gpu({name: len(b) for name, b in want.items()})
    parameters = fake_driver.live_device_bytes()
    fake_driver.reset_peak()
    with blob2gpu.open(
        str(directory),
        device="cuda",
        framework="dlpack",
        staging_slot_bytes=SLOT,
        streamed_device_bytes=cap,
    ) as checkpoint:
        gpu.load_weights(checkpoint.stream())
        report = checkpoint.report
    assert gpu.parameter_bytes(fake_driver) == want
    assert fake_driver.peak_device_bytes() - parameters <= cap
    assert report.streamed_cap_raised_to == 0 and report.shards[0].tensors == 16


def test_a_tensor_larger_than_the_cap_raises_it(fake_driver, vllm_gpu, write_checkpoint):
    directory = write_checkpoint(
        [
            {
                "small": random_tensor(torch.float32, (4, 256), 1),
                "huge": random_tensor(torch.float32, (512, 256), 2),  # 512 KiB
                "tail": random_tensor(torch.float32, (8, 256), 3),
            }
        ]
    )
    want = expected(directory)
    gpu = vllm_gpu({name: len(b) for name, b in want.items()})
    with blob2gpu.open(
        str(directory),
        device="cuda",
        framework="dlpack",
        staging_slot_bytes=SLOT,
        streamed_device_bytes=128 << 10,
    ) as checkpoint:
        gpu.load_weights(checkpoint.stream())
        report = checkpoint.report
    assert gpu.parameter_bytes(fake_driver) == want
    assert report.streamed_cap_raised_to >= 512 << 10  # admitted alone, the cap raised to it


def test_a_verified_checkpoint_streams_in_groups_cut_across_manifest_chunks(
    fake_driver, vllm_gpu, write_checkpoint
):
    # Chunks of 48 KiB cut tensors and groups anywhere: no group is handed out before the chunks
    # holding its bytes were checked, and none waits for a later group's reads to be checked.
    directory = write_checkpoint(varied_shards(2, seed=3), index=False)
    (directory / MANIFEST_NAME).write_text(manifest_for_directory(directory, 48 << 10).to_json())
    want = expected(directory)
    total = checkpoint_size(directory)
    gpu = vllm_gpu({name: len(b) for name, b in want.items()})
    parameters = fake_driver.live_device_bytes()
    fake_driver.reset_peak()
    cap = total // 4
    with blob2gpu.open(
        str(directory),
        device="cuda",
        framework="dlpack",
        verify="crc32c",
        staging_slot_bytes=SLOT,
        streamed_device_bytes=cap,
    ) as checkpoint:
        gpu.load_weights(checkpoint.stream())
        report = checkpoint.report
    assert report.verification == "crc32c" and report.verified_bytes >= total
    assert gpu.parameter_bytes(fake_driver) == want
    # Once over the cap in ~35 random-order runs: an io thread still held a published group's
    # arenas, so the pool kept them and grew (fixed in run_open). If it fails, the report's
    # pool figures say whether the pool grew, kept or raised its cap.
    assert fake_driver.peak_device_bytes() - parameters <= cap, pool_figures(report)


def test_a_consumer_that_keeps_every_streamed_tensor_is_not_left_waiting(
    fake_driver, write_checkpoint
):
    # dict(checkpoint.stream()) keeps all of it: the load stops counting what the consumer keeps
    # rather than wait forever for memory only the consumer can give back.
    directory = write_checkpoint(varied_shards(3, seed=11))
    total = checkpoint_size(directory)
    with blob2gpu.open(
        str(directory),
        device="cuda",
        framework="dlpack",
        staging_slot_bytes=SLOT,
        streamed_device_bytes=total // 5,
    ) as checkpoint:
        kept = dict(checkpoint.stream())
        report = checkpoint.report
    assert {n: v.to_bytes() for n, v in kept.items()} == expected(directory)
    assert report.streamed_kept_bytes > 0


def test_iterating_an_opened_checkpoint_keeps_its_tensors_and_bounds_the_rest(
    fake_driver, write_checkpoint
):
    # Iteration keeps each tensor (get() works after it): what is kept is the consumer's, and the
    # bound applies to what has not been handed out.
    directory = write_checkpoint(varied_shards(3, seed=5))
    total = checkpoint_size(directory)
    with blob2gpu.open(
        str(directory),
        device="cuda",
        framework="dlpack",
        staging_slot_bytes=SLOT,
        streamed_device_bytes=total // 5,
    ) as checkpoint:
        names = [name for name, _ in checkpoint]
        got = {n: checkpoint.get(n).to_bytes() for n in names}
        report = checkpoint.report
    assert got == expected(directory)
    assert report.streamed_kept_bytes == 0  # kept on hand-out, never stuck


def small_shards(count: int, per_shard: int = 16) -> list[dict[str, torch.Tensor]]:
    def tensor(s: int, i: int) -> torch.Tensor:
        return random_tensor(torch.float16, (16, 256), s * 100 + i)

    return [{f"s{s}.w{i}": tensor(s, i) for i in range(per_shard)} for s in range(count)]


def test_fit_check_of_a_streamed_load_counts_the_cap(fake_driver, write_checkpoint):
    directory = write_checkpoint(small_shards(2))
    total = checkpoint_size(directory)
    gc.collect()
    fake_driver.set_vram_budget(fake_driver.live_device_bytes() + total // 2)
    try:
        # Twice the free memory in weights: a streamed load fits, a kept one does not.
        with blob2gpu.open(
            str(directory),
            device="cuda",
            framework="dlpack",
            staging_slot_bytes=SLOT,
            streamed_device_bytes=total // 4,
        ) as checkpoint:
            assert sum(1 for _ in checkpoint.stream()) == 32
        with pytest.raises(errors.InsufficientGPUMemory, match="of weights"):
            blob2gpu.load(str(directory), device="cuda", framework="dlpack")
        with pytest.raises(errors.InsufficientGPUMemory, match="lower streamed_device_bytes"):
            blob2gpu.open(str(directory), device="cuda", streamed_device_bytes=total * 3 // 4)
    finally:
        fake_driver.set_vram_budget(8 << 30)


def test_the_default_cap_is_sized_from_the_gpu(fake_driver, write_checkpoint):
    directory = write_checkpoint(varied_shards(1))
    budget = fake_driver.live_device_bytes() + (64 << 20)
    fake_driver.set_vram_budget(budget)
    try:
        with blob2gpu.open(str(directory), device="cuda", framework="dlpack") as checkpoint:
            for _ in checkpoint.stream():
                pass
            report = checkpoint.report
    finally:
        fake_driver.set_vram_budget(8 << 30)
    assert report.streamed_device_bytes == min(4 << 30, int(budget * 0.10))


def test_closing_a_streamed_load_midway_gives_everything_back(fake_driver, write_checkpoint):
    # The consumer stops after a few tensors: groups still waiting for memory, landing or landed
    # are dropped, and nothing of the load stays on the device.
    directory = write_checkpoint(varied_shards(4, seed=13))
    total = checkpoint_size(directory)
    gc.collect()
    before = fake_driver.live_device_allocations(), blob2gpu._core.live_arena_count()
    fake_driver.set_copy_delay_us(300)
    with blob2gpu.open(
        str(directory),
        device="cuda",
        framework="dlpack",
        staging_slot_bytes=SLOT,
        streamed_device_bytes=total // 5,
    ) as checkpoint:
        for count, (_, view) in enumerate(checkpoint.stream()):
            view.to_bytes()
            if count == 5:
                break
        del view
    gc.collect()
    assert (fake_driver.live_device_allocations(), blob2gpu._core.live_arena_count()) == before


def close_at_once(start: threading.Barrier, closer) -> None:
    start.wait()
    closer.close()


def test_two_threads_closing_a_streamed_load_at_once_take_turns(fake_driver, write_checkpoint):
    # close() gives the GIL up, so two Python threads (or one and the pipeline's close) can be in
    # it at once: the second waits for the first rather than tear the pool down beside it.
    directory = write_checkpoint(varied_shards(4, seed=17))
    paths = sorted(directory.glob("*.safetensors"))
    total = checkpoint_size(directory)
    gc.collect()
    before = fake_driver.live_device_allocations(), blob2gpu._core.live_arena_count()
    fake_driver.set_copy_delay_us(300)
    for _ in range(8):
        pipeline = blob2gpu._core.LoadPipeline(
            "cuda",
            staging_slots=4,
            staging_slot_bytes=SLOT,
            copy_streams=2,
            io_threads=2,
            use_pinned_host_fallback=True,
        )
        sources = [
            blob2gpu._core.ShardSource(p.name, size=p.stat().st_size, path=str(p)) for p in paths
        ]
        session = pipeline.start_local(sources, device_cap=total // 5)
        session.next_shard()  # mid-load: groups landing, others waiting for memory
        start = threading.Barrier(3)
        threads = [
            threading.Thread(target=close_at_once, args=(start, closer))
            for closer in (session, session, pipeline)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        del session, pipeline
    gc.collect()
    assert (fake_driver.live_device_allocations(), blob2gpu._core.live_arena_count()) == before


def test_a_failure_mid_stream_gives_everything_back(fake_driver, write_checkpoint):
    directory = write_checkpoint(varied_shards(3, seed=17))
    total = checkpoint_size(directory)
    gc.collect()
    before = fake_driver.live_device_allocations(), blob2gpu._core.live_arena_count()
    fake_driver.fail_copy_after(12)

    def consume() -> None:  # the consumer holds nothing once it has failed
        with blob2gpu.open(
            str(directory),
            device="cuda",
            framework="dlpack",
            staging_slot_bytes=SLOT,
            streamed_device_bytes=total // 5,
        ) as checkpoint:
            for _ in checkpoint.stream():
                pass

    with pytest.raises(errors.CudaError, match="cuMemcpyHtoDAsync"):
        consume()
    gc.collect()
    assert (fake_driver.live_device_allocations(), blob2gpu._core.live_arena_count()) == before


def test_a_selection_streams_within_the_cap(fake_driver, vllm_gpu, write_checkpoint):
    # What the vLLM loader does for a model that skips some checkpoint tensors.
    directory = write_checkpoint(varied_shards(3, seed=19))
    want = {n: b for n, b in expected(directory).items() if not n.endswith(("t2", "t5"))}
    gpu = vllm_gpu({name: len(b) for name, b in want.items()})
    parameters = fake_driver.live_device_bytes()
    fake_driver.reset_peak()
    cap = sum(len(b) for b in want.values()) // 4
    with blob2gpu.open(
        str(directory),
        device="cuda",
        framework="dlpack",
        staging_slot_bytes=SLOT,
        streamed_device_bytes=cap,
        tensor_filter=lambda name: name in want,
    ) as checkpoint:
        assert sorted(gpu.load_weights(checkpoint.stream())) == sorted(want)
    assert gpu.parameter_bytes(fake_driver) == want
    assert fake_driver.peak_device_bytes() - parameters <= cap


def test_cache_hits_checked_by_content_md5_stream_within_the_cap(
    fake_driver, vllm_gpu, write_checkpoint, blob_env, container, cache_dir
):
    # A second load reads every shard from the node's cache, checked against the blob's
    # Content-MD5 as the core reads it: each such shard is handed out whole (one group).
    directory = write_checkpoint(varied_shards(3, seed=23))
    upload_directory(blob_env, container, directory, "m")
    uri = f"az://{container}/m"
    want = expected(directory)
    largest = max(f.stat().st_size for f in directory.glob("*.safetensors"))
    with blob2gpu.Loader(
        local_nvme_cache_enabled=True, cache_dir=str(cache_dir), staging_slot_bytes=SLOT
    ) as loader:
        loader.load(uri, device="cuda", framework="dlpack")
        loader.wait_for_cache_fill()
        gpu = vllm_gpu({name: len(b) for name, b in want.items()})
        parameters = fake_driver.live_device_bytes()
        fake_driver.reset_peak()
        with loader.open(
            uri, device="cuda", framework="dlpack", streamed_device_bytes=2 * largest
        ) as checkpoint:
            gpu.load_weights(checkpoint.stream())
            report = checkpoint.report
    assert all(s.cache_hit for s in report.shards) and report.verification == "content-md5"
    assert gpu.parameter_bytes(fake_driver) == want
    assert fake_driver.peak_device_bytes() - parameters <= 2 * largest
