"""Where a load's time went (``blob2gpu report show``): the phase table, a table per shard, and a
timeline picture (matplotlib, the optional ``plot`` extra) with a bar per shard and the
case study's phase markers.

Each shard's bar has two segments: header (its first bytes read -> its header parsed and
validated) and data (header parsed -> every byte fetched, verified, copied and the tensors handed
out). Vertical lines mark artifact fetch complete, host staging complete, model load complete and
the first token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from blob2gpu.errors import InvalidArgument
from blob2gpu.operations.report import LoadReport
from blob2gpu.redaction import redact, strip_query

PHASE_MARKERS = (
    ("artifact_fetch_complete", "fetch complete", "#6b6b6b", (0, (1, 2))),
    ("host_staging_complete", "staging complete", "#9467bd", (0, (4, 2))),
    ("model_load_complete", "model loaded", "#d62728", "-"),
    ("first_token", "first token", "#2ca02c", "-."),
)
HEADER_COLOR, DATA_COLOR = "#ff7f0e", "#1f77b4"


def read_report(path: str | os.PathLike[str]) -> LoadReport:
    """The LoadReport in a JSON file (``blob2gpu load --report``, ``report.to_json()``).

    Raises InvalidArgument when the file cannot be read or is not a report.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidArgument(f"cannot read report '{path}': {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"report '{path}' is not JSON: {e}") from None
    if not isinstance(doc, dict) or not {"uri", "device", "framework", "started_at"} <= set(doc):
        raise InvalidArgument(f"'{path}' is not a blob2gpu load report (no uri/device/...)")
    try:
        return LoadReport.from_dict(doc)
    except TypeError as e:
        raise InvalidArgument(f"'{path}' is not a blob2gpu load report: {e}") from None


def _t(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def shard_table(report: LoadReport) -> str:
    """One line per shard: size, tensors, start, header parsed, published, latency, retries."""
    rows = [
        f"{'shard':<40}{'MB':>10}{'tensors':>9}{'start':>9}{'header':>9}{'done':>9}"
        f"{'latency':>9}{'retries':>9}"
    ]
    for s in report.shards:
        name = s.name if len(s.name) <= 38 else "..." + s.name[-35:]
        rows.append(
            f"{name:<40}{s.bytes / 1e6:>10.1f}{s.tensors:>9}{_t(s.started):>9}"
            f"{_t(s.header_parsed):>9}{_t(s.published):>9}{_t(s.fetch_latency):>9}"
            f"{s.retries:>9}"
        )
    return "\n".join(rows)


def _staging(report: LoadReport) -> str:
    if report.device == "cpu":
        return "straight into host memory (mapped)" if report.mmap else "straight into host memory"
    if not report.staging_slots:
        return "no staging ring"
    pinned = "pinned" if report.pinned else "pageable"
    return (
        f"{report.staging_slots} x {report.staging_slot_bytes / (1 << 20):.0f} MiB {pinned} "
        f"staging, {report.copy_streams} copy stream(s)"
    )


def describe(report: LoadReport) -> str:
    """What ``report show`` prints: the summary, the phase table and the shard table."""
    lines = [
        f"{redact(strip_query(report.uri))}",
        report.summary(),
        f"source {report.source}, strategy {report.strategy}, {_staging(report)}, "
        f"{report.requests} request(s), {report.retries} retried"
        + (f" ({report.retry_wait_seconds:.2f} s backing off)" if report.retries else ""),
    ]
    if report.throttled or report.throttle_decreases:
        lines.append(
            f"{report.throttled} throttled answer(s): concurrency lowered "
            f"{report.throttle_decreases} time(s)"
            + (
                f" ({report.throttle_node_decreases} for another load on the node)"
                if report.throttle_node_decreases
                else ""
            )
            + f", down to {report.concurrency_lowest}, settled "
            f"at {report.concurrency_settled}; ranges settled at "
            f"{(report.range_bytes_settled or 0) / (1 << 10):.0f} KiB" + _pace(report)
        )
    if report.host_populate_seconds > 0:
        # Where this is a large part of the load's seconds, new memory is costly on this host
        # (a VM handing freed memory back to its hypervisor): a GPU target or mmap avoids it.
        lines.append(f"{report.host_populate_seconds:.3f} CPU s making new host memory resident")
    if report.cache_hit_rate is not None:
        lines.append(_cache_line(report))
    lines += [
        "",
        report.phase_table(),
        "",
        shard_table(report),
    ]
    return "\n".join(lines)


def _cache_line(report: LoadReport) -> str:
    """The NVMe cache's part: hits, shards written during the load, and the fill after it."""
    hits = sum(s.cache_hit for s in report.shards)
    line = (
        f"NVMe cache: {hits} of {len(report.shards)} shard(s) hit, "
        f"{len(report.cache_written)} written during the load"
    )
    if report.cache_fill_pending:
        line += (
            f", {len(report.cache_fill_pending)} left to the fill "
            f"({len(report.cache_filled)} written by it when the report was saved)"
        )
    if report.cache_repaired:
        line += f"; {len(report.cache_repaired)} damaged entr(ies) fetched again from Blob"
    if report.cache_bypassed:
        name, why = next(iter(report.cache_bypassed.items()))
        line += f"; not used for {len(report.cache_bypassed)} shard(s) ('{name}': {why})"
    return line


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _title(report: LoadReport) -> str:
    uri = redact(strip_query(report.uri))
    if len(uri) > 70:
        uri = "..." + uri[-67:]
    return (
        f"{uri}\n{_size(report.bytes)} in {report.seconds:.2f} s = "
        f"{report.throughput_gbps:.2f} GB/s to {report.device} "
        f"({report.source}, {report.strategy}, {len(report.shards)} shards)"
    )


def render_png(report: LoadReport, path: str | os.PathLike[str]) -> Path:
    """Draw the load's timeline to a PNG at `path` and return the path.

    Raises InvalidArgument when matplotlib is not installed (pip install 'blob2gpu[plot]').
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on servers
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise InvalidArgument("--png needs matplotlib: pip install 'blob2gpu[plot]'") from None

    shards = report.shards
    n = max(len(shards), 1)
    height = min(2.6 + 0.3 * n, 16.0)
    fig, ax = plt.subplots(figsize=(11, height), dpi=110)
    try:
        for row, s in enumerate(shards):
            if s.started is None:
                continue
            header_end = s.header_parsed if s.header_parsed is not None else s.started
            ax.barh(row, header_end - s.started, left=s.started, height=0.6, color=HEADER_COLOR)
            if s.published is not None:
                ax.barh(
                    row, s.published - header_end, left=header_end, height=0.6, color=DATA_COLOR
                )
        handles: list[Any] = [
            Patch(color=HEADER_COLOR, label="header (read + parsed)"),
            Patch(color=DATA_COLOR, label="data (fetch, verify, copy, publish)"),
        ]
        for key, label, color, style in PHASE_MARKERS:
            t = report.phases.get(key)
            if t is None:
                continue
            line = ax.axvline(t, color=color, linestyle=style, linewidth=1.6)
            line.set_label(f"{label} {t:.2f} s")
            handles.append(line)
        ax.set_yticks(range(len(shards)))
        step = max(1, len(shards) // 40)  # keep labels legible on big checkpoints
        ax.set_yticklabels(
            [s.name if i % step == 0 else "" for i, s in enumerate(shards)], fontsize=8
        )
        ax.set_ylim(len(shards) - 0.5 if shards else 0.5, -0.5)  # first shard on top
        ends = [t for t in report.phases.values() if t is not None]
        ends += [s.published for s in shards if s.published is not None]
        ax.set_xlim(0, max(ends, default=1.0) * 1.04 or 1.0)
        ax.set_xlabel("seconds since artifact fetch start")
        ax.set_title(_title(report), fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
        legend_inches = 0.55  # two rows of entries under the axis label
        fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, legend_inches / height, 1, 1))
        out = Path(path)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out


def _pace(report: LoadReport) -> str:
    """The pace a throttled load kept to at the end, if it was paced."""
    paces = []
    if report.pace_bytes_per_second is not None:
        paces.append(f"{report.pace_bytes_per_second / 1e6:.1f} MB/s")
    if report.pace_requests_per_second is not None:
        paces.append(f"{report.pace_requests_per_second:.1f} requests/s")
    return f"; paced at {' and '.join(paces)}" if paces else ""
