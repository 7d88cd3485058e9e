"""What each command of the blob2gpu command line does (cmd_NAME, given its parsed arguments;
returns the exit code)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blob2gpu.errors import Blob2GpuError, LocalWriteError

if TYPE_CHECKING:
    from blob2gpu.settings import ResolvedSettings


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """Turn a failure to write the output file `path` (disk full, no such directory) into a
    LocalWriteError naming it."""
    try:
        yield
    except Blob2GpuError:
        raise
    except OSError as e:
        raise LocalWriteError(f"cannot write '{path}': {e.strerror or e}") from e


def _write_text(path: str, text: str) -> None:
    """Write an output file whole or not at all (a temporary file renamed over it)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with _writing(path):
        try:
            tmp.write_text(text)
            os.replace(tmp, target)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def _check_writable(path: str) -> None:
    """Raise LocalWriteError when the file `path` could not be written (no such directory, not
    a directory, no permission), before anything is spent on what it would hold."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise LocalWriteError(f"cannot write '{path}': '{directory}' is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise LocalWriteError(f"cannot write '{path}': '{directory}' is not writable")


def cmd_load(args: argparse.Namespace) -> int:
    import blob2gpu
    from blob2gpu.operations.progress import LoadProgress, choose_mode

    if args.report:
        _check_writable(args.report)  # before the load, not after it
    settings = dict(args.set or [])
    selection: dict[str, Any] = {}
    if args.match:  # with --tensor: the union; each name must exist, each glob match
        from blob2gpu.loading.selection import TensorMatch

        names = frozenset(args.tensor or ())
        selection["tensor_filter"] = TensorMatch(names, tuple(args.match))
    elif args.tensor:
        selection["tensor_names"] = args.tensor
    with blob2gpu.open(
        args.uri,
        device=args.device,
        framework="dlpack",
        config=args.config,
        **selection,
        **settings,
    ) as checkpoint:
        mode = choose_mode(sys.stderr, quiet=args.quiet)
        report = checkpoint.report
        # One clock for the bar and the summary: the report's, from the load's start (listing
        # and checks included) to its last tensor.
        with LoadProgress(
            checkpoint.progress, sys.stderr, mode, args.progress_interval, elapsed=report.elapsed
        ) as progress:
            checkpoint.to_dict()
            progress.finish(report.bytes, report.seconds)
    fill = checkpoint.cache_fill
    if fill is not None and args.wait_cache_fill:
        _wait_for_fill(fill, "cache fill", args.quiet, args.progress_interval)
    if args.report:
        _write_text(args.report, report.to_json())
    if not args.quiet:
        print(report.summary())
        print(report.phase_table())
        if report.cache_written or report.cache_fill_pending:
            print(_cache_line(report, fill is not None and args.wait_cache_fill))
        if report.cache_skipped:
            name, why = next(iter(report.cache_skipped.items()))
            skipped = len(report.cache_skipped)
            print(f"NVMe cache: not used for {skipped} shard(s) ('{name}': {why})")
        for name, why in report.cache_repaired.items():
            print(f"NVMe cache: the entry of '{name}' failed its check ({why}): fetched again")
        if args.report:
            print(f"report written to {args.report}")
    return 0


def _cache_line(report: Any, waited: bool) -> str:
    """What the load wrote to the node's cache and what it left to the fill."""
    line = f"NVMe cache: {len(report.cache_written)} shard(s) written during the load"
    if not report.cache_fill_pending:
        return line
    line += f", {len(report.cache_fill_pending)} left to the fill"
    if not waited:
        return line + " (not waited for: it stopped when this command exited)"
    line += f": {len(report.cache_filled)} written"
    if report.cache_fill_skipped:
        name, why = next(iter(report.cache_fill_skipped.items()))
        line += f", {len(report.cache_fill_skipped)} not ('{name}': {why})"
    return line


def _wait_for_fill(fill: Any, label: str, quiet: bool, interval: float | None) -> Any:
    """Wait for a cache fill, drawing its progress like a load's; returns its result."""
    from blob2gpu.operations.progress import LoadProgress, choose_mode

    mode = choose_mode(sys.stderr, quiet=quiet)
    with LoadProgress(fill.progress, sys.stderr, mode, interval, label=label):
        result = fill.wait()
    return result


def cmd_fetch_aux(args: argparse.Namespace) -> int:
    from blob2gpu.api import fetch_aux
    from blob2gpu.loading.request import source_uri

    settings = dict(args.set or [])
    paths = fetch_aux(source_uri(args.uri), args.dest, config=args.config, **settings)
    if not args.quiet:
        for path in paths:
            print(path)
    return 0


def cmd_coldstart(args: argparse.Namespace) -> int:
    from blob2gpu.integrations.coldstart import cold_start, describe

    print(describe(cold_start(args.uri, device=args.device, prompt=args.prompt)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from blob2gpu.tools.demo import main

    return main(device=args.device, total_mb=args.size_mb, source=args.source, model=args.model)


def cmd_emulator(args: argparse.Namespace) -> int:
    from blob2gpu.tools.emulator import serve

    return serve(port=args.port, location=args.location)


def cmd_preflight(args: argparse.Namespace) -> int:
    from blob2gpu.operations.preflight import run_preflight

    result = run_preflight(
        source=args.source,
        model_bytes=args.model_bytes,
        device=args.device,
        cache_dir=args.cache_dir,
        config=args.config,
    )
    print(result.to_json() if args.json else result.table())
    return result.exit_code


def cmd_config_show(args: argparse.Namespace) -> int:
    from blob2gpu.settings import CONFIG_ENV, SCHEMA, resolve

    resolved = resolve(dict(args.set or []), config_path=args.config)
    config = args.config or os.environ.get(CONFIG_ENV)
    device, at_load = _at_load(resolved, args.device)
    if args.json:
        doc = {
            s.key: {
                "name": s.name,
                "value": resolved.values[s.name],
                "source": resolved.sources[s.name],
                "default": s.default,
                "env": s.env,
            }
            | (
                {
                    "at_load": {
                        "value": at_load[s.name][0],
                        "how": at_load[s.name][1],
                        "device": device,
                    }
                }
                if s.name in at_load
                else {}
            )
            for s in SCHEMA
        }
        print(json.dumps(doc, indent=2))
        return 0
    where = "--config" if args.config else CONFIG_ENV
    print(f"config file: {config} (from {where})" if config else "config file: none")
    print(f"at load: what a load to {device} on this host uses where a setting is left to it")
    key_w = max(len(s.key) for s in SCHEMA)
    values = {s.name: json.dumps(resolved.values[s.name]) for s in SCHEMA}
    sources = resolved.sources
    value_w = max(len(v) for v in values.values())
    source_w = max(len(sources[s.name]) for s in SCHEMA)
    print(f"{'setting':<{key_w}}  {'value':<{value_w}}  {'source':<{source_w}}  at load")
    for s in SCHEMA:
        used = ""
        if s.name in at_load:
            value, how = at_load[s.name]
            used = f"{json.dumps(value)} ({how})"
        row = f"{s.key:<{key_w}}  {values[s.name]:<{value_w}}  {sources[s.name]:<{source_w}}"
        print(f"{row}  {used}".rstrip())
    return 0


def _at_load(
    resolved: ResolvedSettings, requested: str | None
) -> tuple[str, dict[str, tuple[Any, str]]]:
    """The device `requested` ('cpu', 'cuda', 'cuda:N'; None: the first GPU when the driver
    sees one, else cpu), and for each setting left at 0 or empty (sized where it is used), the
    value a load to it on this host would use and how that was found (what cannot be found, such
    as a GPU's memory on a host without one, is said instead). Raises InvalidArgument for a
    device of another form, and what the driver raises for a GPU it does not have."""
    from blob2gpu import _core
    from blob2gpu.cache.directory import default_cache_dir
    from blob2gpu.loading.host_memory import host_budget, memory_size
    from blob2gpu.loading.memory_fit import default_streamed_cap
    from blob2gpu.loading.pipelines import pinned_budget, pipeline_settings, this_host
    from blob2gpu.loading.request import normalize_device

    driver = _core.driver_info()
    if requested is None:
        device = "cuda:0" if driver["available"] and driver["devices"] else "cpu"
    else:
        device = normalize_device(requested)
    gpu = device != "cpu"
    where = f"sized from this host for {'a GPU' if gpu else 'cpu'}"
    sized = pipeline_settings(resolved, device)
    used: dict[str, tuple[Any, str]] = {
        name: (sized[name], where)
        for name in ("io_threads", "staging_slots", "staging_slot_bytes")
        if not getattr(resolved, name)
    }
    if not resolved.pinned_staging_bytes:
        used["pinned_staging_bytes"] = (
            (pinned_budget(resolved, this_host()), "1/32 of this host's memory, 64 MiB..1 GiB")
            if gpu
            else (0, "not pinned on cpu")
        )
    if not resolved.chunk_bytes:
        used["chunk_bytes"] = (sized["staging_slot_bytes"], "staging_slot_bytes")
    if not resolved.streamed_device_bytes:
        if not gpu:
            used["streamed_device_bytes"] = (0, "not bounded on cpu")
        elif not driver["available"]:
            used["streamed_device_bytes"] = (
                0,
                f"10% of the GPU's memory, at most 4 GiB; no GPU here: {driver['detail']}",
            )
        else:
            ordinal = int(device.partition(":")[2] or _core.current_device())
            total = _core.device_memory(ordinal)[1]
            used["streamed_device_bytes"] = (
                default_streamed_cap(total),
                f"10% of {memory_size(total)}, at most 4 GiB",
            )
    if not resolved.cache_dir:
        try:
            used["cache_dir"] = (str(default_cache_dir()), "the default")
        except Blob2GpuError as e:
            used["cache_dir"] = ("", str(e))
    if not resolved.cache_max_bytes:
        used["cache_max_bytes"] = (0, "no cap")
    if not resolved.host_memory_limit_bytes:
        budget = host_budget(0)
        used["host_memory_limit_bytes"] = (budget.available, budget.bound)
    if not resolved.shard_count:
        used["shard_count"] = (0, "any number of shards")
    return device, used


def cmd_report_show(args: argparse.Namespace) -> int:
    from blob2gpu.operations.timeline import describe, read_report, render_png

    report = read_report(args.file)
    print(describe(report))
    if args.png:
        with _writing(args.png):
            print(f"timeline written to {render_png(report, args.png)}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from blob2gpu.integrity.publish import publish

    manifest = publish(args.local_dir, args.uri, chunk_bytes=args.chunk_bytes)
    total = sum(e.size for e in manifest.files.values())
    print(
        f"published {len(manifest.files)} file(s), {total / 1e9:.3f} GB, and "
        f"blob2gpu.manifest.json (CRC32C per {args.chunk_bytes >> 20} MiB chunk, SHA-256 per "
        "file)"
    )
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from blob2gpu.integrity.publish import write_manifest

    manifest = write_manifest(args.uri, chunk_bytes=args.chunk_bytes)
    print(f"wrote blob2gpu.manifest.json for {len(manifest.files)} file(s)")
    return 0


def _cache(args: argparse.Namespace) -> Any:
    from blob2gpu.cache.nvme import NvmeCache
    from blob2gpu.settings import resolve

    settings = resolve(dict(getattr(args, "set", None) or []), config_path=args.config)
    try:
        return NvmeCache(args.cache_dir or settings.cache_dir or None, settings.cache_max_bytes)
    except OSError as e:
        raise LocalWriteError(f"cannot use the cache directory '{e.filename}': {e.strerror}") from e


def cmd_cache_ls(args: argparse.Namespace) -> int:
    cache = _cache(args)
    entries = sorted(cache.entries(), key=lambda e: e.last_used, reverse=True)
    if args.json:
        print(
            json.dumps(
                [
                    dict(e.meta, key=e.key, last_used=e.last_used, problem=e.problem)
                    for e in entries
                ],
                indent=2,
            )
        )
        return 0
    print(
        f"{cache.root}: {len(entries)} entries, {cache.total_bytes() / 1e9:.3f} GB"
        + (f" (cap {cache.max_bytes / 1e9:.3f} GB)" if cache.max_bytes else "")
    )
    for e in entries:
        m = e.meta
        if e.problem is not None:
            print(f"  {e.key}  {e.problem}")
            continue
        print(
            f"  {e.key}  {m.get('size', 0) / 1e6:10.1f} MB  {m.get('account')}/"
            f"{m.get('container')}/{m.get('blob')}  etag {m.get('etag')}"
        )
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from blob2gpu.cache.source import refetch_entry
    from blob2gpu.settings import resolve

    cache = _cache(args)
    settings = resolve(config_path=args.config) if args.repair else None
    bad = 0
    for e in cache.entries():
        problem = cache.verify(e)
        if problem is None:
            if not args.quiet:
                print(f"ok   {e.key} {e.meta.get('blob', '?')}")
            continue
        bad += 1
        if not args.repair:
            print(f"BAD  {e.key} {e.meta.get('blob', '?')}: {problem}")
            continue
        assert settings is not None
        fill, why_not = refetch_entry(cache, e, settings)
        result = fill.wait() if fill is not None else None
        if result is not None and result.written:
            why_not = None
        elif result is not None:
            why_not = next(iter(result.skipped.values()), "the fill ended early")
        print(
            f"BAD  {e.key} {e.meta.get('blob', '?')}: {problem}; "
            + ("fetched again" if why_not is None else f"removed (not fetched again: {why_not})")
        )
    return 1 if bad and not args.repair else 0


def cmd_cache_warm(args: argparse.Namespace) -> int:
    from blob2gpu.cache.source import warm_cache
    from blob2gpu.loading.request import source_uri
    from blob2gpu.settings import resolve

    settings = resolve(dict(args.set or []), config_path=args.config)
    cache = _cache(args)
    fill, refused = warm_cache(cache, source_uri(args.uri), settings)
    result = _wait_for_fill(fill, "cache warm", args.quiet, None)
    skipped = dict(refused, **result.skipped)
    if not result.written and not skipped and not result.repaired:
        print(f"{cache.root}: all {len(result.cached)} shard(s) already cached (checked)")
        return 0
    print(
        f"{cache.root}: {len(result.written)} shard(s) written, {len(result.cached)} already "
        f"cached (checked), {len(result.repaired)} damaged and fetched again, {len(skipped)} "
        "not written"
    )
    for name, why in result.repaired.items():
        print(f"  damaged: {name}: {why}")
    for name, why in skipped.items():
        print(f"  not written: {name}: {why}")
    return 1 if skipped else 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    cache = _cache(args)
    removed = cache.prune(max_bytes=args.max_bytes)
    for r in removed:
        print(f"removed {r}")
    print(f"{cache.root}: {cache.total_bytes() / 1e9:.3f} GB in {len(cache.entries())} entries")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from blob2gpu.tools import strategy_bench

    settings = dict(args.set or [])
    results = strategy_bench.run(
        args.uri,
        args.strategies.split(","),
        device=args.device,
        repeats=args.repeats,
        local_dir=args.local_dir,
        drop_caches=args.drop_caches,
        settings=settings,
    )
    print(strategy_bench.table(results))
    if args.json:
        _write_text(args.json, strategy_bench.to_json(results))
    if args.png:
        with _writing(args.png):
            strategy_bench.plot(results, args.png)
    return 0
