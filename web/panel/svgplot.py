"""Small SVG line charts: no plotting library, nothing fetched, a few kB of text per chart.

A chart is lines (gaps where a value is missing), shaded horizontal bands, horizontal and vertical rules and
markers, with a linear or log y axis. Long series are reduced to the min and max of each pixel column, so a
100k-step run draws as fast as a 100-step one and spikes stay visible.
"""

import math
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f", "#6b7280")


@dataclass
class Series:
    name: str
    xs: list
    ys: list
    color: str | None = None
    width: float = 1.6
    dash: str | None = None  # e.g. "5 3"
    opacity: float = 1.0


@dataclass
class Chart:
    title: str
    series: list = field(default_factory=list)
    bands: list = field(default_factory=list)  # (y0, y1, color, label)
    hlines: list = field(default_factory=list)  # (y, color)
    vlines: list = field(default_factory=list)  # (x, color, label)
    markers: list = field(default_factory=list)  # (name, xs, ys, color)
    y_range: tuple | None = None
    log_y: bool = False
    x_range: tuple | None = None
    note: str = ""  # shown when there is nothing to draw
    key: str = ""  # the chart's id (data-chart)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e")
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.4g}"


def reduce_points(xs, ys, buckets: int) -> list:
    """(x, y) pairs, None where a line breaks; at most ~2 points per bucket of the x range (min and max)."""
    pts = [(x, y if _finite(y) else None) for x, y in zip(xs, ys) if _finite(x)]
    if len(pts) <= 2 * buckets:
        return pts
    x0, x1 = pts[0][0], pts[-1][0]
    width = (x1 - x0) / buckets or 1.0
    out, cur, cur_b = [], [], None
    for x, y in pts:
        b = int((x - x0) / width)
        if b != cur_b and cur:
            out.extend(_extremes(cur))
            cur = []
        cur_b = b
        cur.append((x, y))
    if cur:
        out.extend(_extremes(cur))
    return out


def _extremes(chunk):
    vals = [p for p in chunk if p[1] is not None]
    if not vals:
        return [(chunk[0][0], None)]
    lo = min(vals, key=lambda p: p[1])
    hi = max(vals, key=lambda p: p[1])
    pts = [lo] if lo is hi else sorted((lo, hi), key=lambda p: p[0])
    if len(vals) < len(chunk):  # a gap in this column: break the line after it
        pts.append((chunk[-1][0], None))
    return pts


def render(chart: Chart, width: int = 640, height: int = 230) -> str:
    """The chart as an <svg> element (a string)."""
    left, right, top, bottom = 58, 12, 24, 34
    pw, ph = width - left - right, height - top - bottom
    colored = []
    for i, s in enumerate(chart.series):
        colored.append(s if s.color else Series(s.name, s.xs, s.ys, PALETTE[i % len(PALETTE)], s.width, s.dash,
                                                 s.opacity))
    legend_items = [(s.name, s.color, s.dash) for s in colored if s.name]
    legend_items += [(m[0], m[3], None) for m in chart.markers if m[0]]
    xs_all = [x for s in colored for x in s.xs if _finite(x)] + [m for mk in chart.markers for m in mk[1]
                                                                  if _finite(m)]
    ys_all = [y for s in colored for y in s.ys if _finite(y) and (not chart.log_y or y > 0)]
    ys_all += [y for mk in chart.markers for y in mk[2] if _finite(y) and (not chart.log_y or y > 0)]
    last_x = max(xs_all) if xs_all else 0
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="emolora-chart" data-chart="{escape(chart.key)}" '
            f'data-last-step="{int(last_x) if _finite(last_x) else 0}" data-points="{len(xs_all)}" '
            f'viewBox="0 0 {width} {height}" width="100%" preserveAspectRatio="xMidYMid meet" '
            f'style="max-width:{width}px;font-family:sans-serif;font-size:11px;background:#fff">')
    parts = [head, f'<text x="{left}" y="15" font-size="13" font-weight="600" fill="#111">{escape(chart.title)}'
                   f'</text>']
    if not xs_all or not ys_all:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#888">'
                     f'{escape(chart.note or "no data yet")}</text></svg>')
        return "".join(parts)
    # ---- ranges
    x0, x1 = chart.x_range or (min(xs_all), max(xs_all))
    if x1 <= x0:
        x1 = x0 + 1
    if chart.y_range:
        y0, y1 = chart.y_range
    else:
        y0, y1 = min(ys_all), max(ys_all)
        if chart.log_y:
            y0, y1 = math.log10(y0), math.log10(y1)
        pad = (y1 - y0) * 0.06 or (abs(y1) * 0.1 if y1 else 1.0)
        y0, y1 = y0 - pad, y1 + pad
        if chart.log_y:
            y0, y1 = 10 ** y0, 10 ** y1
    ty = (lambda v: math.log10(v)) if chart.log_y else (lambda v: v)
    ly0, ly1 = ty(y0), ty(y1)
    if ly1 <= ly0:
        ly1 = ly0 + 1

    def px(x):
        return left + (x - x0) / (x1 - x0) * pw

    def py(y):
        v = ty(y) if (not chart.log_y or y > 0) else ly0
        return top + (1 - (v - ly0) / (ly1 - ly0)) * ph

    clip = f"clip-{abs(hash((chart.key, chart.title))) % 10**8}"
    parts.append(f'<defs><clipPath id="{clip}"><rect x="{left}" y="{top}" width="{pw}" height="{ph}"/></clipPath>'
                 f'</defs>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#d4d4d4"/>')
    # ---- bands and grid
    for b0, b1, color, label in chart.bands:
        ya, yb = py(min(max(b1, y0), y1)), py(max(min(b0, y1), y0))
        if yb - ya > 0.5:
            parts.append(f'<rect x="{left}" y="{ya:.1f}" width="{pw}" height="{yb - ya:.1f}" fill="{color}">'
                         f'<title>{escape(label)}</title></rect>')
    if chart.log_y:
        yt = [10.0 ** e for e in range(math.floor(ly0), math.ceil(ly1) + 1) if ly0 <= e <= ly1] or [y0, y1]
    else:
        yt = nice_ticks(y0, y1, 4)
    for t in yt:
        yy = py(t)
        if top - 0.5 <= yy <= top + ph + 0.5:
            parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e5e5e5"/>'
                         f'<text x="{left - 4}" y="{yy + 4:.1f}" text-anchor="end" fill="#555">{fmt(t)}</text>')
    for t in nice_ticks(x0, x1, 6):
        if t == int(t):
            xx = px(t)
            parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top}" y2="{top + ph}" stroke="#efefef"/>'
                         f'<text x="{xx:.1f}" y="{top + ph + 14}" text-anchor="middle" fill="#555">{int(t)}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle" fill="#777">step</text>')
    body = [f'<g clip-path="url(#{clip})">']
    for y, color in chart.hlines:
        if y0 <= y <= y1:
            body.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="{color}" '
                        f'stroke-dasharray="3 3"/>')
    # ---- lines
    for s in colored:
        pts = reduce_points(s.xs, s.ys, max(50, int(pw)))
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        runs, cur = [], []
        for x, y in pts:
            if y is None or (chart.log_y and y <= 0):
                if cur:
                    runs.append(cur)
                cur = []
            else:
                cur.append(f"{px(x):.1f},{py(y):.1f}")
        if cur:
            runs.append(cur)
        for r in runs:
            if len(r) == 1:
                cx, cy = r[0].split(",")
                body.append(f'<circle cx="{cx}" cy="{cy}" r="1.8" fill="{s.color}" opacity="{s.opacity}"/>')
            else:
                body.append(f'<polyline data-series="{escape(s.name)}" points="{" ".join(r)}" fill="none" '
                            f'stroke="{s.color}" stroke-width="{s.width}" opacity="{s.opacity}"{dash} '
                            f'stroke-linejoin="round"/>')
    for name, mxs, mys, color in chart.markers:
        for x, y in zip(mxs, mys):
            if _finite(x) and _finite(y):
                body.append(f'<circle class="marker" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}" '
                            f'fill-opacity="0.75"><title>{escape(name)} @ {int(x)}</title></circle>')
    body.append("</g>")
    parts.extend(body)
    for x, color, label in chart.vlines:
        if x0 <= x <= x1:
            xx = px(x)
            parts.append(f'<line class="vline" x1="{xx:.1f}" x2="{xx:.1f}" y1="{top}" y2="{top + ph}" '
                         f'stroke="{color}" stroke-width="1.5" stroke-dasharray="5 3"><title>{escape(label)}</title>'
                         f'</line><text x="{xx + 3:.1f}" y="{top + 11}" fill="{color}">{escape(label)}</text>')
    # ---- legend (top right, one row)
    lx = width - right
    for name, color, dash in reversed(legend_items):
        label = escape(name)
        w = 8 + 6.2 * len(name) + 20
        lx -= w
        if lx < left + 6.5 * len(chart.title) + 10:
            break
        d = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<line x1="{lx:.1f}" x2="{lx + 14:.1f}" y1="11" y2="11" stroke="{color}" stroke-width="2.5"{d}/>'
                     f'<text x="{lx + 17:.1f}" y="15" fill="#333">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)
