"""The command line's arguments: one parser, one function per command that declares its options."""

from __future__ import annotations

import argparse
from typing import Any

from blob2gpu._version import __version__
from blob2gpu.cli.commands import (
    cmd_bench,
    cmd_cache_ls,
    cmd_cache_prune,
    cmd_cache_verify,
    cmd_cache_warm,
    cmd_coldstart,
    cmd_config_show,
    cmd_demo,
    cmd_emulator,
    cmd_fetch_aux,
    cmd_load,
    cmd_manifest,
    cmd_preflight,
    cmd_publish,
    cmd_report_show,
)


def _setting(text: str) -> tuple[str, str]:
    """One --set KEY=VALUE (the value is checked when the settings are resolved)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not '{text}'")
    return key.strip(), value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


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
    load.add_argument(
        "--config", metavar="FILE", help="YAML or JSON settings file (else $BLOB2GPU_CONFIG)"
    )
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
        "--no-wait-cache-fill",
        dest="wait_cache_fill",
        action="store_false",
        help="with the NVMe cache on, exit without waiting for the background fill of the "
        "shards the load could not write to the cache (it stops at exit)",
    )
    load.add_argument(
        "--progress-interval",
        type=_positive_float,
        metavar="SECONDS",
        help="seconds between progress updates (default 0.1 for the bar, 2 for plain lines)",
    )
    load.set_defaults(run=cmd_load)


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
    aux.add_argument(
        "--config", metavar="FILE", help="YAML or JSON settings file (else $BLOB2GPU_CONFIG)"
    )
    aux.add_argument(
        "--set", action="append", type=_setting, metavar="KEY=VALUE", help="a setting (repeatable)"
    )
    aux.add_argument("--quiet", action="store_true", help="print nothing")
    aux.set_defaults(run=cmd_fetch_aux)


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
    preflight.add_argument("--config", metavar="FILE", help="YAML or JSON settings file")
    preflight.add_argument("--json", action="store_true", help="JSON for machines")
    preflight.set_defaults(run=cmd_preflight)


def _add_config_command(sub: Any) -> None:
    """`blob2gpu config`."""
    config = sub.add_parser("config", help="the settings")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser(
        "show", help="every setting, its effective value and where it came from"
    )
    show.add_argument(
        "--config", metavar="FILE", help="YAML or JSON settings file (else $BLOB2GPU_CONFIG)"
    )
    show.add_argument("--json", action="store_true", help="JSON keyed by config key")
    show.add_argument(
        "--device",
        help="cpu, cuda or cuda:N: the 'at load' column is what a load to it on this host uses "
        "for settings left at 0 or empty (default: the first GPU the driver sees, else cpu)",
    )
    show.add_argument(
        "--set",
        action="append",
        type=_setting,
        metavar="KEY=VALUE",
        help="a setting, as `load --set` gives it (repeatable): shown with source 'argument'",
    )
    show.set_defaults(run=cmd_config_show)


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
    report_show.set_defaults(run=cmd_report_show)


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
    publish.set_defaults(run=cmd_publish)


def _add_manifest_command(sub: Any) -> None:
    """`blob2gpu manifest`."""
    manifest = sub.add_parser("manifest", help="write the manifest of a checkpoint in Blob")
    manifest.add_argument("uri", help="the checkpoint's Blob URI")
    manifest.add_argument(
        "--chunk-bytes",
        type=_byte_count,
        default=4 << 20,
        help="manifest chunk size: one CRC32C and SHA-256 per chunk (default 4MiB)",
    )
    manifest.set_defaults(run=cmd_manifest)


def _add_cache_command(sub: Any) -> None:
    """`blob2gpu cache`."""
    cache = sub.add_parser("cache", help="the NVMe cache tier")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    for name, run, text in (
        ("ls", cmd_cache_ls, "list entries, most recently used first"),
        ("verify", cmd_cache_verify, "re-read every entry and check it against its record"),
        ("prune", cmd_cache_prune, "remove abandoned temporary files and evict to the cap"),
    ):
        p = cache_sub.add_parser(name, help=text)
        p.add_argument("--cache-dir", help="the cache directory (else the cache_dir setting)")
        p.add_argument("--config", metavar="FILE", help="YAML or JSON settings file")
        p.set_defaults(run=run)
        if name == "ls":
            p.add_argument("--json", action="store_true", help="JSON for machines")
        if name == "verify":
            p.add_argument(
                "--repair",
                action="store_true",
                help="remove bad entries and fetch their blobs again (the same version)",
            )
            p.add_argument("--quiet", action="store_true", help="print only bad entries")
        if name == "prune":
            p.add_argument(
                "--max-bytes",
                type=_byte_count,
                default=None,
                help="evict least recently used entries down to this size (0: all of them; "
                "default: the cache's cap, cache_max_bytes)",
            )
    warm = cache_sub.add_parser(
        "warm",
        help="fill the cache with a Blob checkpoint's shards without loading them",
        description="Fetch the shards of a Blob checkpoint that the node's cache lacks into it "
        "(for a DaemonSet or a node-prep job before pods land), after reading those it holds "
        "through and checking them against Blob (the manifest, else each blob's Content-MD5: a "
        "damaged one is fetched again), one shard at a time at most "
        "cache_fill_bytes_per_second (--set cache_fill_bytes_per_second=0: no bound), with a "
        "progress bar; exit 1 when a shard could not be written.",
    )
    warm.add_argument("uri", nargs="?", help="a Blob URI (default: $MODEL_SOURCE_URI)")
    warm.add_argument("--cache-dir", help="the cache directory (else the cache_dir setting)")
    warm.add_argument("--config", metavar="FILE", help="YAML or JSON settings file")
    warm.add_argument(
        "--set", action="append", type=_setting, metavar="KEY=VALUE", help="a setting (repeatable)"
    )
    warm.add_argument("--quiet", action="store_true", help="print only the result")
    warm.set_defaults(run=cmd_cache_warm)


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
    bench.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="runs of each strategy, interleaved; the table shows the median (default 3)",
    )
    bench.add_argument("--local-dir", help="local copy for the local strategies (else downloaded)")
    bench.add_argument("--drop-caches", action="store_true", help="drop the page cache (root)")
    bench.add_argument(
        "--set", action="append", type=_setting, metavar="KEY=VALUE", help="a blob2gpu setting"
    )
    bench.add_argument("--json", metavar="OUT", help="write every run as JSON")
    bench.add_argument("--png", metavar="OUT", help="stacked phase bars (needs blob2gpu[plot])")
    bench.set_defaults(run=cmd_bench)


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
    coldstart.set_defaults(run=cmd_coldstart)


def _add_demo_command(sub: Any) -> None:
    """`blob2gpu demo`."""
    demo = sub.add_parser("demo", help="write a small checkpoint and load it")
    demo.add_argument("--device", default="auto", help="auto (GPU if usable), cpu, cuda, cuda:N")
    demo.add_argument(
        "--size-mb",
        type=_positive_int,
        default=256,
        metavar="MB",
        help="about how many MB of weights the demo checkpoint holds (default 256)",
    )
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
    demo.set_defaults(run=cmd_demo)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {text}")
    return value


def _add_emulator_command(sub: Any) -> None:
    """`blob2gpu emulator`."""
    emulator = sub.add_parser(
        "emulator",
        help="run a local Azurite blob service until Ctrl-C, printing its connection string",
        description="Start Azurite's blob service (npm package azurite; found in $AZURITE_BLOB, "
        "./.azurite, ~/.local/share/blob2gpu/azurite or on PATH) on 127.0.0.1, print the "
        "AZURE_STORAGE_CONNECTION_STRING to use from another shell, and run until interrupted "
        "(Ctrl-C or SIGTERM stop it).",
    )
    emulator.add_argument(
        "--port",
        type=_port,
        default=10000,
        help="where to listen (default 10000, Azurite's own; 0: a free port, printed)",
    )
    emulator.add_argument(
        "--location",
        metavar="DIR",
        help="keep the blobs in DIR across restarts (default: in memory, gone when it stops)",
    )
    emulator.set_defaults(run=cmd_emulator)


def build_parser() -> argparse.ArgumentParser:
    """The blob2gpu command line's parser; each command's `run` default is its cmd_ function."""
    from blob2gpu import cli  # its docstring is the usage text

    parser = argparse.ArgumentParser(
        prog="blob2gpu",
        description=cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"blob2gpu {__version__}")
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
    _add_emulator_command(sub)
    return parser
