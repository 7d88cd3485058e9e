"""Compare two pytest-benchmark JSON files (--benchmark-json) and fail on a regression.

    python bench/compare_benchmarks.py BASELINE.json CURRENT.json [--threshold 0.10] [--stat median]

For every benchmark in both files (matched by fullname) the tracked ratio is CURRENT's time over
BASELINE's (the `--stat` of each, median by default: robust to a few disturbed rounds); more than
1 + threshold is a regression. Prints one row per benchmark (times, GB/s where the benchmark
records `extra_info["GB"]`, the change, the verdict) and exits 1 when any regressed, 2 when a
file is not a pytest-benchmark result. Benchmarks found in only one file are listed, not judged.
The GPU workflow runs it against the last stored result of main; it runs anywhere on two files.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

STATS = ("min", "median", "mean")


class BenchmarkFileError(Exception):
    """A file is not a pytest-benchmark JSON result (the message names it and what is wrong)."""


@dataclass(frozen=True)
class Comparison:
    name: str
    baseline_s: float
    current_s: float
    gigabytes: float | None

    @property
    def ratio(self) -> float:
        """Current time over baseline time: above 1 is slower."""
        return self.current_s / self.baseline_s

    def regressed(self, threshold: float) -> bool:
        return self.ratio > 1 + threshold


def read_times(path: Path, stat: str) -> dict[str, tuple[float, float | None]]:
    """{fullname: (seconds, GB or None)} of a pytest-benchmark JSON file."""
    try:
        data = json.loads(path.read_text())
        benchmarks = data["benchmarks"]
        times: dict[str, tuple[float, float | None]] = {}
        for bench in benchmarks:
            seconds = float(bench["stats"][stat])
            if not seconds > 0:
                raise ValueError(f"{bench['fullname']}: {stat} is {seconds}")
            gigabytes = bench.get("extra_info", {}).get("GB")
            times[bench["fullname"]] = (seconds, float(gigabytes) if gigabytes else None)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchmarkFileError(f"{path}: not a pytest-benchmark result ({e!r})") from e
    if not times:
        raise BenchmarkFileError(f"{path}: a pytest-benchmark result without benchmarks")
    return times


def compare(
    baseline: dict[str, tuple[float, float | None]], current: dict[str, tuple[float, float | None]]
) -> list[Comparison]:
    return [
        Comparison(name, baseline[name][0], current[name][0], current[name][1])
        for name in sorted(baseline.keys() & current.keys())
    ]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def report(
    comparisons: list[Comparison],
    only_baseline: list[str],
    only_current: list[str],
    args: argparse.Namespace,
) -> str:
    lines = [
        f"{args.stat} time, {args.current} against {args.baseline}; "
        f"a regression is more than {args.threshold:.0%} slower",
        f"{'benchmark':<58} {'base ms':>10} {'now ms':>10} {'now GB/s':>9} {'change':>8}  verdict",
    ]
    for c in comparisons:
        gbps = f"{c.gigabytes / c.current_s:.2f}" if c.gigabytes else "-"
        verdict = "REGRESSED" if c.regressed(args.threshold) else "ok"
        lines.append(
            f"{c.name.split('::', 1)[-1]:<58} {_ms(c.baseline_s):>10} {_ms(c.current_s):>10} "
            f"{gbps:>9} {c.ratio - 1:>+8.1%}  {verdict}"
        )
    lines += [f"only in the baseline (not judged): {n}" for n in only_baseline]
    lines += [f"new (not judged): {n}" for n in only_current]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path, help="the last stored result of main")
    parser.add_argument("current", type=Path, help="this run's result")
    parser.add_argument("--threshold", type=float, default=0.10, help="default 0.10 (10%%)")
    parser.add_argument("--stat", choices=STATS, default="median")
    args = parser.parse_args(argv)
    try:
        baseline = read_times(args.baseline, args.stat)
        current = read_times(args.current, args.stat)
    except BenchmarkFileError as e:
        print(f"compare_benchmarks: {e}", file=sys.stderr)
        return 2
    comparisons = compare(baseline, current)
    only_baseline = sorted(baseline.keys() - current.keys())
    only_current = sorted(current.keys() - baseline.keys())
    print(report(comparisons, only_baseline, only_current, args))
    regressed = [c for c in comparisons if c.regressed(args.threshold)]
    if regressed:
        print(f"{len(regressed)} of {len(comparisons)} benchmarks regressed")
        return 1
    print(f"no regression in {len(comparisons)} benchmarks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
