"""Telemetry chart rendered with PIL (no matplotlib): loss, emo_scalar and the variant's own signals, one panel
each, from a run folder's RunReader. Returns a ComfyUI IMAGE tensor [1, H, W, 3] float in 0..1."""

from __future__ import annotations

import math

from ._common import optimizer_info

WIDTH = 768
PANEL_H = 150
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 22, 18
COLORS = [(40, 110, 220), (220, 80, 40), (30, 160, 90), (150, 70, 200), (200, 150, 20), (20, 160, 170)]
SKIP = {"step", "t", "skipped", "skipped_total", "epoch", "step_time", "steps_per_s", "samples_per_s",
        "should_stop", "grad_scale"}
MAX_SIGNAL_PANELS = 4


def _numeric(rows: list[dict], key: str) -> list[tuple[int, float]]:
    out = []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append((int(r["step"]), float(v)))
    return out


def pick_series(rows: list[dict], optimizer: str | None) -> list[str]:
    """loss, emo_scalar (or lr), then the optimizer's declared signals that were logged and vary."""
    keys = ["loss"]
    keys.append("emo_scalar" if any("emo_scalar" in r for r in rows) else "lr")
    info = optimizer_info().get(optimizer or "")
    extra = [s for s in (info.signals if info else ()) if s not in keys and s not in SKIP]
    if not extra:  # unknown optimizer: a few logged numeric fields
        extra = ["lr", "grad_norm"]
    for key in extra:
        vals = [v for _, v in _numeric(rows, key)]
        if len(vals) >= 1 and len(set(vals)) > 1 and key not in keys:
            keys.append(key)
        if len(keys) >= 2 + MAX_SIGNAL_PANELS:
            break
    return keys


def render(rows: list[dict], optimizer: str | None = None, title: str = ""):
    """-> PIL.Image (RGB)."""
    from PIL import Image, ImageDraw, ImageFont

    keys = pick_series(rows, optimizer)
    h = PANEL_H * len(keys) + 24
    img = Image.new("RGB", (WIDTH, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((8, 4), title or f"EmoLoRA telemetry ({optimizer or '?'}, {len(rows)} steps)", fill=(0, 0, 0),
              font=font)
    steps = [int(r["step"]) for r in rows] or [0, 1]
    s0, s1 = min(steps), max(steps)
    if s1 == s0:
        s1 = s0 + 1
    for i, key in enumerate(keys):
        top = 24 + i * PANEL_H
        x0, x1, y0, y1 = PAD_L, WIDTH - PAD_R, top + PAD_T, top + PANEL_H - PAD_B
        draw.rectangle([x0, y0, x1, y1], outline=(180, 180, 180))
        pts = _numeric(rows, key)
        color = COLORS[i % len(COLORS)]
        draw.text((x0, top + 4), key, fill=color, font=font)
        if not pts:
            draw.text((x0 + 8, y0 + 8), "no data", fill=(120, 120, 120), font=font)
            continue
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        if hi - lo < 1e-12:  # a constant series: draw it mid-panel instead of dividing by zero
            lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
        draw.text((4, y0 - 2), f"{hi:.3g}", fill=(90, 90, 90), font=font)
        draw.text((4, y1 - 10), f"{lo:.3g}", fill=(90, 90, 90), font=font)
        if lo < 0 < hi:
            yz = y1 - (0 - lo) / (hi - lo) * (y1 - y0)
            draw.line([(x0, yz), (x1, yz)], fill=(225, 225, 225))
        xy = [(x0 + (s - s0) / (s1 - s0) * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0)) for s, v in pts]
        if len(xy) == 1:
            x, y = xy[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        else:
            draw.line(xy, fill=color, width=2)
        draw.text((x1 - 90, top + 4), f"last {pts[-1][1]:.4g}", fill=(90, 90, 90), font=font)
    draw.text((PAD_L, h - 14), f"step {s0}", fill=(90, 90, 90), font=font)
    draw.text((WIDTH - PAD_R - 70, h - 14), f"step {s1}", fill=(90, 90, 90), font=font)
    return img


def read_run(run_dir: str) -> tuple[list[dict], dict]:
    from ..trainer.runstore import RunReader

    reader = RunReader(run_dir)
    try:
        return reader.steps(), reader.meta()
    finally:
        reader.close()


def to_image_tensor(img):
    import numpy as np
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


def telemetry_image(run_dir: str):
    rows, meta = read_run(run_dir)
    name = meta.get("run_name") or ""
    title = f"EmoLoRA {name} - {meta.get('optimizer', '?')} - {len(rows)} steps ({meta.get('status', '?')})"
    return to_image_tensor(render(rows, meta.get("optimizer"), title))
