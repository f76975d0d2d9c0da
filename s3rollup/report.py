"""`s3rollup report`: one self-contained HTML page of a published result.

Inline CSS and inline SVG drawn here (no scripts, no fonts, no images, no network fetch):
the per-group statistics table, mean ± std per group for each value column, and the
distribution of group sizes. Everything shown comes from the published aggregate, which
holds only group keys and statistics.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from .ops import group_labels

W, H, PAD = 720, 260, 44

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2329;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.meta{color:#59636e}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #d8dee4;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f3f5f7;position:sticky;top:0}
td.nan{color:#8c959f}
.scroll{max-height:480px;overflow:auto;border:1px solid #d8dee4;display:inline-block}
svg{background:#fbfcfd;border:1px solid #d8dee4;margin:4px 0}
svg text{font-size:11px;fill:#424a53}
.axis{stroke:#8c959f}.err{stroke:#0969da;stroke-opacity:.45}.pt{fill:#0969da}.bar{fill:#1a7f37}
"""


def fmt(value: Any) -> str:
    """A cell as text: integers as is, floats to 6 significant digits, NaN as 'NaN'."""
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _scale(lo: float, hi: float, a: float, b: float) -> Any:
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def mean_std_svg(column: str, labels: Sequence[str], means: Sequence[float], stds: Sequence[float]) -> str:
    """Mean ± std per group as an inline SVG (one point and error bar per group)."""
    pts = [(i, m, 0.0 if math.isnan(s) else s) for i, (m, s) in enumerate(zip(means, stds, strict=True))]
    pts = [p for p in pts if not math.isnan(p[1])]
    lo = min((m - s for _, m, s in pts), default=0.0)
    hi = max((m + s for _, m, s in pts), default=1.0)
    x = _scale(0, max(1, len(labels) - 1), PAD, W - 10)
    y = _scale(lo, hi, H - 30, 12)
    out = [
        f'<svg id="chart-mean-{html.escape(column)}" class="chart" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(column)} mean ± std per group">',
        f"<title>{html.escape(column)}: mean ± std per group</title>",
        f'<line class="axis" x1="{PAD}" y1="{H - 30}" x2="{W - 10}" y2="{H - 30}"/>',
        f'<line class="axis" x1="{PAD}" y1="12" x2="{PAD}" y2="{H - 30}"/>',
        f'<text x="4" y="16">{hi:.3g}</text><text x="4" y="{H - 32}">{lo:.3g}</text>',
        f'<text x="{PAD}" y="{H - 12}">{html.escape(labels[0]) if labels else ""}</text>',
        f'<text x="{W - 10}" y="{H - 12}" text-anchor="end">'
        f"{html.escape(labels[-1]) if labels else ''}</text>",
    ]
    r = 2.5 if len(pts) <= 100 else 1.2
    for i, m, s in pts:
        cx = x(i)
        out.append(f'<line class="err" x1="{cx:.1f}" y1="{y(m - s):.1f}" x2="{cx:.1f}" y2="{y(m + s):.1f}"/>')
        out.append(
            f'<circle class="pt" cx="{cx:.1f}" cy="{y(m):.1f}" r="{r}">'
            f"<title>{html.escape(labels[i])}: {m:.6g} ± {s:.6g}</title></circle>"
        )
    out.append("</svg>")
    return "".join(out)


def histogram(values: Sequence[int], bins: int = 20) -> list[tuple[float, float, int]]:
    """Equal-width bins (low, high, count) over values; one bin when all are equal."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if lo == hi:
        return [(lo, hi, len(values))]
    span = hi - lo
    if all(isinstance(v, int) for v in values):
        span += 1  # integer sizes: each bin covers whole numbers, no empty in-between bins
        bins = min(bins, span)
    width = span / bins
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    return [(lo + i * width, lo + (i + 1) * width, c) for i, c in enumerate(counts)]


def sizes_svg(sizes: Sequence[int]) -> str:
    """The distribution of group sizes (rows per group) as an inline SVG histogram."""
    bins = histogram(sizes)
    top = max((c for _, _, c in bins), default=1)
    bw = (W - PAD - 10) / max(1, len(bins))
    y = _scale(0, top, H - 30, 12)
    out = [
        f'<svg id="chart-sizes" class="chart" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'role="img" aria-label="distribution of group sizes">',
        "<title>groups by number of rows</title>",
        f'<line class="axis" x1="{PAD}" y1="{H - 30}" x2="{W - 10}" y2="{H - 30}"/>',
        f'<text x="4" y="16">{top}</text><text x="4" y="{H - 32}">0</text>',
    ]
    for i, (a, b, c) in enumerate(bins):
        x0 = PAD + i * bw
        out.append(
            f'<rect class="bar" x="{x0 + 1:.1f}" y="{y(c):.1f}" width="{max(1.0, bw - 2):.1f}" '
            f'height="{(H - 30) - y(c):.1f}"><title>{a:.0f}–{b:.0f} rows: {c} groups</title></rect>'
        )
    if bins:
        out.append(f'<text x="{PAD}" y="{H - 12}">{bins[0][0]:.0f} rows</text>')
        out.append(f'<text x="{W - 10}" y="{H - 12}" text-anchor="end">{bins[-1][1]:.0f} rows</text>')
    out.append("</svg>")
    return "".join(out)


def table_html(frame: Any) -> str:
    """The per-group statistics as an HTML table."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for row in frame.itertuples(index=False, name=None):
        cells = "".join(
            f'<td class="{"nan" if isinstance(v, float) and math.isnan(v) else "v"}">{fmt(v)}</td>'
            for v in row
        )
        rows.append(f"<tr>{cells}</tr>")
    return f'<table id="stats"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render_report(dataset: str, manifest: dict[str, Any], frame: Any) -> str:
    """The whole report page as one HTML string."""
    contract = manifest.get("contract", {})
    group_by = list(contract.get("group_by", [])) or [str(frame.columns[0])]
    labels = group_labels(frame, group_by).tolist()
    charts = []
    for col in contract.get("values", []):
        mean, std = f"{col}_mean", f"{col}_std"
        if mean in frame.columns and std in frame.columns:
            charts.append(f"<h3>{html.escape(col)}</h3>")
            means, stds = frame[mean].astype(float).tolist(), frame[std].astype(float).tolist()
            charts.append(mean_std_svg(col, labels, means, stds))
    sizes = [int(v) for v in frame["rows"].tolist()] if "rows" in frame.columns else []
    e = html.escape
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>s3rollup report: {e(dataset)}</title><style>{CSS}</style></head><body>"
        f"<h1>s3rollup report: {e(dataset)}</h1>"
        f'<p class="meta">{len(frame)} groups (by {e(", ".join(group_by))}) from '
        f"{len(manifest.get('parts', []))} parts, {manifest.get('rows', 0)} rows; published "
        f"{e(str(manifest.get('generated_at', '')))} by job {e(str(manifest.get('job_id', ''))[:12])}; "
        f"{manifest.get('groups_suppressed', 0)} groups below the minimum size left out. "
        "Standard deviation is the sample standard deviation (ddof=1).</p>"
        "<h2>Mean ± std per group</h2>" + "".join(charts) + "<h2>Group sizes</h2>" + sizes_svg(sizes) + ""
        "<h2>Per-group statistics</h2>"
        f'<div class="scroll">{table_html(frame)}</div>'
        "</body></html>\n"
    )
