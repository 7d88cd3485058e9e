"""The fake driver's copy-bandwidth model (FakeDriver.set_link_gbps, FAKE_CUDA_LINK_GBPS): each
device's host-to-device copies share one modelled link at a set rate, and the fake counts how
long it was busy. With it, a test shows what the pipeline is for: that with default settings it
keeps a link busy, copy after copy, instead of leaving it idle while it reads.

The rate is scaled down to what this machine's CPUs can feed through the fake (whose copies are
host memcpys): 0.5 GB/s. Here the pipeline feeds the fake at 1.6-2.3 GB/s with the CPUs shared, so
reads and the fake's own copies take about a quarter of the link's time; at 1 GB/s the sized
default still keeps the link 100% busy, while a starved pipeline (2 slots, 1 thread) leaves it
idle about 20% of the time (bench/README.md, "Keeping the link full"). The busy fraction is a
property of the pipeline, not of the host's speed: a copy counts from when it was queued (not
when the fake's thread got a CPU), and gaps are only the time no copy was queued."""

from __future__ import annotations

import blob2gpu
import torch
from conftest import checkpoint_bytes as expected
from conftest import random_tensor, sparse_checkpoint

LINK_GBPS = 0.5


def test_each_copy_holds_the_link_for_its_bytes_over_the_rate(fake_driver, write_checkpoint):
    directory = write_checkpoint(
        [
            {
                f"s{s}.w{i}": random_tensor(torch.float32, (128, 256), seed=10 * s + i)
                for i in range(4)
            }
            for s in range(2)
        ]
    )
    assert fake_driver.link_stats().copies == 0  # no model: nothing counted
    with blob2gpu.open(
        str(directory), device="cuda", framework="dlpack", staging_slot_bytes=65536
    ) as checkpoint:
        checkpoint.to_dict()
    assert fake_driver.link_stats().copies == 0 and fake_driver.h2d_copies() > 0
    fake_driver.reset_counters()
    fake_driver.set_link_gbps(0.05)  # 50 MB/s: 1 MiB of tensors hold the link ~21 ms
    with blob2gpu.open(
        str(directory), device="cuda", framework="dlpack", staging_slot_bytes=65536
    ) as checkpoint:
        got = {name: view.to_bytes() for name, view in checkpoint.to_dict().items()}
    assert got == expected(directory)  # the bytes still arrive whole
    link = fake_driver.link_stats()
    assert link.copies == fake_driver.h2d_copies() >= 16
    # Each copy: its bytes at 0.05 bytes/ns (truncated to whole ns); copies share the link one
    # after another, so the span from the first start to the last end holds all of them.
    modelled = fake_driver.h2d_bytes() / 0.05
    assert modelled - link.copies <= link.busy_ns <= modelled
    assert link.span_ns >= link.busy_ns


def test_the_pipeline_keeps_a_modelled_link_busy_with_default_settings(fake_driver, tmp_path):
    # 768 MiB in 6 shards: more than twice the sized ring (10 x 32 MiB on this host), so the
    # steady state counts, not a ring that swallows the whole checkpoint. Sparse files: no disk.
    shards = 6
    for i in range(shards):
        sparse_checkpoint(
            tmp_path / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", 128 << 20, f"huge.{i}"
        )
    fake_driver.set_link_gbps(LINK_GBPS)
    with blob2gpu.Loader() as loader:  # every pipeline setting at its default (sized)
        with loader.open(str(tmp_path), device="cuda", framework="dlpack") as checkpoint:
            for _name, view in checkpoint:  # as a serving engine takes them: each then dropped
                del view
            report = checkpoint.report
    link = fake_driver.link_stats()
    assert link.copies >= shards * 128 // (report.staging_slot_bytes >> 20)
    assert link.busy_fraction >= 0.9, (link, report.staging_slots, report.io_threads)
