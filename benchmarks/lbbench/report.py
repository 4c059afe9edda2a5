"""Figures, their summaries over repeated runs, ratios against HAProxy, the
targets, and the printed table. Pure: no I/O but returning strings.

A figure's value per run is a float (or None where it does not apply, e.g.
UDP through HAProxy). Runs are summarised by median and min-max; a ratio is
anycast-lb's median over HAProxy's median.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

BASELINE = "haproxy"


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    decimals: int = 0
    target: tuple[str, float] | None = None
    """(``<=`` or ``>=``, bound) on the ratio anycast-lb / HAProxy."""


FIGURES: tuple[Figure, ...] = (
    Figure("short_rate", "short connections/s (new TCP connection per request)"),
    Figure("short_cpu_us", "  proxy CPU per short connection (us)", 1, ("<=", 1.2)),
    Figure("short_user_us", "    its user part (us)", 1),
    Figure("short_sys_us", "    its system (kernel) part (us)", 1),
    Figure("short_errors", "  failed connections (wrk socket errors)"),
    Figure("lat_rate", "offered rate for latency (conn/s, half HAProxy's max)"),
    Figure("lat_p50_us", "  p50 latency at that rate (us)"),
    Figure("lat_p99_us", "  p99 latency at that rate (us)", 0, ("<=", 1.5)),
    Figure("lat_errors", "  failed or timed-out (2 s) connections"),
    Figure("bulk1_gbps", "bulk, 1 stream (Gbit/s)", 2, (">=", 1.0)),
    Figure("bulk1_cpu_s_per_gb", "  proxy CPU per GB, 1 stream (s)", 3, ("<=", 1.0)),
    Figure("bulk8_gbps", "bulk, 8 streams (Gbit/s)", 2, (">=", 1.0)),
    Figure("bulk8_cpu_s_per_gb", "  proxy CPU per GB, 8 streams (s)", 3, ("<=", 1.0)),
    Figure("idle_rss_per_conn", "RSS per idle connection (bytes)", 0, ("<=", 1.0)),
    Figure("idle_slab_per_conn", "  kernel slab per idle connection (bytes, whole path)"),
    Figure("idle_fds_per_conn", "  proxy file descriptors per idle connection", 2),
    Figure("udp_pps", "UDP datagrams/s through the proxy (echo, both ways)"),
    Figure("udp_cpu_us_per_pkt", "  proxy CPU per UDP datagram (us)", 2),
)

FIGURE_BY_KEY = {f.key: f for f in FIGURES}


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}


def summarise(values: Sequence[float | None]) -> Summary | None:
    """Median and range of the runs that have a value; None if none has."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Summary(statistics.median(present), min(present), max(present), len(present))


def ratio(candidate: Summary | None, baseline: Summary | None) -> float | None:
    if candidate is None or baseline is None or baseline.median == 0:
        return None
    return candidate.median / baseline.median


def verdict(figure: Figure, value: float | None) -> str:
    """PASS or FAIL against the figure's target; ``-`` without a target,
    ``n/a`` without a ratio."""
    if figure.target is None:
        return "-"
    if value is None:
        return "n/a"
    op, bound = figure.target
    ok = value <= bound if op == "<=" else value >= bound
    return "PASS" if ok else "FAIL"


def target_text(figure: Figure) -> str:
    if figure.target is None:
        return "-"
    op, bound = figure.target
    return f"{op} {bound:g}x"


def format_value(value: float | None, decimals: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{decimals}f}"


def format_summary(summary: Summary | None, decimals: int) -> str:
    """``median [min-max]``, or ``n/a``."""
    if summary is None:
        return "n/a"
    if summary.n == 1:
        return format_value(summary.median, decimals)
    return (f"{format_value(summary.median, decimals)} "
            f"[{format_value(summary.low, decimals)}-{format_value(summary.high, decimals)}]")


def summarise_runs(runs: Sequence[Mapping[str, object]]) -> dict[str, dict[str, Summary]]:
    """Per proxy label, per figure key: the summary over that label's runs.

    ``runs`` are the per-run records: each has ``proxy`` and any figure keys.
    """
    values: dict[str, dict[str, list[float | None]]] = {}
    for run in runs:
        label = str(run["proxy"])
        per = values.setdefault(label, {})
        for figure in FIGURES:
            if figure.key in run:
                value = run[figure.key]
                per.setdefault(figure.key, []).append(
                    None if value is None else float(value))  # type: ignore[arg-type]
    out: dict[str, dict[str, Summary]] = {}
    for label, per in values.items():
        out[label] = {}
        for key, vals in per.items():
            summary = summarise(vals)
            if summary is not None:
                out[label][key] = summary
    return out


@dataclass(frozen=True)
class Row:
    figure: Figure
    baseline: Summary | None
    candidate: Summary | None
    ratio: float | None
    verdict: str


def compare(summaries: Mapping[str, Mapping[str, Summary]], candidate: str) -> list[Row]:
    """The rows of the table for one anycast-lb label against HAProxy."""
    base = summaries.get(BASELINE, {})
    cand = summaries.get(candidate, {})
    rows = []
    for figure in FIGURES:
        b, c = base.get(figure.key), cand.get(figure.key)
        if b is None and c is None:
            continue
        r = ratio(c, b)
        rows.append(Row(figure, b, c, r, verdict(figure, r)))
    return rows


def render_text(rows: Sequence[Row], candidate: str) -> str:
    """A fixed-width table: figure, HAProxy, candidate, ratio, target, verdict."""
    header = ("figure", "HAProxy", candidate, "ratio", "target", "verdict")
    body = [(r.figure.label, format_summary(r.baseline, r.figure.decimals),
             format_summary(r.candidate, r.figure.decimals),
             "n/a" if r.ratio is None else f"{r.ratio:.2f}", target_text(r.figure), r.verdict)
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: Sequence[str]) -> str:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)])


def render_markdown(rows: Sequence[Row], candidate: str) -> str:
    lines = [f"| figure | HAProxy | {candidate} | ratio | target | verdict |",
             "|---|---:|---:|---:|---|---|"]
    for r in rows:
        label = r.figure.label.strip()
        if r.figure.label.startswith("  "):
            label = "&nbsp;&nbsp;" + label
        lines.append(f"| {label} | {format_summary(r.baseline, r.figure.decimals)} | "
                     f"{format_summary(r.candidate, r.figure.decimals)} | "
                     f"{'n/a' if r.ratio is None else f'{r.ratio:.2f}'} | "
                     f"{target_text(r.figure)} | {r.verdict} |")
    return "\n".join(lines)
