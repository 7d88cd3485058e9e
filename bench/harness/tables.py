"""How results are shown: fixed-width tables (first column left, the others right), Markdown
tables, ratios and PASS/FAIL verdicts, and the run's JSON file."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def format_row(cols: list[str], widths: list[int]) -> str:
    """Returns one row: the first column left-aligned, the others right-aligned."""
    return "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cols, widths, strict=True))
    )


def print_header(headers: list[str], widths: list[int]) -> None:
    """Prints the header row and a row of dashes under it."""
    print(format_row(headers, widths))
    print(format_row(["-" * w for w in widths], widths))


def print_status_row(name: str, row: Mapping[str, Any], width: int) -> None:
    """Prints the line of a contestant with no numbers: its status and why."""
    print(f"{name.ljust(width)}  {row.get('status', 'failed')}: {row.get('reason', '')}")


def print_markdown(rows: list[dict[str, str]]) -> None:
    """Prints rows (column name -> cell, every row with the same columns) as a Markdown table."""
    cols = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in cols}
    print("| " + " | ".join(k.ljust(widths[k]) for k in cols) + " |")
    print("| " + " | ".join("-" * widths[k] for k in cols) + " |")
    for r in rows:
        print("| " + " | ".join(r[k].ljust(widths[k]) for k in cols) + " |")


def median_of(results: Mapping[str, Any], name: str, key: str = "gb_per_s") -> float | None:
    """Returns a row's median `key`, or None when the row has no numbers."""
    return results.get(name, {}).get("median", {}).get(key)


def ratio(mine: float | None, theirs: float | None) -> float | None:
    """Returns mine / theirs, or None when either is missing (or theirs is 0)."""
    return mine / theirs if mine is not None and theirs else None


def verdict(ok: bool | None) -> str:
    """Returns 'PASS', 'FAIL', or 'n/a' when there was nothing to compare."""
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def write_run_json(path: Path, args: argparse.Namespace, **sections: Any) -> None:
    """Writes the run's arguments and `sections` to `path` as JSON and says so."""
    payload = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **sections,
    }
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")
