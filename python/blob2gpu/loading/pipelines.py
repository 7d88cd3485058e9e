"""DevicePipelines: the core pipelines (CUDA context, pinned staging ring, streams; io threads on
cpu) a Loader keeps per device between loads. The first one for a device is made on a thread
while the checkpoint is listed, so CUDA's start-up overlaps the storage round trips.

The pipeline's shape (io threads, slots, slot size) left at 0 is sized from the host here
(pipeline_settings), once for the pipeline and the load alike (sized_settings)."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TypedDict

from blob2gpu import _core
from blob2gpu.errors import InvalidArgument
from blob2gpu.loading.host_memory import affinity_cpus, cgroup_cpu_quota, host_memory
from blob2gpu.settings import ResolvedSettings

MiB = 1 << 20
GiB = 1 << 30
# What a sized pipeline never goes beyond, or below.
MIN_IO_THREADS, MAX_IO_THREADS = 4, 16
SLOT_BYTES = 32 * MiB  # a slot's copy at 32 MiB is within 2% of a link's peak (per-copy cost)
MIN_SLOT_BYTES = 8 * MiB
MAX_SIZED_SLOTS = 64
MIN_PINNED, MAX_PINNED = 64 * MiB, GiB
# The cpu target's ring only holds each fed shard's first range; its reads go to the arena.
CPU_IO_THREADS, CPU_SLOTS = 4, 8


@dataclass(frozen=True)
class HostFacts:
    """What sizing reads of the host: the CPUs this process may run on and physical memory."""

    cpus: int
    memory_bytes: int

    @classmethod
    def probe(cls, environ: Mapping[str, str] | None = None) -> HostFacts:
        """This process's share of the host, now: the CPUs it may run on (its affinity, within
        its control group's CPU quota) and physical memory (within the group's memory limit),
        each divided among the node's local ranks ($LOCAL_WORLD_SIZE, as torchrun sets it: eight
        tensor-parallel ranks each sized for the whole host would pin eight rings' worth and run
        eight times the threads). Never raises (unknown memory counts as 0: the smallest ring)."""
        env = os.environ if environ is None else environ
        cpus = affinity_cpus()
        quota = cgroup_cpu_quota()
        if quota is not None:
            cpus = min(cpus, quota)
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            memory = 0
        limit = host_memory().limit
        if limit:
            memory = min(memory, limit)
        ranks = local_ranks(env)
        return cls(cpus=max(1, cpus // ranks), memory_bytes=max(0, memory // ranks))


@functools.cache
def this_host() -> HostFacts:
    """HostFacts.probe() of this process, once: every load sizes its request's pipeline, and
    a process's CPUs and cgroup limits rarely change while it runs."""
    return HostFacts.probe()


def local_ranks(environ: Mapping[str, str]) -> int:
    """The processes on this node that size pipelines alike: $LOCAL_WORLD_SIZE, else 1."""
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


class PipelineArgs(TypedDict):
    """The core LoadPipeline's keyword arguments besides the device."""

    staging_slots: int
    staging_slot_bytes: int
    copy_streams: int
    io_threads: int
    use_pinned_host_fallback: bool
    bind_numa_node: bool


def pipeline_settings(
    settings: ResolvedSettings, device: str, host: HostFacts | None = None
) -> PipelineArgs:
    """The core LoadPipeline's keyword arguments for `device` ('cpu' or 'cuda:N'): the pipeline
    settings, with io_threads, staging_slots and staging_slot_bytes left at 0 sized from `host`
    (this host by default). On a GPU: io_threads the CPUs (4..16); staging_slots
    io_threads + 2 x copy_streams + 2, so every reading thread has a slot while each stream has
    two copies queued; staging_slot_bytes 32 MiB, smaller (not under 8 MiB) when
    pinned_staging_bytes cannot hold those slots; the slots then trimmed to that budget (at least
    2). On cpu: today's 4 threads and 8 x 32 MiB. Never raises (the settings were checked when
    they were resolved)."""
    threads, slots, slot_bytes = (
        settings.io_threads,
        settings.staging_slots,
        settings.staging_slot_bytes,
    )
    if device == "cpu":
        threads, slots, slot_bytes = (
            threads or CPU_IO_THREADS,
            slots or CPU_SLOTS,
            slot_bytes or SLOT_BYTES,
        )
    else:
        facts = host or this_host()
        threads = threads or min(MAX_IO_THREADS, max(MIN_IO_THREADS, facts.cpus))
        budget = pinned_budget(settings, facts)
        wanted = slots or min(MAX_SIZED_SLOTS, threads + 2 * settings.copy_streams + 2)
        if not slot_bytes:
            slot_bytes = max(MIN_SLOT_BYTES, min(SLOT_BYTES, budget // wanted // MiB * MiB))
        if not slots:
            slots = max(2, min(wanted, budget // slot_bytes))
    return PipelineArgs(
        staging_slots=slots,
        staging_slot_bytes=slot_bytes,
        copy_streams=settings.copy_streams,
        io_threads=threads,
        use_pinned_host_fallback=settings.use_pinned_host_fallback,
        bind_numa_node=settings.bind_numa_node,
    )


def pinned_budget(settings: ResolvedSettings, host: HostFacts) -> int:
    """The host memory a GPU pipeline's ring may pin: pinned_staging_bytes, or when 0 1/32 of
    `host`'s memory, at least 64 MiB and at most 1 GiB."""
    return settings.pinned_staging_bytes or min(
        MAX_PINNED, max(MIN_PINNED, host.memory_bytes // 32)
    )


def sized_settings(settings: ResolvedSettings, device: str) -> ResolvedSettings:
    """`settings` with the pipeline's shape as pipeline_settings sizes it for `device` (what the
    load's pipeline is made with, for whatever the load reads of it: range sizes, memory
    checks); the sized ones' source says so."""
    sized = pipeline_settings(settings, device)
    shape = {name: sized[name] for name in ("io_threads", "staging_slots", "staging_slot_bytes")}
    changed = [name for name, value in shape.items() if getattr(settings, name) != value]
    if not changed:
        return settings
    sources = {**settings.sources, **dict.fromkeys(changed, f"sized from the host for {device}")}
    return replace(
        settings,
        io_threads=shape["io_threads"],
        staging_slots=shape["staging_slots"],
        staging_slot_bytes=shape["staging_slot_bytes"],
        sources=sources,
    )


class DevicePipelines:
    """One pipeline per device, made with `settings` (its pipeline settings, sized for each
    device by pipeline_settings), kept until close()."""

    def __init__(self, settings: ResolvedSettings) -> None:
        self._settings = settings
        self._pipelines: dict[str, _core.LoadPipeline] = {}
        self._being_made: dict[str, _core.PipelineBeingMade] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self, device: str) -> None:
        """Begin making the device's pipeline (on a thread of the core's: pinning its staging takes
        a while), unless it exists or is being made."""
        with self._lock:
            if self._closed or device in self._pipelines or device in self._being_made:
                return
            sized = pipeline_settings(self._settings, device)
            self._being_made[device] = _core.PipelineBeingMade(device, **sized)

    def get(self, device: str) -> _core.LoadPipeline:
        """The device's pipeline, waiting for it to be made; raises what making it raised, and
        InvalidArgument once closed."""
        self.start(device)
        with self._lock:
            if self._closed:
                raise InvalidArgument("this Loader is closed")
            if device in self._pipelines:
                return self._pipelines[device]
            maker = self._being_made[device]
        try:
            pipeline = maker.result()
        finally:  # made or failed: the next load asks again
            with self._lock:
                if self._being_made.get(device) is maker:
                    del self._being_made[device]
        with self._lock:
            kept = None if self._closed else self._pipelines.setdefault(device, pipeline)
        if kept is not pipeline:  # closed meanwhile, or another load's was kept first
            pipeline.close()
        if kept is None:
            raise InvalidArgument("this Loader is closed")
        return kept

    def close(self) -> None:
        """Close every pipeline, those still being made included (their errors are dropped:
        they belong to no load)."""
        with self._lock:
            self._closed = True
            pipelines, self._pipelines = self._pipelines, {}
            makers, self._being_made = self._being_made, {}
        for device, maker in makers.items():
            try:
                pipelines[device] = maker.result()
            except Exception:
                pass
        for pipeline in pipelines.values():
            pipeline.close()
