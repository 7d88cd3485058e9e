"""main(): parse the command line, run the command, map blob2gpu's errors to exit code 2 (and
Ctrl-C to 130, the shell's code for SIGINT)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from blob2gpu.cli.arguments import build_parser
from blob2gpu.errors import Blob2GpuError


def main(argv: list[str] | None = None) -> int:
    from blob2gpu import phrasing

    phrasing.use_command_line()  # hints say --device cpu, --set KEY=VALUE
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
    except KeyboardInterrupt:  # Ctrl-C: what was running has closed on the way out
        print("blob2gpu: interrupted", file=sys.stderr)
        return 130
