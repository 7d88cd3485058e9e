"""The blob2gpu command line: ``blob2gpu load``, ``blob2gpu demo``, ``blob2gpu settings``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import Blob2GpuError


def _cmd_load(args: argparse.Namespace) -> int:
    import blob2gpu

    settings = dict(kv.split("=", 1) for kv in args.set or [])
    with blob2gpu.open(args.uri, device=args.device, framework="dlpack", **settings) as checkpoint:
        checkpoint.to_dict()
        report = checkpoint.report
    if args.report:
        Path(args.report).write_text(report.to_json())
    if not args.quiet:
        print(report.summary())
        print(report.phase_table())
        if args.report:
            print(f"report written to {args.report}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main

    return main(device=args.device, total_mb=args.size_mb, source=args.source)


def _cmd_settings(args: argparse.Namespace) -> int:
    from .settings import SCHEMA, resolve

    resolved = resolve()
    if args.json:
        print(
            json.dumps(
                {
                    s.name: {"value": resolved.values[s.name], "source": resolved.sources[s.name]}
                    for s in SCHEMA
                },
                indent=2,
            )
        )
    else:
        for s in SCHEMA:
            print(f"{s.name:<26} {resolved.values[s.name]!r:<14} ({resolved.sources[s.name]})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blob2gpu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    load = sub.add_parser("load", help="load a checkpoint and print what it took")
    load.add_argument("uri", help="a .safetensors file, a directory of shards, or an index.json")
    load.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    load.add_argument("--report", help="write the LoadReport as JSON to this file")
    load.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a setting for this load (repeatable), e.g. --set staging_slots=16",
    )
    load.add_argument("--quiet", action="store_true", help="print nothing")
    load.set_defaults(run=_cmd_load)

    demo = sub.add_parser("demo", help="write a small checkpoint and load it")
    demo.add_argument("--device", default="auto", help="auto (GPU if usable), cpu, cuda, cuda:N")
    demo.add_argument("--size-mb", type=int, default=256)
    demo.add_argument(
        "--source",
        default="auto",
        choices=("auto", "azurite", "local"),
        help="serve the checkpoint from a local Azurite (auto: when installed)",
    )
    demo.set_defaults(run=_cmd_demo)

    settings = sub.add_parser("settings", help="print the effective settings and their sources")
    settings.add_argument("--json", action="store_true")
    settings.set_defaults(run=_cmd_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Blob2GpuError as e:
        print(f"blob2gpu: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
