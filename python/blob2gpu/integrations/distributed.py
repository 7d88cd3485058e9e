"""torch.distributed fan-out: the ranks of a process group split a checkpoint's bytes, each
fetches only its part from storage, and broadcasts it to the others, so the storage account
serves one copy per group instead of one per rank.

Every rank then runs the same shards through its own pipeline (header checks, manifest checks,
staging, device copies), so each rank ends with the whole state dict on its own device. Host
memory holds one shard at a time. Works for any world size, for fewer shards than ranks, and for
uneven sizes: the split is by bytes, not by shard.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from blob2gpu.errors import InvalidArgument

ALIGN = 1 << 20  # rank boundaries fall on MiB boundaries: large, aligned requests


def byte_owners(sizes: list[int], world: int) -> list[list[tuple[int, int, int]]]:
    """For each shard, the (rank, start, end) byte ranges each rank fetches (shard coordinates).

    The checkpoint's bytes, shards end to end, are cut into `world` nearly equal MiB-aligned
    parts; rank r fetches part r.
    """
    total = sum(sizes)
    per_rank = -(-total // world)
    per_rank = -(-per_rank // ALIGN) * ALIGN
    owners: list[list[tuple[int, int, int]]] = []
    base = 0
    for size in sizes:
        ranges = []
        pos = 0
        while pos < size:
            rank = min((base + pos) // per_rank, world - 1)
            end = min(size, (rank + 1) * per_rank - base)
            ranges.append((rank, pos, end))
            pos = end
        owners.append(ranges)
        base += size
    return owners


class _Into:
    """A write-only stream over a memoryview (for the SDK's readinto)."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def write(self, data: bytes) -> int:
        n = len(data)
        self._view[self._pos:self._pos + n] = data
        self._pos += n
        return n

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # the SDK's parallel download seeks to each chunk's place

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def load(uri: str | None, device: str, framework: str, credential: Any,
         loader_settings: dict[str, Any], tensor_names: Any = None,
         tensor_filter: Any = None) -> dict[str, Any]:
    """blob2gpu.load(..., distributed=True): see the module docstring. Needs an initialized
    torch.distributed process group (gloo for cpu tensors; the exchange runs on host memory).

    With a tensor selection (tensor_names / tensor_filter, which may differ per rank) each rank
    keeps only its tensors; the group fetches the union of what its ranks need (whole shards
    holding a wanted tensor, one copy per group) and exchanges it as above.

    Returns {name: tensor} on every rank. Raises InvalidArgument without a process group, and
    every error of blob2gpu.load (the same on every rank for source and header errors).
    """
    import torch
    import torch.distributed as dist

    from blob2gpu.integrity.manifest import core_checksums, read_local_manifest
    from blob2gpu.loading.checkpoint import Checkpoint
    from blob2gpu.loading.frameworks import converter
    from blob2gpu.loading.loader import (
        Loader,
        chunk_algorithm,
        content_md5_to_check,
        normalize_device,
        source_uri,
        verification_of,
    )
    from blob2gpu.loading.selection import header_reader, select, selection_from_arguments
    from blob2gpu.loading.shard_sources import shard_sources
    from blob2gpu.operations.report import LoadReport
    from blob2gpu.sources import resolve as resolve_local
    from blob2gpu.sources.azure.service import is_blob_uri

    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidArgument("distributed=True needs torch.distributed.init_process_group() "
                              "first (gloo on CPUs, or a group whose backend handles CPU tensors)")
    rank, world = dist.get_rank(), dist.get_world_size()
    wanted_names, wanted_filter = selection_from_arguments(tensor_names, tensor_filter)
    uri = source_uri(uri)
    device = normalize_device(device)
    import time

    with Loader(**loader_settings) as loader:
        effective = loader.settings
        convert = converter(framework, device, effective.unsupported_dtype)
        started_at, clock_start = time.time(), time.perf_counter()
        loader._start_pipeline(device)  # CUDA's start-up beside the listing and the all-gather
        container = listing = None
        if is_blob_uri(uri):
            from blob2gpu.sources.azure.container import open_container

            container = open_container(uri, effective, credential, loader._http_sessions())
            listing = container.list_checkpoint()
            plan = listing.plan
            manifest = container.read_manifest(listing) if effective.verify != "none" else None
        else:
            plan = resolve_local(uri)
            manifest = (read_local_manifest(os.path.dirname(plan.shards[0].path))
                        if effective.verify != "none" else None)
        algorithm = chunk_algorithm(effective.verify)
        full_plan = plan
        plan, selection = select(plan, wanted_names, wanted_filter, header_reader(container))
        # The group fetches every shard some rank needs, in the full plan's order.
        needs = [False] * len(full_plan.shards)
        kept = {s.name for s in plan.shards}
        for i, s in enumerate(full_plan.shards):
            needs[i] = s.name in kept
        group_needs = [None] * world
        dist.all_gather_object(group_needs, needs)
        fetched = [s for i, s in enumerate(full_plan.shards) if any(n[i] for n in group_needs)]
        plan = dataclasses.replace(full_plan, shards=tuple(fetched))
        wanted = None if selection.everything else sorted(selection.names)
        content_md5 = content_md5_to_check(container, manifest, effective.verify, wanted, plan)
        sizes = [s.size for s in plan.shards]
        owners = byte_owners(sizes, world)
        pipeline = loader._pipeline(device)
        report = LoadReport(uri=plan.uri, device=device, framework=framework,
                            started_at=started_at, settings=dict(effective.values),
                            source="azure-blob" if container else "local",
                            verification=verification_of(manifest, algorithm, container,
                                                         content_md5),
                            tensor_selection=None if wanted is None else len(wanted),
                            _clock_start=clock_start)
        report.phases["artifact_fetch_start"] = 0.0
        report._session_offset = time.perf_counter() - clock_start
        checksums = core_checksums(manifest, plan.shards, algorithm)
        session = pipeline.start_fed(shard_sources(plan.shards, checksums, content_md5=content_md5),
                                     fail_on_checksum_mismatch=effective.fail_if_checksum_mismatch,
                                     wanted=wanted)
        checkpoint = Checkpoint(session, plan, convert, report, settings=effective,
                                pipeline=pipeline, selection=selection)
        try:
            for index, ref in enumerate(plan.shards):
                buffer = torch.empty(ref.size, dtype=torch.uint8)
                view = memoryview(buffer.numpy())
                for owner, start, end in owners[index]:
                    if owner == rank:
                        _fetch(container, plan, ref, start, end, view[start:end])
                for owner, start, end in owners[index]:
                    dist.broadcast(buffer[start:end], src=owner)
                _feed(session, index, view, effective.staging_slot_bytes)
            return checkpoint.to_dict()
        finally:
            checkpoint.close()


def _fetch(container: Any, plan: Any, ref: Any, start: int, end: int, view: memoryview) -> None:
    if container is None:
        with open(ref.path, "rb", buffering=0) as f:
            f.seek(start)
            done = 0
            while done < end - start:
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"shard '{ref.name}' ended at {start + done}")
                done += n
        return
    from azure.core import MatchConditions

    blob = container.client.get_blob_client(ref.path)

    def get() -> None:
        downloader = blob.download_blob(offset=start, length=end - start, etag=ref.etag,
                                        match_condition=MatchConditions.IfNotModified,
                                        max_concurrency=4)
        downloader.readinto(_Into(view))

    container.retry.run(get, f"shard '{ref.name}' bytes {start}-{end - 1}", ref.path)


def _feed(session: Any, index: int, view: memoryview, slot_bytes: int) -> None:
    """Push one shard's bytes, held in host memory, through the pipeline (as a feeder would)."""
    size = len(view)
    first = min(slot_bytes, size)
    landing = session.acquire(index, 0, first)
    landing.view[:] = view[:first]
    status = session.commit(landing)
    pos = first
    if not status.header_ready:
        have, header_end = status.header_have, status.data_offset
        landing = session.acquire(index, have, header_end - have)
        landing.view[:] = view[have:header_end]
        status = session.commit(landing)
        pos = header_end
    start = max(pos, status.data_offset)
    for begin, end in session.needed_ranges(index):  # this rank's tensors' bytes only
        pos = max(begin, start)
        while pos < end:
            n = min(slot_bytes, end - pos)
            landing = session.acquire(index, pos, n)
            landing.view[:] = view[pos:pos + n]
            session.commit(landing)
            pos += n
