"""LoadReport: what one load did, in the case study's phases, per shard and in aggregate.

Phases are seconds since artifact fetch start (the load's start):
  artifact_fetch_start     0.0
  artifact_fetch_complete  every byte of every shard read from its source
  host_staging_complete    every byte through host staging (enqueued to the device, or in the arena)
  model_load_complete      every tensor in target memory and handed to the framework
  first_token              when the caller calls mark_first_token()
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from blob2gpu import phrasing

if TYPE_CHECKING:
    from blob2gpu._core import SessionStats
    from blob2gpu.sources.feeding import FeedStats

PHASES = (
    "artifact_fetch_start",
    "artifact_fetch_complete",
    "host_staging_complete",
    "model_load_complete",
    "first_token",
)


@dataclass
class ShardReport:
    """One shard: its size, header, tensors and timings (seconds since the load started)."""

    name: str
    bytes: int
    header_bytes: int
    tensors: int
    realigned_tensors: int
    started: float | None
    header_parsed: float | None
    published: float | None
    retries: int = 0  # ranges of this shard fetched again after a transient failure
    cache_hit: bool = False  # read from the NVMe cache instead of Blob Storage
    checksum: str = "unchecked"  # ok / mismatch (every chunk against the manifest) / unchecked
    needed_bytes: int | None = None  # data bytes read: all, or a tensor selection's (+ chunks)

    @property
    def fetch_latency(self) -> float | None:
        """Seconds from the shard's first read to its tensors being handed out."""
        if self.started is None or self.published is None:
            return None
        return self.published - self.started


@dataclass
class LoadReport:
    """The record of one load: ``to_json()`` for machines, ``summary()`` for people."""

    uri: str
    device: str
    framework: str
    started_at: float  # unix time of artifact fetch start
    bytes: int = 0  # bytes read from the source (headers included)
    tensors: int = 0
    seconds: float = 0.0  # artifact fetch start to model load complete
    phases: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(PHASES))
    shards: list[ShardReport] = field(default_factory=list)
    staging_slots: int = 0
    staging_slot_bytes: int = 0
    copy_streams: int = 0
    io_threads: int = 0
    numa_node: int = -1  # the GPU's host NUMA node the ring and io threads were placed on
    pinned: bool = False
    pinned_fallback: bool = False
    peak_slots_in_flight: int = 0
    slot_waits: int = 0
    mmap: bool = False
    strategy: str = "direct-gpu"  # host-staging (model.direct_gpu_load=false), cpu (a cpu target)
    verification: str = "none"  # crc32c (every chunk against the manifest), size+etag, none
    verified_bytes: int = 0
    peak_md5_shards: int = 0  # most shards whose Content-MD5 was being computed at one time
    direct_io_bytes: int = 0  # bytes read with O_DIRECT (NVMe cache hits into the staging ring)
    # CPU seconds spent making new host memory resident before bytes were written into it (cpu
    # target, host staging): the kernel zeroing fresh pages, costly in VMs that hand freed memory
    # back to their host.
    host_populate_seconds: float = 0.0
    # A fan-out's exchange (integrations/distributed.py): the data bytes this rank fetched and
    # landed itself (host-to-device on a GPU: its part only), and those its group's other ranks
    # wrote into its memory (device to device on a GPU). `bytes` is what this rank read.
    group_landed_bytes: int = 0
    group_received_bytes: int = 0
    tensor_selection: int | None = None  # tensors asked for (tensor_names/tensor_filter); None: all
    reused_shards: list[str] = field(default_factory=list)  # kept from before a BlobChanged restart
    checksum_failures: list[str] = field(default_factory=list)  # let through (fail_if_... off)
    cache_written: list[str] = field(default_factory=list)  # shards this load put in the cache
    cache_skipped: dict[str, str] = field(default_factory=dict)  # shard -> why not during the load
    # Shards the cache was not used for (neither read nor written) and why: nothing from Blob to
    # check a cached copy by in a directory other users can write, mismatches let through.
    cache_bypassed: dict[str, str] = field(default_factory=dict)
    # Shards whose cache entry failed its check (damaged, malformed, unreadable): fetched again
    # from Blob within the load, and what was wrong.
    cache_repaired: dict[str, str] = field(default_factory=dict)
    # Shards the background fill fetches after the load (those the cache still lacked), and, as
    # the fill goes on, those it published and those it did not (shard -> why).
    cache_fill_pending: list[str] = field(default_factory=list)
    cache_filled: list[str] = field(default_factory=list)
    cache_fill_skipped: dict[str, str] = field(default_factory=dict)
    source: str = "local"  # local or azure-blob
    credential: str | None = None  # how the Blob credential was chosen (never its value)
    requests: int = 0  # ranged GETs sent (retries included)
    retries: int = 0  # transient failures retried (ranges and listing calls)
    retry_wait_seconds: float = 0.0  # backoff slept before those retries, summed over threads
    # The account throttling (429, 503 ServerBusy) and how the load adapted (sources/azure/
    # throttle.py): throttled answers to ranged GETs, times it lowered its concurrency (and grew
    # its ranges, on request-rate throttling), the lowest concurrency it went to, and the
    # concurrency and range size it settled at (None: not a Blob load fetched by this process's
    # feeder).
    throttled: int = 0
    throttle_decreases: int = 0
    throttle_node_decreases: int = 0  # of those, because another load on the node was throttled
    concurrency_lowest: int | None = None
    concurrency_settled: int | None = None
    range_bytes_settled: int | None = None
    # Once throttled, the pace it kept to at the end (bytes/s for egress throttling, requests/s
    # for request-rate throttling; None: never paced for that).
    pace_bytes_per_second: float | None = None
    pace_requests_per_second: float | None = None
    gpu_memory_total: int | None = None
    gpu_memory_free_before: int | None = None
    gpu_memory_free_min: int | None = None  # the watermark: least free memory seen during the load
    gpu_memory_free_after: int | None = None
    # A streamed GPU load's device memory (streamed_device_bytes): its bound (None: not bounded,
    # as load()), the most it had allocated at once, the bound raised to a larger tensor (or a
    # Content-MD5 shard, handed out only whole; 0: never), allocations it had to make mid-load
    # (device-wide synchronizations on a GPU), and bytes a consumer held from stream() that the
    # bound stopped counting rather than wait for them.
    streamed_device_bytes: int | None = None
    streamed_peak_device_bytes: int | None = None
    streamed_cap_raised_to: int = 0
    streamed_mid_load_allocations: int = 0
    streamed_kept_bytes: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    _clock_start: float = field(default=0.0, repr=False)
    # Seconds from artifact fetch start (before listing) to the core session's start: the core's
    # timestamps are relative to the latter.
    _session_offset: float = field(default=0.0, repr=False)
    # What earlier core sessions of this load did (a repaired cache entry starts a new session
    # for the shards not yet handed out): their complete shards and counters.
    _earlier: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def throughput_gbps(self) -> float:
        """Bytes read per second over the whole load, in GB/s (10^9)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def cache_hit_rate(self) -> float | None:
        """Share of shards read from the NVMe cache (None when the cache is off)."""
        if not self.settings.get("local_nvme_cache_enabled") or not self.shards:
            return None
        return sum(s.cache_hit for s in self.shards) / len(self.shards)

    @property
    def gpu_memory_peak_used(self) -> int | None:
        """Most GPU memory in use during the load (total minus the watermark), if measured."""
        if self.gpu_memory_total is None or self.gpu_memory_free_min is None:
            return None
        return self.gpu_memory_total - self.gpu_memory_free_min

    def mark_first_token(self) -> float:
        """Record that the model produced its first token now; returns seconds since fetch start.

        Also feeds the process-wide first-token p50/p95 (first_token_percentiles()) and logs it,
        unless observability.emit_first_token_latency is off.
        """
        first_token = self.phases["first_token"] = self.elapsed()
        if self.settings.get("emit_first_token_latency", True):
            from blob2gpu.operations import (
                metrics,  # lazy: no import cycle should metrics ever need report
            )

            _FIRST_TOKENS.record(first_token)
            metrics.observe_first_token(first_token)
            logging.getLogger("blob2gpu").info(
                "blob2gpu first token %.3f s after artifact fetch start (%s)",
                first_token,
                self.uri,
            )
        return first_token

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_clock_start")
        d.pop("_session_offset")
        d.pop("_earlier")
        d["gpu_memory_peak_used"] = self.gpu_memory_peak_used
        d["cache_hit_rate"] = self.cache_hit_rate
        d["shards"] = [dict(asdict(s), fetch_latency=s.fetch_latency) for s in self.shards]
        d["throughput_gbps"] = self.throughput_gbps
        d["shard_count"] = len(self.shards)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadReport:
        """A LoadReport from to_dict()'s output (e.g. a report JSON file written by the CLI)."""
        fields = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        kwargs = {k: v for k, v in d.items() if k in fields and k != "shards"}
        report = cls(**kwargs)
        shard_fields = set(ShardReport.__dataclass_fields__)
        report.shards = [
            ShardReport(**{k: v for k, v in s.items() if k in shard_fields})
            for s in d.get("shards", [])
        ]
        return report

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """One line: bytes, seconds, GB/s, tensors, shards, device."""
        return (
            f"{self.bytes / 1e9:.3f} GB in {self.seconds:.3f} s = {self.throughput_gbps:.2f} GB/s"
            f", {phrasing.count(self.tensors, 'tensor')} from "
            f"{phrasing.count(len(self.shards), 'shard')} to {self.device}"
        )

    def phase_table(self) -> str:
        """The phases as a small text table (seconds since artifact fetch start)."""
        rows = [f"{'phase':<26}{'t (s)':>10}"]
        for name in PHASES:
            t = self.phases.get(name)
            rows.append(f"{name:<26}{'-' if t is None else f'{t:.3f}':>10}")
        return "\n".join(rows)

    # -- filled by the load -----------------------------------------------------------------------
    def start_clock(self, perf_counter_start: float) -> None:
        """The artifact fetch started at `perf_counter_start` (a time.perf_counter() reading)."""
        self._clock_start = perf_counter_start
        self.phases["artifact_fetch_start"] = 0.0

    def elapsed(self) -> float:
        """Seconds since the artifact fetch start."""
        return time.perf_counter() - self._clock_start

    def mark_session_start(self) -> None:
        """The core session starts now: the core's timestamps count from here."""
        self._session_offset = self.elapsed()

    def session_seconds(self, ns: int) -> float:
        """A core timestamp (ns from the session start) in seconds from the artifact fetch start."""
        return self._session_offset + ns / 1e9

    def absorb_core_stats(self, stats: SessionStats, order: list[str] | None = None) -> None:
        """Take the core session's final statistics (bytes, staging, per-shard timings), added to
        those of the load's earlier sessions (carry_session); `order`: the shards' names in the
        order the report lists them (default: the sessions')."""
        earlier = self._earlier
        for key in (
            "staging_slots",
            "staging_slot_bytes",
            "copy_streams",
            "io_threads",
            "numa_node",
            "pinned",
            "pinned_fallback",
            "mmap",
        ):
            setattr(self, key, getattr(stats, key))
        for key in _ADDED:
            setattr(self, key, earlier.get(key, 0) + getattr(stats, key))
        self.bytes = earlier.get("bytes", 0) + stats.bytes_read
        self.peak_slots_in_flight = max(earlier.get("peak", 0), stats.peak_slots_in_flight)
        self.peak_md5_shards = max(earlier.get("md5_shards", 0), stats.peak_md5_shards)
        self.checksum_failures = earlier.get("failures", []) + list(stats.checksum_failures)
        shards = earlier.get("shards", []) + self._shard_reports(stats)
        if order is not None:
            rank = {name: i for i, name in enumerate(order)}
            shards.sort(key=lambda s: rank.get(s.name, len(rank)))
        self.shards = shards
        if stats.device_cap > 0:
            self.streamed_device_bytes = stats.device_cap
            peak = max(earlier.get("streamed_peak", 0), stats.peak_device_bytes)
            self.streamed_peak_device_bytes = peak
            self.streamed_cap_raised_to = max(
                earlier.get("streamed_raised", 0), stats.cap_raised_to
            )
            self.streamed_mid_load_allocations = (
                earlier.get("streamed_grown", 0) + stats.mid_load_allocations
            )
            self.streamed_kept_bytes = earlier.get("streamed_kept", 0) + stats.kept_beyond_cap

    def loaded(self, stats: SessionStats, order: list[str]) -> None:
        """The load's last core session has landed every byte: its end now, the session's
        `stats` (added to its earlier sessions'), the phases they date, and each shard's
        checksum when every chunk was checked (`order`: the shards as the report lists them)."""
        self.seconds = self.phases["model_load_complete"] = self.elapsed()
        self.absorb_core_stats(stats, order)
        published = self.session_seconds(stats.all_published_ns)
        self.phases["artifact_fetch_complete"] = published
        self.phases["host_staging_complete"] = published
        if self.verification in ("crc32c", "sha256", "content-md5"):
            failures = {s.name: s.checksum_failures for s in stats.shards}
            for shard in self.shards:  # those of a replaced session were complete: checked
                shard.checksum = "mismatch" if failures.get(shard.name) else "ok"
        if self.gpu_memory_total is not None and stats.min_free_device_bytes >= 0:
            self.gpu_memory_free_min = stats.min_free_device_bytes

    def absorb_feed(self, stats: FeedStats) -> None:
        """What the load's feeder counted: requests, retries, how it adapted to throttling."""
        self.requests, self.retries = stats.requests, stats.retries
        self.retry_wait_seconds = stats.retry_wait_seconds
        if (throttle := stats.throttle) is not None:
            self.throttled = throttle.throttled
            self.throttle_decreases = throttle.decreases
            self.throttle_node_decreases = throttle.node_decreases
            self.concurrency_lowest = throttle.min_concurrency
            self.concurrency_settled = throttle.concurrency
            self.range_bytes_settled = throttle.range_bytes
            self.pace_bytes_per_second = throttle.pace_bytes_per_second
            self.pace_requests_per_second = throttle.pace_requests_per_second
        for shard in self.shards:
            shard.retries = stats.shard_retries.get(shard.name, shard.retries)

    def carry_session(self, stats: SessionStats, complete: set[str], hits: set[str]) -> None:
        """Keep what a core session that is being replaced did: its counters, and the reports
        of its `complete` shards (`hits`: those read from the cache)."""
        earlier = self._earlier
        for key in _ADDED:
            earlier[key] = earlier.get(key, 0) + getattr(stats, key)
        earlier["bytes"] = earlier.get("bytes", 0) + stats.bytes_read
        earlier["peak"] = max(earlier.get("peak", 0), stats.peak_slots_in_flight)
        earlier["md5_shards"] = max(earlier.get("md5_shards", 0), stats.peak_md5_shards)
        earlier["failures"] = earlier.get("failures", []) + list(stats.checksum_failures)
        if stats.device_cap > 0:
            earlier["streamed_peak"] = max(earlier.get("streamed_peak", 0), stats.peak_device_bytes)
            earlier["streamed_raised"] = max(earlier.get("streamed_raised", 0), stats.cap_raised_to)
            grown = stats.mid_load_allocations
            earlier["streamed_grown"] = earlier.get("streamed_grown", 0) + grown
            earlier["streamed_kept"] = earlier.get("streamed_kept", 0) + stats.kept_beyond_cap
        kept = [s for s in self._shard_reports(stats) if s.name in complete]
        for shard in kept:
            shard.cache_hit = shard.name in hits
        earlier["shards"] = earlier.get("shards", []) + kept

    def _shard_reports(self, stats: SessionStats) -> list[ShardReport]:
        def secs(ns: int) -> float | None:
            return None if ns < 0 else self.session_seconds(ns)

        return [
            ShardReport(
                name=s.name,
                bytes=s.file_bytes,
                header_bytes=s.header_bytes,
                tensors=s.tensors,
                realigned_tensors=s.realigned_tensors,
                started=secs(s.start_ns),
                header_parsed=secs(s.header_ns),
                published=secs(s.published_ns),
                needed_bytes=s.needed_bytes,
            )
            for s in stats.shards
        ]


# Counters of a core session that add up over the sessions of one load.
_ADDED = (
    "slot_waits",
    "verified_bytes",
    "direct_io_bytes",
    "host_populate_seconds",
    "group_landed_bytes",
    "group_received_bytes",
)


class _FirstTokenLatencies:
    """First-token latencies of every load in this process (for p50/p95)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: list[float] = []

    def record(self, seconds: float) -> None:
        with self._lock:
            self._seconds.append(seconds)

    def percentiles(self) -> dict[str, float | int | None]:
        with self._lock:
            data = sorted(self._seconds)
        if not data:
            return {"count": 0, "p50": None, "p95": None}
        if len(data) == 1:
            return {"count": 1, "p50": data[0], "p95": data[0]}
        cuts = statistics.quantiles(data, n=100, method="inclusive")
        return {"count": len(data), "p50": cuts[49], "p95": cuts[94]}


_FIRST_TOKENS = _FirstTokenLatencies()


def first_token_percentiles() -> dict[str, float | int | None]:
    """{'count', 'p50', 'p95'} of first-token latency (seconds) over this process's loads."""
    return _FIRST_TOKENS.percentiles()
