"""Small inline SVG charts for the dashboard (no plotting library in the web process).

``line_chart`` draws one series of ``Point``s (x: labels used, y: a share from 0 to 1) with
axes, ticks and a tooltip per point. Every text that reaches the markup is escaped.
"""

from __future__ import annotations

import dataclasses
import math

from markupsafe import Markup, escape

WIDTH, HEIGHT = 460, 220
MARGIN = {"left": 48, "right": 20, "top": 14, "bottom": 38}
MAX_NAMED_POINTS = 12  # more than this and the version names would overlap


@dataclasses.dataclass(frozen=True)
class Point:
    """One point: ``x`` labels used, ``y`` a share in [0, 1], ``label`` its tooltip title."""

    x: float
    y: float
    label: str


def _ticks(low: float, high: float, count: int = 5, whole: bool = False) -> list[float]:
    """About ``count`` round tick values covering [low, high] (whole numbers only if asked)."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if whole:
        step = max(1, math.ceil(step))
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _number(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:g}"


def line_chart(points: list[Point], *, x_label: str, y_label: str, css_class: str = "") -> Markup:
    """An SVG line chart of ``points`` (sorted by x here), y drawn as a percentage.

    Returns an empty-chart SVG with "no data" when ``points`` is empty.
    """
    left, right = MARGIN["left"], WIDTH - MARGIN["right"]
    top, bottom = MARGIN["top"], HEIGHT - MARGIN["bottom"]
    points = sorted(points, key=lambda p: (p.x, p.label))
    xs = [p.x for p in points]
    x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_high == x_low:
        x_low, x_high = max(0.0, x_low - 1), x_high + 1
    whole = all(float(x).is_integer() for x in xs)
    x_ticks = [t for t in _ticks(x_low, x_high, whole=whole) if x_low <= t <= x_high]
    x_ticks = x_ticks or [x_low, x_high]

    def sx(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * (right - left)

    def sy(y: float) -> float:
        return bottom - max(0.0, min(1.0, y)) * (bottom - top)

    parts = [
        f'<svg class="chart {escape(css_class)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(y_label)} by '
        f'{escape(x_label)}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for y in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<line class="grid" x1="{left}" x2="{right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}"/>'
            f'<text class="tick" x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">'
            f"{y:.0%}</text>"
        )
    for x in x_ticks:
        parts.append(
            f'<line class="tickmark" x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{bottom}" '
            f'y2="{bottom + 4}"/><text class="tick" x="{sx(x):.1f}" y="{bottom + 16}" '
            f'text-anchor="middle">{escape(_number(x))}</text>'
        )
    parts.append(
        f'<line class="axis" x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}"/>'
        f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{bottom}"/>'
        f'<text class="axis-label" x="{(left + right) / 2:.0f}" y="{HEIGHT - 6}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
        f'<text class="axis-label" transform="translate(12 {(top + bottom) / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    if not points:
        parts.append(
            f'<text class="empty" x="{(left + right) / 2:.0f}" y="{(top + bottom) / 2:.0f}" '
            'text-anchor="middle">no data yet</text></svg>'
        )
        return Markup("".join(parts))
    path = " ".join(f"{sx(p.x):.1f},{sy(p.y):.1f}" for p in points)
    parts.append(f'<polyline class="line" points="{path}"/>')
    named = len(points) <= MAX_NAMED_POINTS
    for p in points:
        title = f"{p.label}: {p.y:.1%} at {_number(p.x)} labels"
        parts.append(
            f'<circle class="point" cx="{sx(p.x):.1f}" cy="{sy(p.y):.1f}" r="4">'
            f"<title>{escape(title)}</title></circle>"
        )
        if named:  # "v7" for "resnet18-v7"; the tooltip has the whole name
            short = p.label.split()[0].rsplit("-", 1)[-1]
            y = sy(p.y) - 8 if p.y < 0.9 else sy(p.y) + 16
            parts.append(
                f'<text class="point-label" x="{sx(p.x):.1f}" y="{y:.1f}" '
                f'text-anchor="middle">{escape(short)}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))
