"""The two load strategies of the case study: direct-gpu (the pinned ring, default) and
host-staging (each whole shard in host memory first, kept so users can compare). Both give the
same bytes; the report says which ran."""

from __future__ import annotations

import blob2gpu
import pytest
import torch
from conftest import as_bytes, random_tensor, upload_directory
from conftest import checkpoint_bytes as expected


@pytest.fixture
def checkpoint(write_checkpoint):
    return write_checkpoint(
        [
            {f"s{s}.w{i}": random_tensor(torch.bfloat16, (128, 96), s * 3 + i) for i in range(3)}
            for s in range(3)
        ]
    )


@pytest.mark.parametrize("strategy", ["direct-gpu", "host-staging"])
def test_local_strategies_give_the_same_bytes(fake_driver, checkpoint, monkeypatch, strategy):
    monkeypatch.setenv("MODEL_LOAD_STRATEGY", strategy)
    with blob2gpu.open(str(checkpoint), device="cuda", framework="dlpack") as ckpt:
        got = {n: as_bytes(t) for n, t in ckpt.to_dict().items()}
        report = ckpt.report
    assert got == expected(checkpoint)
    assert report.strategy == strategy
    if strategy == "host-staging":
        # Whole shards copied from pageable host memory, not through the pinned ring.
        assert fake_driver.pageable_h2d_copies() >= 3 and report.peak_slots_in_flight == 0
    else:
        assert fake_driver.pageable_h2d_copies() == 0 and report.peak_slots_in_flight >= 1


def test_host_staging_from_blob(fake_driver, checkpoint, azurite, container, blob_env):
    upload_directory(azurite, container, checkpoint, "m")
    got = blob2gpu.load(
        f"az://{container}/m",
        device="cuda",
        framework="dlpack",
        direct_gpu_load=False,
        chunk_bytes=8192,
    )
    assert {n: as_bytes(t) for n, t in got.items()} == expected(checkpoint)


def test_host_staging_is_ignored_on_the_cpu(checkpoint):
    with blob2gpu.open(str(checkpoint), direct_gpu_load=False) as ckpt:
        assert len(ckpt.to_dict()) == 9
        assert ckpt.report.strategy == "cpu"  # cpu memory is the destination already
    from blob2gpu.operations.timeline import describe

    shown = describe(ckpt.report)
    assert "strategy cpu, straight into host memory" in shown and "staging," not in shown
