"""The blob2gpu command line.

    blob2gpu load [URI]            load a checkpoint, show progress, print the phase table
    blob2gpu fetch-aux [URI] DIR   download config, tokenizer and other non-weight files
    blob2gpu preflight             check a node before rollout (exit 1 when a check fails)
    blob2gpu config show           the effective settings and where each came from
    blob2gpu report show FILE      a load report's phases and shards (--png: a timeline picture)
    blob2gpu publish DIR URI       upload a checkpoint and its integrity manifest
    blob2gpu manifest URI          write the manifest of a checkpoint already in Blob
    blob2gpu cache ls|verify|prune the NVMe cache tier
    blob2gpu bench URI             compare load strategies phase by phase (the case study's table)
    blob2gpu coldstart URI         build a transformers model from Blob, time its first token
    blob2gpu demo                  write a small checkpoint and load it

Errors print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from blob2gpu.errors import Blob2GpuError, LocalWriteError


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


def _cmd_load(args: argparse.Namespace) -> int:
    import blob2gpu
    from blob2gpu.operations.progress import LoadProgress, choose_mode

    settings = dict(args.set or [])
    selection: dict[str, Any] = {}
    if args.tensor:
        selection["tensor_names"] = args.tensor
    if args.match:
        import fnmatch

        patterns = args.match

        def matches(name: str) -> bool:
            return any(fnmatch.fnmatchcase(name, p) for p in patterns)

        selection["tensor_filter"] = matches
    with blob2gpu.open(
        args.uri,
        device=args.device,
        framework="dlpack",
        config=args.config,
        **selection,
        **settings,
    ) as checkpoint:
        mode = choose_mode(sys.stderr, quiet=args.quiet)
        with LoadProgress(checkpoint.progress, sys.stderr, mode, args.progress_interval):
            checkpoint.to_dict()
        report = checkpoint.report
    if args.report:
        _write_text(args.report, report.to_json())
    if not args.quiet:
        print(report.summary())
        print(report.phase_table())
        if args.report:
            print(f"report written to {args.report}")
    return 0


def _cmd_fetch_aux(args: argparse.Namespace) -> int:
    from blob2gpu.api import fetch_aux
    from blob2gpu.loading.request import source_uri

    settings = dict(args.set or [])
    paths = fetch_aux(source_uri(args.uri), args.dest, config=args.config, **settings)
    if not args.quiet:
        for path in paths:
            print(path)
    return 0


def _cmd_coldstart(args: argparse.Namespace) -> int:
    from blob2gpu.integrations.coldstart import cold_start, describe

    print(describe(cold_start(args.uri, device=args.device, prompt=args.prompt)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from blob2gpu.tools.demo import main

    return main(device=args.device, total_mb=args.size_mb, source=args.source, model=args.model)


def _cmd_preflight(args: argparse.Namespace) -> int:
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


def _cmd_config_show(args: argparse.Namespace) -> int:
    from blob2gpu.settings import CONFIG_ENV, SCHEMA, resolve

    resolved = resolve(config_path=args.config)
    config = args.config or os.environ.get(CONFIG_ENV)
    if args.json:
        doc = {
            s.key: {
                "name": s.name,
                "value": resolved.values[s.name],
                "source": resolved.sources[s.name],
                "default": s.default,
                "env": s.env,
            }
            for s in SCHEMA
        }
        print(json.dumps(doc, indent=2))
        return 0
    where = "--config" if args.config else CONFIG_ENV
    print(f"config file: {config} (from {where})" if config else "config file: none")
    key_w = max(len(s.key) for s in SCHEMA)
    values = {s.name: json.dumps(resolved.values[s.name]) for s in SCHEMA}
    value_w = max(len(v) for v in values.values())
    print(f"{'setting':<{key_w}}  {'value':<{value_w}}  source")
    for s in SCHEMA:
        print(f"{s.key:<{key_w}}  {values[s.name]:<{value_w}}  {resolved.sources[s.name]}")
    return 0


def _cmd_report_show(args: argparse.Namespace) -> int:
    from blob2gpu.operations.timeline import describe, read_report, render_png

    report = read_report(args.file)
    print(describe(report))
    if args.png:
        with _writing(args.png):
            print(f"timeline written to {render_png(report, args.png)}")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from blob2gpu.integrity.publish import publish

    manifest = publish(args.local_dir, args.uri, chunk_bytes=args.chunk_bytes)
    total = sum(e.size for e in manifest.files.values())
    print(
        f"published {len(manifest.files)} file(s), {total / 1e9:.3f} GB, and "
        f"blob2gpu.manifest.json (CRC32C per {args.chunk_bytes >> 20} MiB chunk, SHA-256 per "
        "file)"
    )
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    from blob2gpu.integrity.publish import write_manifest

    manifest = write_manifest(args.uri, chunk_bytes=args.chunk_bytes)
    print(f"wrote blob2gpu.manifest.json for {len(manifest.files)} file(s)")
    return 0


def _cache(args: argparse.Namespace) -> Any:
    from blob2gpu.cache.nvme import NvmeCache
    from blob2gpu.settings import resolve

    settings = resolve(config_path=args.config)
    try:
        return NvmeCache(args.cache_dir or settings.cache_dir or None, settings.cache_max_bytes)
    except OSError as e:
        raise LocalWriteError(f"cannot use the cache directory '{e.filename}': {e.strerror}") from e


def _cmd_cache_ls(args: argparse.Namespace) -> int:
    cache = _cache(args)
    entries = sorted(cache.entries(), key=lambda e: e.last_used, reverse=True)
    if args.json:
        print(
            json.dumps([dict(e.meta, key=e.key, last_used=e.last_used) for e in entries], indent=2)
        )
        return 0
    print(
        f"{cache.root}: {len(entries)} entries, {cache.total_bytes() / 1e9:.3f} GB"
        + (f" (cap {cache.max_bytes / 1e9:.3f} GB)" if cache.max_bytes else "")
    )
    for e in entries:
        m = e.meta
        print(
            f"  {e.key}  {m.get('size', 0) / 1e6:10.1f} MB  {m.get('account')}/"
            f"{m.get('container')}/{m.get('blob')}  etag {m.get('etag')}"
        )
    return 0


def _cmd_cache_verify(args: argparse.Namespace) -> int:
    cache = _cache(args)
    bad = 0
    for e in cache.entries():
        problem = cache.verify(e)
        if problem is not None:
            bad += 1
            print(
                f"BAD  {e.key} {e.meta.get('blob')}: {problem}"
                + ("; removed" if args.repair else "")
            )
            if args.repair:
                cache.remove(e)
        elif not args.quiet:
            print(f"ok   {e.key} {e.meta.get('blob')}")
    return 1 if bad and not args.repair else 0


def _cmd_cache_prune(args: argparse.Namespace) -> int:
    cache = _cache(args)
    removed = cache.prune(max_bytes=args.max_bytes)
    for r in removed:
        print(f"removed {r}")
    print(f"{cache.root}: {cache.total_bytes() / 1e9:.3f} GB in {len(cache.entries())} entries")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
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


def _setting(text: str) -> tuple[str, str]:
    """One --set KEY=VALUE (the value is checked when the settings are resolved)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not '{text}'")
    return key.strip(), value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def _byte_count(text: str) -> int:
    """'28000000000', '28e9', '28GB' or '26GiB' -> bytes."""
    number = text.strip().rstrip("bBiIkKmMgGtT")
    unit = text.strip()[len(number) :].lower()
    try:
        value = float(number) * _BYTE_UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(
            f"not a byte count: {text!r} (e.g. 28000000000, 28e9, 28GB, 26GiB)"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {text!r}")
    return int(value)


def _add_load_command(sub: Any) -> None:
    """`blob2gpu load`."""
    load = sub.add_parser("load", help="load a checkpoint and print what it took")
    load.add_argument(
        "uri",
        nargs="?",
        help="a .safetensors file, a directory of shards, an index.json, or a Blob URI "
        "(default: $MODEL_SOURCE_URI)",
    )
    load.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    load.add_argument("--config", metavar="FILE", help="YAML settings file (else $BLOB2GPU_CONFIG)")
    load.add_argument("--report", help="write the LoadReport as JSON to this file")
    load.add_argument(
        "--set",
        action="append",
        type=_setting,
        metavar="KEY=VALUE",
        help="a setting for this load (repeatable), e.g. --set staging_slots=16",
    )
    load.add_argument(
        "--tensor",
        action="append",
        metavar="NAME",
        help="load only this tensor (repeatable); only its bytes are read",
    )
    load.add_argument(
        "--match",
        action="append",
        metavar="GLOB",
        help="load only tensors whose name matches (repeatable), e.g. 'model.layers.0.*'",
    )
    load.add_argument("--quiet", action="store_true", help="print nothing (no progress either)")
    load.add_argument(
        "--progress-interval",
        type=_positive_float,
        metavar="SECONDS",
        help="seconds between progress updates (default 0.1 for the bar, 2 for plain lines)",
    )
    load.set_defaults(run=_cmd_load)


def _add_fetch_aux_command(sub: Any) -> None:
    """`blob2gpu fetch-aux`."""
    aux = sub.add_parser(
        "fetch-aux",
        help="download the non-weight files beside a Blob checkpoint (config, tokenizer, ...)",
        description="Download config.json, tokenizer files, the index and the other non-weight "
        "files beside a Blob checkpoint into DIR (an init container's emptyDir, say), each "
        "checked against the manifest when it lists it; prints the written paths.",
    )
    aux.add_argument("uri", nargs="?", help="a Blob URI (default: $MODEL_SOURCE_URI)")
    aux.add_argument("dest", metavar="DIR", help="the local directory to write them to")
    aux.add_argument("--config", metavar="FILE", help="YAML settings file (else $BLOB2GPU_CONFIG)")
    aux.add_argument(
        "--set", action="append", type=_setting, metavar="KEY=VALUE", help="a setting (repeatable)"
    )
    aux.add_argument("--quiet", action="store_true", help="print nothing")
    aux.set_defaults(run=_cmd_fetch_aux)


def _add_preflight_command(sub: Any) -> None:
    """`blob2gpu preflight`."""
    preflight = sub.add_parser(
        "preflight",
        help="check the node: driver, GPUs, pinned memory, cache, storage, model fit",
        description="Check that this node can load the model; exit 1 when a check fails "
        "(fit for a Kubernetes init container).",
    )
    preflight.add_argument(
        "--source", metavar="URI", help="checkpoint URI or path (default: $MODEL_SOURCE_URI)"
    )
    preflight.add_argument(
        "--model-bytes",
        type=_byte_count,
        metavar="N",
        help="weight bytes to fit (e.g. 28e9, 28GB); default: the checkpoint's size",
    )
    preflight.add_argument(
        "--device",
        default="auto",
        help="auto (a GPU when the driver sees one), cpu, cuda or cuda:N; with cuda a missing "
        "GPU fails, else the GPU checks are skipped",
    )
    preflight.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="cache directory to check (default: $BLOB2GPU_CACHE_DIR or ~/.cache/blob2gpu)",
    )
    preflight.add_argument("--config", metavar="FILE", help="YAML settings file")
    preflight.add_argument("--json", action="store_true", help="JSON for machines")
    preflight.set_defaults(run=_cmd_preflight)


def _add_config_command(sub: Any) -> None:
    """`blob2gpu config`."""
    config = sub.add_parser("config", help="the settings")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser(
        "show", help="every setting, its effective value and where it came from"
    )
    show.add_argument("--config", metavar="FILE", help="YAML settings file (else $BLOB2GPU_CONFIG)")
    show.add_argument("--json", action="store_true", help="JSON keyed by config key")
    show.set_defaults(run=_cmd_config_show)


def _add_report_command(sub: Any) -> None:
    """`blob2gpu report`."""
    report = sub.add_parser("report", help="read a load report")
    report_sub = report.add_subparsers(dest="report_command", required=True)
    report_show = report_sub.add_parser(
        "show", help="the phase table and a per-shard table; --png draws the timeline"
    )
    report_show.add_argument("file", help="a report JSON file (blob2gpu load --report FILE)")
    report_show.add_argument(
        "--png", metavar="OUT", help="draw the timeline to this PNG (needs blob2gpu[plot])"
    )
    report_show.set_defaults(run=_cmd_report_show)


def _add_publish_command(sub: Any) -> None:
    """`blob2gpu publish`."""
    publish = sub.add_parser("publish", help="upload a checkpoint and its integrity manifest")
    publish.add_argument("local_dir", help="a local checkpoint directory")
    publish.add_argument("uri", help="where: az://CONTAINER/PREFIX or an https:// Blob URL")
    publish.add_argument(
        "--chunk-bytes",
        type=_byte_count,
        default=4 << 20,
        help="manifest chunk size (default 4MiB)",
    )
    publish.set_defaults(run=_cmd_publish)


def _add_manifest_command(sub: Any) -> None:
    """`blob2gpu manifest`."""
    manifest = sub.add_parser("manifest", help="write the manifest of a checkpoint in Blob")
    manifest.add_argument("uri", help="the checkpoint's Blob URI")
    manifest.add_argument("--chunk-bytes", type=_byte_count, default=4 << 20)
    manifest.set_defaults(run=_cmd_manifest)


def _add_cache_command(sub: Any) -> None:
    """`blob2gpu cache`."""
    cache = sub.add_parser("cache", help="the NVMe cache tier")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    for name, run, text in (
        ("ls", _cmd_cache_ls, "list entries, most recently used first"),
        ("verify", _cmd_cache_verify, "re-read every entry and check it"),
        ("prune", _cmd_cache_prune, "remove abandoned temporary files and evict to the cap"),
    ):
        p = cache_sub.add_parser(name, help=text)
        p.add_argument("--cache-dir", help="the cache directory (else the cache_dir setting)")
        p.add_argument("--config", metavar="FILE", help="YAML settings file")
        p.set_defaults(run=run)
        if name == "ls":
            p.add_argument("--json", action="store_true")
        if name == "verify":
            p.add_argument("--repair", action="store_true", help="remove bad entries")
            p.add_argument("--quiet", action="store_true", help="print only bad entries")
        if name == "prune":
            p.add_argument(
                "--max-bytes",
                type=_byte_count,
                default=None,
                help="evict least recently used entries down to this size",
            )


def _add_bench_command(sub: Any) -> None:
    """`blob2gpu bench`."""
    bench = sub.add_parser("bench", help="compare load strategies phase by phase")
    bench.add_argument("uri", help="the checkpoint (local or Blob)")
    bench.add_argument(
        "--strategies",
        default="image-local,host-staging,direct-gpu",
        help="comma-separated: image-local, host-staging, direct-gpu, runai, "
        "fastsafetensors (the first is the baseline of the gain)",
    )
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--local-dir", help="local copy for the local strategies (else downloaded)")
    bench.add_argument("--drop-caches", action="store_true", help="drop the page cache (root)")
    bench.add_argument(
        "--set", action="append", type=_setting, metavar="KEY=VALUE", help="a blob2gpu setting"
    )
    bench.add_argument("--json", metavar="OUT", help="write every run as JSON")
    bench.add_argument("--png", metavar="OUT", help="stacked phase bars (needs blob2gpu[plot])")
    bench.set_defaults(run=_cmd_bench)


def _add_coldstart_command(sub: Any) -> None:
    """`blob2gpu coldstart`."""
    coldstart = sub.add_parser(
        "coldstart",
        help="build a checkpoint's transformers model, load it, and time its first token",
        description="Fetch config.json (and tokenizer) beside the weights, build the model on the "
        "meta device, load the weights, generate one token; print the phases "
        "(needs blob2gpu[transformers]).",
    )
    coldstart.add_argument("uri", help="a Blob URI or a local checkpoint directory")
    coldstart.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    coldstart.add_argument("--prompt", default="hello", help="the input, when there is a tokenizer")
    coldstart.set_defaults(run=_cmd_coldstart)


def _add_demo_command(sub: Any) -> None:
    """`blob2gpu demo`."""
    demo = sub.add_parser("demo", help="write a small checkpoint and load it")
    demo.add_argument("--device", default="auto", help="auto (GPU if usable), cpu, cuda, cuda:N")
    demo.add_argument("--size-mb", type=int, default=256)
    demo.add_argument(
        "--model",
        default="generated",
        choices=("generated", "llama"),
        help="generated: shards of random tensors; llama: a transformers Llama, cold-started to "
        "its first token (needs blob2gpu[transformers])",
    )
    demo.add_argument(
        "--source",
        default="auto",
        choices=("auto", "azurite", "local"),
        help="serve the checkpoint from a local Azurite (auto: when installed)",
    )
    demo.set_defaults(run=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blob2gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_load_command(sub)
    _add_fetch_aux_command(sub)
    _add_preflight_command(sub)
    _add_config_command(sub)
    _add_report_command(sub)
    _add_publish_command(sub)
    _add_manifest_command(sub)
    _add_cache_command(sub)
    _add_bench_command(sub)
    _add_coldstart_command(sub)
    _add_demo_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except Blob2GpuError as e:
        print(f"blob2gpu: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `blob2gpu config show | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
