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
import time
from dataclasses import asdict, dataclass, field
from typing import Any

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
    pinned: bool = False
    pinned_fallback: bool = False
    peak_slots_in_flight: int = 0
    slot_waits: int = 0
    mmap: bool = False
    source: str = "local"  # local or azure-blob
    credential: str | None = None  # how the Blob credential was chosen (never its value)
    requests: int = 0  # ranged GETs sent (retries included)
    retries: int = 0  # transient failures retried (ranges and listing calls)
    gpu_memory_free_before: int | None = None
    gpu_memory_free_after: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    _clock_start: float = field(default=0.0, repr=False)

    @property
    def throughput_gbps(self) -> float:
        """Bytes read per second over the whole load, in GB/s (10^9)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def mark_first_token(self) -> float:
        """Record that the model produced its first token now; returns seconds since fetch start."""
        self.phases["first_token"] = time.perf_counter() - self._clock_start
        return self.phases["first_token"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_clock_start")
        d["shards"] = [dict(asdict(s), fetch_latency=s.fetch_latency) for s in self.shards]
        d["throughput_gbps"] = self.throughput_gbps
        d["shard_count"] = len(self.shards)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """One line: bytes, seconds, GB/s, tensors, shards, device."""
        return (
            f"{self.bytes / 1e9:.3f} GB in {self.seconds:.3f} s = {self.throughput_gbps:.2f} GB/s"
            f", {self.tensors} tensors from {len(self.shards)} shard(s) to {self.device}"
        )

    def phase_table(self) -> str:
        """The phases as a small text table (seconds since artifact fetch start)."""
        rows = [f"{'phase':<26}{'t (s)':>10}"]
        for name in PHASES:
            t = self.phases.get(name)
            rows.append(f"{name:<26}{'-' if t is None else f'{t:.3f}':>10}")
        return "\n".join(rows)

    # -- filled by the Checkpoint -----------------------------------------------------------------
    def _absorb_core_stats(self, stats: dict[str, Any]) -> None:
        self.bytes = int(stats["bytes_read"])
        for key in (
            "staging_slots",
            "staging_slot_bytes",
            "copy_streams",
            "io_threads",
            "pinned",
            "pinned_fallback",
            "peak_slots_in_flight",
            "slot_waits",
            "mmap",
        ):
            setattr(self, key, stats[key])

        def secs(ns: int) -> float | None:
            return None if ns < 0 else ns / 1e9

        self.shards = [
            ShardReport(
                name=s["name"],
                bytes=s["file_bytes"],
                header_bytes=s["header_bytes"],
                tensors=s["tensors"],
                realigned_tensors=s["realigned_tensors"],
                started=secs(s["start_ns"]),
                header_parsed=secs(s["header_ns"]),
                published=secs(s["published_ns"]),
            )
            for s in stats["shards"]
        ]
