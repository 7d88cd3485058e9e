"""Storage faults between the loader and Azurite (through the fault proxy): resets mid-body,
stalls past the read timeout and 503 bursts are retried (only the missing bytes) and counted;
exhausted retries, a blob overwritten mid-load and throttled listings end in typed errors that
release every allocation."""

from __future__ import annotations

import email.utils
import gc
import time

import blob2gpu
import pytest
import torch
from blob2gpu import _core, errors
from blob2gpu.operations.timeline import describe
from conftest import as_bytes, load_with_report, random_tensor, upload_directory
from conftest import checkpoint_bytes as expected

FAST_RETRIES = {"retry_backoff_seconds": 0.01, "retry_backoff_max_seconds": 0.05}


@pytest.fixture
def published(write_checkpoint, azurite, container):
    directory = write_checkpoint(
        [
            {
                f"s{s}.w{i}": random_tensor(torch.float32, (128, 256), seed=10 * s + i)
                for i in range(2)
            }
            for s in range(3)
        ]
    )  # 3 x 256 KiB
    upload_directory(azurite, container, directory, "m")
    return directory


@pytest.fixture
def via_proxy(azurite, fault_proxy, monkeypatch):
    """az:// URIs resolve to the fault proxy in front of Azurite."""
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME", raising=False)
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(port=fault_proxy.port)
    )
    return fault_proxy


def load(uri, device, **settings):
    settings = {"chunk_bytes": 65536, **FAST_RETRIES, **settings}
    if device != "cpu":
        settings.setdefault("staging_slot_bytes", 65536)
    return load_with_report(uri, device, **settings)


def test_resets_mid_body_are_retried_from_the_missing_bytes(
    device, published, container, via_proxy
):
    via_proxy.faults.resets = 3
    via_proxy.faults.reset_after_bytes = 20000
    got, report = load(f"az://{container}/m", device)
    assert got == expected(published)
    assert report.retries >= 3 and sum(s.retries for s in report.shards) >= 3
    total = sum(f.stat().st_size for f in published.glob("*.safetensors"))
    # Only the missing bytes were fetched again: at most the bytes cut off by the resets.
    assert via_proxy.counters.range_bytes <= total + 3 * 65536


def test_stall_past_the_read_timeout_is_retried(device, published, container, via_proxy):
    via_proxy.faults.stalls = 1
    via_proxy.faults.stall_seconds = 3.0
    got, report = load(f"az://{container}/m", device, read_timeout_seconds=0.5)
    assert got == expected(published)
    assert report.retries >= 1


def test_server_busy_bursts_are_retried(device, published, container, via_proxy):
    via_proxy.faults.statuses = 5
    via_proxy.faults.status = 503
    got, report = load(f"az://{container}/m", device)
    assert got == expected(published)
    assert report.retries >= 5


def test_throttling_lowers_concurrency_and_grows_ranges(published, container, via_proxy):
    # The first ranged GETs are answered 503 ServerBusy: the load goes back to one request in
    # flight (and slow-starts up to half its limit) and grows its 64 KiB ranges (up to the
    # staging slot), so each shard's other 192 KiB come in fewer, larger ranges; the report
    # says so.
    armed = []

    def throttle_shards(path, count):
        if path.endswith(".safetensors") and not armed:  # not the index's reads
            armed.append(count)
            via_proxy.faults.statuses = 6

    via_proxy.faults.on_range_get = throttle_shards
    got, report = load(f"az://{container}/m", "cpu")
    assert got == expected(published)
    assert report.throttled >= 1 and report.throttle_decreases >= 1
    assert report.concurrency_lowest is not None and report.concurrency_lowest <= 4
    assert report.concurrency_settled is not None and report.concurrency_settled <= 8
    assert report.range_bytes_settled is not None and report.range_bytes_settled >= 131072
    answered = report.requests - report.throttled
    assert answered < 3 * 4  # 4 ranges of 64 KiB per shard without throttling
    assert "throttled answer(s)" in describe(report)
    assert blob2gpu.LoadReport.from_dict(report.to_dict()).throttled == report.throttled


def test_unthrottled_load_starts_at_its_ceiling_and_keeps_its_ranges(
    published, container, via_proxy
):
    _, report = load(f"az://{container}/m", "cpu", prefetch_concurrency=3)
    assert (report.throttled, report.throttle_decreases) == (0, 0)
    # Its node has seen no throttling: no reason to start slowly.
    assert (report.concurrency_lowest, report.concurrency_settled) == (3, 3)
    assert report.range_bytes_settled == 65536
    assert "throttled" not in describe(report)


def test_a_load_on_a_node_throttled_lately_slow_starts_to_its_ceiling(
    published, container, via_proxy, node_cache_home
):
    from blob2gpu.sources.azure.throttle import NodeThrottle

    # Another load on this node (the default cache_dir's locks) was throttled just now, down to
    # 2 requests in flight, and asked for no wait.
    locks = node_cache_home / "blob2gpu" / "locks"
    locks.mkdir(parents=True)
    assert NodeThrottle(locks).publish(0.0, 2, 65536) == 1
    _, report = load(f"az://{container}/m", "cpu", prefetch_concurrency=3)
    assert (report.throttled, report.throttle_decreases) == (0, 0)
    # It opens with 1 request in flight and, answered, goes up to prefetch_concurrency.
    assert (report.concurrency_lowest, report.concurrency_settled) == (1, 3)


def test_retry_after_is_honoured_up_to_the_throttling_budget(published, container, via_proxy):
    via_proxy.faults.statuses = 2
    via_proxy.faults.retry_after = "1"
    got, report = load(f"az://{container}/m", "cpu")  # 0.5-1 s each without the header
    assert got == expected(published) and report.retries == 2
    # The waits slept (not a wall-clock timing): 1 s each, spread by up to a quarter more.
    assert 2.0 <= report.retry_wait_seconds <= 2.5
    assert "s backing off" in describe(report)
    via_proxy.reset()
    via_proxy.faults.statuses = 1
    via_proxy.faults.retry_after = "3600"  # an hour: capped at retry_throttled_seconds
    got, report = load(f"az://{container}/m", "cpu", retry_throttled_seconds=0.3)
    assert got == expected(published) and report.retry_wait_seconds == pytest.approx(0.3)


def busy(headers: dict[str, str]) -> Exception:
    """The SDK's error for a 503 answer carrying `headers`."""
    from azure.core.exceptions import HttpResponseError
    from requests.structures import CaseInsensitiveDict

    class Response:
        status_code, reason = 503, "Busy"

        def text(self):
            return ""

    response = Response()
    response.headers = CaseInsensitiveDict(headers)
    return HttpResponseError(response=response)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"x-ms-retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a date in the past
        ({"Retry-After": "soon"}, 0.0),
        ({}, 0.0),
    ],
)
def test_retry_after_forms(headers, seconds):
    from blob2gpu.sources.azure.retry import retry_after

    assert retry_after(busy(headers)) == seconds
    assert retry_after(ConnectionResetError()) == 0.0
    in_30_s = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after(busy({"Retry-After": in_30_s})) <= 30


def test_a_throttled_answer_stays_away_as_asked_or_for_the_second_half_of_the_window():
    from blob2gpu.sources.azure.location import BlobLocation
    from blob2gpu.sources.azure.retry import RetryPolicy

    where = BlobLocation("http://127.0.0.1:1/acct", "acct", "c", "m")
    policy = RetryPolicy(where, 6, 0.01, 0.05, throttled_seconds=30.0)
    for _ in range(50):
        assert 7.0 <= policy.stay_away(busy({"Retry-After": "7"})) <= 8.75
        # No Retry-After: the account's limits are per second; spread over its second half.
        assert 0.5 <= policy.stay_away(busy({})) <= 1.0
        assert 0.5 <= policy.backoff(1, busy({})) <= 1.0  # not the 0.005-0.01 s backoff
    assert policy.backoff(1, busy({}), stay=0.75) == 0.75  # a draw the caller told others
    assert policy.stay_away(ConnectionResetError()) == 0.0
    assert policy.backoff(1, ConnectionResetError()) <= 0.01
    short = RetryPolicy(where, 6, 0.01, 0.05, throttled_seconds=0.2)  # the budget caps both
    assert short.stay_away(busy({})) <= 0.2 and short.stay_away(busy({"Retry-After": "7"})) == 0.2


def test_a_throttled_load_s_node_partners_stay_away_as_long_as_it_does(
    published, container, via_proxy, tmp_path
):
    from blob2gpu.sources.azure.throttle import NodeThrottle

    armed = []

    def throttle_a_shard(path, count):
        if path.endswith(".safetensors") and not armed:
            armed.append(count)
            via_proxy.faults.statuses = 1  # one 503 ServerBusy, no Retry-After

    via_proxy.faults.on_range_get = throttle_a_shard
    got, report = load(f"az://{container}/m", "cpu", cache_dir=str(tmp_path))
    assert got == expected(published) and report.throttled == 1
    state = NodeThrottle(tmp_path / "locks").state()
    assert 0.5 <= state.until - state.stamp <= 1.0  # not just this load's first backoff
    assert report.retry_wait_seconds == pytest.approx(state.until - state.stamp)  # one draw


@pytest.mark.parametrize("status", [429, 500, 502, 504, 408])
def test_every_transient_status_is_retried(published, container, via_proxy, status):
    via_proxy.faults.statuses = 2
    via_proxy.faults.status = status
    got, report = load(f"az://{container}/m", "cpu")
    assert got == expected(published) and report.retries >= 2


def test_throttled_listing_is_retried(published, container, via_proxy):
    via_proxy.faults.list_statuses = 2
    got, _ = load(f"az://{container}/m", "cpu")
    assert got == expected(published)


def test_exhausted_retries_fail_typed_and_release_everything(
    device, published, container, via_proxy, request
):
    via_proxy.faults.statuses = 10_000
    gc.collect()
    arenas = _core.live_arena_count()
    if device == "cuda":
        driver = request.getfixturevalue("fake_driver")
        device_allocs = driver.live_device_allocations()
    with pytest.raises(errors.StorageUnavailable, match=r"after 3 attempts") as info:
        load(f"az://{container}/m", device, retry_max_attempts=3, retry_throttled_seconds=0)
    assert "retry_max_attempts" in str(info.value) and container in str(info.value)
    del info
    gc.collect()
    assert _core.live_arena_count() == arenas
    if device == "cuda":
        assert driver.live_device_allocations() == device_allocs
        assert driver.live_host_allocations() == 0


def test_blob_overwritten_during_the_load_is_detected(
    device, published, azurite, container, via_proxy
):
    victim = "m/model-00003-of-00003.safetensors"
    replacement = (published / "model-00001-of-00003.safetensors").read_bytes()

    def overwrite_once(path, count):
        if count == 4:
            azurite.service().get_container_client(container).upload_blob(
                victim, replacement, overwrite=True
            )

    via_proxy.faults.on_range_get = overwrite_once
    gc.collect()
    arenas = _core.live_arena_count()
    with pytest.raises(errors.BlobChanged, match="model-00003-of-00003.safetensors") as info:
        load(f"az://{container}/m", device, prefetch_concurrency=1)
    assert "load again" in str(info.value) and info.value.hint == "load again"
    assert info.value.blob == victim and info.value.etag is not None  # the version it read
    del info
    gc.collect()
    assert _core.live_arena_count() == arenas


def test_restart_on_blob_change_loads_one_consistent_version(
    published, azurite, container, via_proxy
):
    victim = "m/model-00003-of-00003.safetensors"
    new_tensors = {"s2.w0": torch.full((128, 256), 7.0), "s2.w1": torch.full((128, 256), 8.0)}
    from safetensors.torch import save as save_bytes

    replacement = save_bytes(new_tensors)

    def overwrite_once(path, count):
        if count == 4:
            azurite.service().get_container_client(container).upload_blob(
                victim, replacement, overwrite=True
            )

    via_proxy.faults.on_range_get = overwrite_once
    got = blob2gpu.load(
        f"az://{container}/m",
        on_blob_change="restart",
        prefetch_concurrency=1,
        chunk_bytes=65536,
        **FAST_RETRIES,
    )
    assert torch.equal(got["s2.w0"], new_tensors["s2.w0"])
    assert torch.equal(got["s2.w1"], new_tensors["s2.w1"])
    assert as_bytes(got["s0.w0"]) == expected(published)["s0.w0"]


def test_restart_keeps_the_complete_shards_of_unchanged_blobs(
    device, published, azurite, container, via_proxy
):
    # One connection: the three headers are read first, then the shards' data in order; the
    # third blob is overwritten when the first shard's data starts. The restart lists again and
    # fetches only the changed blob: the first two, complete and unchanged, are kept (their GETs
    # are not repeated).
    victim = "m/model-00003-of-00003.safetensors"
    from safetensors.torch import save as save_bytes

    new_tensors = {"s2.w0": torch.full((128, 256), 7.0), "s2.w1": torch.full((128, 256), 8.0)}
    seen: list[str] = []

    def overwrite_once(path, count):
        seen.append(path)
        if path.endswith("model-00001-of-00003.safetensors") and seen.count(path) == 2:
            azurite.service().get_container_client(container).upload_blob(
                victim, save_bytes(new_tensors), overwrite=True
            )

    via_proxy.faults.on_range_get = overwrite_once
    framework = "torch" if device == "cpu" else "dlpack"
    with blob2gpu.Loader(
        on_blob_change="restart", prefetch_concurrency=1, chunk_bytes=65536
    ) as loader:
        got = loader.load(f"az://{container}/m", device=device, framework=framework)
    reference = expected(published)
    for name in ("s0.w0", "s0.w1", "s1.w0", "s1.w1"):
        assert as_bytes(got[name]) == reference[name]
    for name, tensor in new_tensors.items():
        assert as_bytes(got[name]) == as_bytes(tensor)
    gets = [p.rsplit("/", 1)[-1] for p in via_proxy.counters.paths if p.endswith(".safetensors")]
    first_two = [g for g in gets if g != "model-00003-of-00003.safetensors"]
    sizes = {f.name: f.stat().st_size for f in published.glob("*.safetensors")}
    assert len(first_two) == sum(-(-sizes[n] // 65536) for n in set(first_two))  # fetched once


def test_every_header_is_read_before_any_data(published, container, via_proxy):
    # One connection: the shards' first ranges come first, so no shard's header round trip is
    # left for the end of the load while the other connections sit idle.
    load(f"az://{container}/m", "cpu", prefetch_concurrency=1)
    shards = sorted(p.name for p in published.glob("*.safetensors"))
    gets = [p.rsplit("/", 1)[-1] for p in via_proxy.counters.paths if p.endswith(".safetensors")]
    assert gets[: len(shards)] == shards
    assert len(gets) > len(shards)


def test_gets_add_up_to_one_copy_of_the_checkpoint(published, container, via_proxy):
    load(f"az://{container}/m", "cpu")
    shards = sorted(published.glob("*.safetensors"))
    index = (published / "model.safetensors.index.json").stat().st_size
    assert via_proxy.counters.range_bytes == sum(f.stat().st_size for f in shards) + index
    weight_gets = [p for p in via_proxy.counters.paths if p.endswith(".safetensors")]
    assert len(weight_gets) == sum(-(-f.stat().st_size // 65536) for f in shards)


FLEET_LOADER = """
import json, sys, zlib
import blob2gpu
settings = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
with blob2gpu.open(sys.argv[1], framework="dlpack", chunk_bytes=32768,
                   retry_max_attempts=10, **settings) as checkpoint:
    tensors = checkpoint.to_dict()
    report = checkpoint.report
print(json.dumps({"crc": {n: zlib.crc32(tensors[n].to_bytes()) for n in sorted(tensors)},
                  "retries": report.retries, "requests": report.requests,
                  "throttled": report.throttled, "range": report.range_bytes_settled,
                  "node_decreases": report.throttle_node_decreases,
                  "pace": report.pace_bytes_per_second}))
"""


def test_request_rate_cap_is_survived_by_backoff(published, container, via_proxy, tmp_path):
    # Three loaders (8 concurrent ranges each) start at once against a storage account capped
    # at 20 requests/s, ~90 requests in all: the cap answers 503 ServerBusy, and jittered
    # backoff spreads the retries until every load completes with the right bytes. At this
    # overload a range can be refused 6 times in a row (the default retry_max_attempts), so the
    # loaders allow 10; bench/bench_fleet.py shows the same at fleet scale.
    import json
    import os
    import subprocess
    import sys
    import zlib

    via_proxy.faults.max_requests_per_second = 20
    script = tmp_path / "loader.py"
    script.write_text(FLEET_LOADER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOB2GPU_")}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"az://{container}/m"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-1500:] for _, err in outs)
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    want = {n: zlib.crc32(b) for n, b in expected(published).items()}
    assert all(r["crc"] == want for r in results)
    assert via_proxy.counters.throttled > 0
    # Every refused request was retried, and counted, by the loader that sent it.
    assert sum(r["retries"] for r in results) == via_proxy.counters.throttled
    # Throttled, a load grows its 32 KiB ranges (the ranges still queued are joined): its
    # answered GETs are never more than 3 shards x 9.
    for r in results:
        assert 3 <= r["requests"] - r["throttled"] <= 3 * 9
        if r["throttled"]:
            assert r["range"] > 32768


@pytest.mark.parametrize(
    ("node_cache", "one_node"),
    [(False, False), (False, True), (True, True)],
    ids=["apart", "one-node", "one-node-cache"],
)
def test_egress_cap_is_shared_by_loaders_that_back_off(
    published, azurite, container, via_proxy, tmp_path, node_cache, one_node
):
    # Two loaders (8 concurrent 32 KiB ranges each) against an account whose egress is capped
    # at 512 KiB/s with a 64 KiB burst, about 1.5 MiB to serve: beyond the cap the account
    # answers 503 ServerBusy "Egress is over the account limit." with a Retry-After and serves
    # nothing. Both loads succeed with the right bytes, and after the first 503s the loaders
    # offer fewer requests: they wait out the Retry-After and go back to one request in flight
    # (ranges are not grown: the egress is bytes, not requests). Sharing a cache directory (one
    # node; two checkpoints, or the second would wait for the first's cache entries; with the
    # cache on or off), they share one budget: a decrease one of them makes, the other makes
    # too; apart (a cache directory each: two nodes), neither sees the other's.
    import json
    import os
    import subprocess
    import sys
    import zlib

    upload_directory(azurite, container, published, "m2")
    via_proxy.faults.egress_bytes_per_second = 512 * 1024
    via_proxy.faults.egress_burst_bytes = 64 * 1024
    script = tmp_path / "loader.py"
    script.write_text(FLEET_LOADER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOB2GPU_")}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                f"az://{container}/{prefix}",
                json.dumps(
                    {
                        "local_nvme_cache_enabled": node_cache,
                        "cache_dir": str(tmp_path / ("node" if one_node else f"node-{prefix}")),
                    }
                ),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for prefix in ("m", "m2")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-1500:] for _, err in outs)
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    want = {n: zlib.crc32(b) for n, b in expected(published).items()}
    assert all(r["crc"] == want for r in results)
    counters = via_proxy.counters
    assert counters.egress_throttled > 0 and counters.throttled == counters.egress_throttled
    assert sum(r["throttled"] for r in results) > 0
    assert all(r["range"] == 32768 for r in results)  # egress-throttled: ranges not grown
    # A load throttled after answers came is paced in bytes per second from then on.
    assert any(r["pace"] is not None and r["pace"] > 0 for r in results)
    if one_node:
        assert sum(r["node_decreases"] for r in results) >= 1
    else:
        assert all(r["node_decreases"] == 0 for r in results)
    ranged = sorted(r for r in counters.ranged if r[1].endswith(".safetensors"))
    first_busy = next(t for t, _, _, status in ranged if status == 503)
    # Honouring the Retry-After (1 s or more) the first 503s carried, in the second after them
    # the loaders offer at most what they had in flight (2 x 8) and what the cap serves meanwhile
    # (512 KiB at 32 KiB or more a range); backoff alone (0.25 s, doubling) would have sent
    # each of the 16 ranges about three times.
    offered = sum(1 for t, _, _, _ in ranged if first_busy < t < first_busy + 0.9)
    assert offered <= 2 * 8 + 16
    assert max(asked for _, _, asked, _ in ranged) == 32768
