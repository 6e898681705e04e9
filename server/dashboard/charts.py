"""Small charts drawn in the page as inline SVG (no image round trip, nothing but numbers from the server)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from markupsafe import Markup, escape


def _date(seconds: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


def bar_chart(buckets: Sequence[tuple[float, float, int]], width: int = 640, height: int = 160,
              label: str = "events") -> Markup:
    """Bars of (start, end, count) in time order, with the first and last dates and the peak
    count on the axes; each bar's tooltip names its span and count."""
    pad_left, pad_bottom, pad_top = 36, 22, 10
    plot_w, plot_h = width - pad_left - 6, height - pad_bottom - pad_top
    peak = max((count for _, _, count in buckets), default=0)
    scale = plot_h / peak if peak else 0.0
    bar_w = plot_w / max(1, len(buckets))
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(label)} over time">',
        f'<line x1="{pad_left}" y1="{pad_top + plot_h}" x2="{width - 6}" y2="{pad_top + plot_h}" stroke="#888"/>',
        f'<text x="{pad_left - 4}" y="{pad_top + 8}" text-anchor="end" font-size="10">{peak}</text>',
        f'<text x="{pad_left - 4}" y="{pad_top + plot_h}" text-anchor="end" font-size="10">0</text>',
    ]
    for n, (start, end, count) in enumerate(buckets):
        bar_h = count * scale
        x = pad_left + n * bar_w
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{pad_top + plot_h - bar_h:.1f}" width="{max(1.0, bar_w - 2):.1f}" '
            f'height="{bar_h:.1f}" fill="#3a6ea5"><title>{_date(start)} – {_date(end)}: {count} {escape(label)}</title></rect>'
        )
    if buckets:
        parts.append(f'<text x="{pad_left}" y="{height - 6}" font-size="10">{_date(buckets[0][0])}</text>')
        parts.append(f'<text x="{width - 6}" y="{height - 6}" text-anchor="end" font-size="10">{_date(buckets[-1][1])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
