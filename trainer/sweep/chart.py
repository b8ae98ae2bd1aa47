"""sweep.png: the runs' validation curves overlaid, one colour per optimizer, dashed for the loss withheld,
dotted for the normalized loss. Drawn with PIL (no plotting library)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from ..atomic import atomic_write

W, H = 960, 540
PAD_L, PAD_R, PAD_T, PAD_B = 70, 220, 20, 40
COLORS = [(40, 110, 220), (220, 80, 40), (30, 160, 90), (150, 70, 200), (200, 150, 20), (20, 160, 170),
          (200, 60, 140), (110, 110, 110), (120, 80, 30), (0, 0, 0), (90, 180, 230), (240, 130, 170),
          (160, 200, 60), (80, 40, 160)]
DASH = {"raw": None, "normalized": (2, 4), "withheld": (9, 6)}


def _polyline(draw, pts, color, dash):
    if dash is None:
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        return
    on, off = dash
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < length:
            end = min(length, pos + on)
            a, b = pos / length, end / length
            draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                      fill=color, width=2)
            pos += on + off


def draw(curves: list, path) -> str:
    """curves: [{"label", "optimizer", "optimizer_loss", "points": [(step, val_loss), ...]}] -> path written."""
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = [p for c in curves for p in c["points"] if math.isfinite(p[1])]
    x0, x1, y0, y1 = PAD_L, W - PAD_R, PAD_T, H - PAD_B
    d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    d.text((x0, H - 18), "step", fill=(0, 0, 0))
    d.text((x0 + 4, 4), "validation loss", fill=(0, 0, 0))
    if pts:
        smax = max(1, max(s for s, _ in pts))
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * abs(lo or 1) * 1e-3, hi + 0.5 * abs(hi or 1) * 1e-3
        pad = (hi - lo) * 0.05
        lo, hi = lo - pad, hi + pad

        def xy(s, v):
            return x0 + (x1 - x0) * s / smax, y1 - (y1 - y0) * (v - lo) / (hi - lo)

        for k in range(5):
            v = lo + (hi - lo) * k / 4
            y = xy(0, v)[1]
            d.line([(x0 - 4, y), (x0, y)], fill=(0, 0, 0))
            d.text((4, y - 6), f"{v:.4g}", fill=(0, 0, 0))
        d.text((x1 - 30, y1 + 4), str(smax), fill=(0, 0, 0))
        d.text((x0, y1 + 4), "0", fill=(0, 0, 0))
        colors: dict = {}
        for c in curves:
            color = colors.setdefault(c["optimizer"], COLORS[len(colors) % len(COLORS)])
            line = [xy(s, v) for s, v in c["points"] if math.isfinite(v)]
            _polyline(d, line, color, DASH.get(c["optimizer_loss"]))
        ly = y0
        for opt, color in colors.items():
            d.line([(x1 + 10, ly + 6), (x1 + 40, ly + 6)], fill=color, width=3)
            d.text((x1 + 46, ly), opt, fill=(0, 0, 0))
            ly += 16
        for mode, dash in DASH.items():
            _polyline(d, [(x1 + 10, ly + 22), (x1 + 40, ly + 22)], (0, 0, 0), dash)
            d.text((x1 + 46, ly + 16), f"loss {mode}", fill=(0, 0, 0))
            ly += 16
    atomic_write(path, lambda tmp: img.save(tmp, "PNG"))
    return str(path)
