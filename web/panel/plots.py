"""The panel's charts, built from RunData: only the series the run's optimizer has.

    loss      loss with its short/medium/long EMAs (the optimizer's own, or the same rates computed here),
              eval loss markers, the validation loss, and the compared run's loss
    emo       emo_scalar over the emoDrive zones (|sigma| 0.25 / 0.5 / 0.75)
    lr        the base LR and the effective one (lr x emoDrive, or emoPulse for the EmoSens line)
    shadow    shadow blend ratio and blend events, when use_shadow is on
    trust     AutoTrustGO's confidence mean, mask_ema, flip_ema, threshold and danger
    motion    how far each update moved the LoRA (update_ratio = |update| / |LoRA|, log scale) beside the
              "barely moving" threshold, and the compared run's
    more      any other numeric signals chosen in the panel (steps/s, memory, grad_norm, noise_est ...)
Every chart marks the steps where should_stop rose.
"""

from ...trainer.telemetry import BARELY_MOVING
from .svgplot import Chart, Series, render

RISE_COLOR = "#b91c1c"
ZONES = [  # emoDrive (v3.6): accelerate in 0.25 < |s| < 0.5, brake above 0.75
    (0.25, 0.5, "rgba(34,197,94,0.13)", "emoDrive accelerates (0.25 < |sigma| < 0.5)"),
    (-0.5, -0.25, "rgba(34,197,94,0.13)", "emoDrive accelerates (0.25 < |sigma| < 0.5)"),
    (0.5, 0.75, "rgba(250,204,21,0.10)", "0.5 < |sigma| < 0.75"),
    (-0.75, -0.5, "rgba(250,204,21,0.10)", "0.5 < |sigma| < 0.75"),
    (0.75, 1.0, "rgba(239,68,68,0.14)", "emoDrive brakes (|sigma| > 0.75)"),
    (-1.0, -0.75, "rgba(239,68,68,0.14)", "emoDrive brakes (|sigma| > 0.75)"),
]
TRUST_SIGNALS = ("confidence_mean", "mask_ema", "flip_ema", "thr", "danger_mean", "mask_ratio", "flip_ratio")
PLOTTED = {"loss", "ema_short", "ema_medium", "ema_long", "eval_loss", "val_loss", "emo_scalar", "emo_scalar_min",
           "emo_scalar_max", "lr", "effective_lr", "emo_pulse", "shadow_ratio", "update_ratio", *TRUST_SIGNALS}
CHART_KEYS = ("loss", "emo", "lr", "shadow", "trust", "motion", "more")


def _rises(rd) -> list:
    return [(s, RISE_COLOR, f"should_stop ({mode or '?'})") for s, mode in rd.should_stop_rises() if s is not None]


def _label(rd) -> str:
    opt = rd.meta.get("optimizer") or rd.config.get("optimizer") or "?"
    return f"{rd.run_dir.name} ({opt})"


def _points(rd, name: str) -> list:
    xs, ys = rd.series(name)
    return [(x, y) for x, y in zip(xs, ys) if y is not None]


def loss_chart(rd, other=None) -> Chart:
    c = Chart("loss", key="loss", vlines=_rises(rd))
    xs, ys = rd.series("loss")
    c.series.append(Series("loss", xs, ys, "#9ca3af", 1.0, opacity=0.8))
    own = "ema_medium" in rd.cols
    for name, color in (("ema_short", "#2563eb"), ("ema_medium", "#16a34a"), ("ema_long", "#9333ea")):
        sx, sy = rd.series(name)
        c.series.append(Series(name if own else f"{name}*", sx, sy, color, 1.8))
    pts = _points(rd, "eval_loss")
    if pts:
        c.markers.append(("eval", [p[0] for p in pts], [p[1] for p in pts], "#ea580c"))
    runs = [(rd, "validation loss", "#dc2626")] + ([(other, f"{_label(other)} validation loss", "#7f1d1d")]
                                                   if other is not None else [])
    for run, name, color in runs:
        pts = _points(run, "val_loss")
        if pts:  # logged every N steps: one line through its points
            c.series.append(Series(name, [p[0] for p in pts], [p[1] for p in pts], color, 1.8, dash="2 2"))
    if other is not None:
        ox, oy = other.series("loss")
        c.series.append(Series(f"{_label(other)} loss", ox, oy, "#f59e0b", 0.8, opacity=0.5))
        mx, my = other.series("ema_medium")
        c.series.append(Series(f"{_label(other)} ema_medium", mx, my, "#b45309", 1.8, dash="6 3"))
    if not own:
        c.note = "* EMAs computed by the panel"
    return c


def emo_chart(rd, other=None) -> Chart | None:
    if "emo_scalar" not in rd.signals() and not rd.has("emo_scalar"):
        return None
    c = Chart("emo_scalar (sigma) and the emoDrive zones", key="emo", bands=list(ZONES), y_range=(-1.0, 1.0),
              hlines=[(0.0, "#999")], vlines=_rises(rd))
    if rd.has("emo_scalar_min"):
        c.series.append(Series("min", *rd.series("emo_scalar_min"), "#93c5fd", 1.0, opacity=0.7))
        c.series.append(Series("max", *rd.series("emo_scalar_max"), "#fca5a5", 1.0, opacity=0.7))
    c.series.append(Series("emo_scalar", *rd.series("emo_scalar"), "#2563eb", 1.8))
    if other is not None and other.has("emo_scalar"):
        c.series.append(Series(f"{_label(other)}", *other.series("emo_scalar"), "#b45309", 1.4, dash="6 3"))
    return c


def lr_chart(rd, other=None) -> Chart | None:
    sig = rd.signals()
    c = Chart("learning rate", key="lr", vlines=_rises(rd))
    pulse = "emo_pulse" in sig or rd.has("emo_pulse")
    if pulse:
        c.title = "step size: emoPulse (lr is emoScope)"
        c.series.append(Series("emoPulse", *rd.series("emo_pulse"), "#dc2626", 1.8))
    else:
        c.series.append(Series("lr", *rd.series("lr"), "#6b7280", 1.4))
        if "effective_lr" in sig or rd.has("effective_lr"):
            label = "lr x emoDrive" if "emo_drive" in sig else "effective lr"
            c.series.append(Series(label, *rd.series("effective_lr"), "#dc2626", 1.8))
    vals = [v for s in c.series for v in s.ys if isinstance(v, (int, float)) and v > 0]
    c.log_y = bool(vals) and max(vals) / min(vals) > 20
    return c


def shadow_chart(rd, other=None) -> Chart | None:
    if not rd.use_shadow():
        return None
    c = Chart("shadow: blend ratio and blend events", key="shadow", vlines=_rises(rd))
    xs, ys = rd.series("shadow_ratio")
    c.series.append(Series("blend ratio", xs, ys, "#0891b2", 1.6))
    _, active = rd.series("shadow_active")
    ev = [(x, y) for x, y, a in zip(xs, ys, active) if a]
    c.markers.append(("blend", [p[0] for p in ev], [p[1] for p in ev], "#be185d"))
    return c


def trust_chart(rd, other=None) -> Chart | None:
    present = [s for s in TRUST_SIGNALS if s in rd.signals() or rd.has(s)]
    if "confidence_mean" not in present:
        return None
    c = Chart("AutoTrustGO: confidence, mask, flips, threshold, danger", key="trust", vlines=_rises(rd))
    colors = {"confidence_mean": "#2563eb", "mask_ema": "#16a34a", "flip_ema": "#dc2626", "thr": "#6b7280",
              "danger_mean": "#ea580c", "mask_ratio": "#86efac", "flip_ratio": "#fca5a5"}
    names = {"confidence_mean": "confidence", "danger_mean": "danger", "thr": "threshold"}
    for s in present:
        thin = s in ("mask_ratio", "flip_ratio")
        c.series.append(Series(names.get(s, s), *rd.series(s), colors[s], 1.0 if thin else 1.8,
                               dash="4 3" if s == "thr" else None, opacity=0.7 if thin else 1.0))
    return c


def motion_chart(rd, other=None) -> Chart | None:
    """Per-step update/weight ratio (it spans ~1e-6 .. 1e-2 across optimizers and LRs: log scale); the band under
    the warning's threshold (which the trainer applies to the mean over the first 5% of the steps)."""
    if not rd.has("update_ratio"):
        return None
    band = (0.0, BARELY_MOVING, "rgba(239,68,68,0.12)", f"barely moving (under {BARELY_MOVING:g} a step)")
    c = Chart("update/weight ratio per step (|LoRA update| / |LoRA|)", key="motion", log_y=True, bands=[band],
              hlines=[(BARELY_MOVING, RISE_COLOR)], vlines=_rises(rd))
    c.series.append(Series("update ratio", *rd.series("update_ratio"), "#0f766e", 1.4))
    if other is not None and other.has("update_ratio"):
        c.series.append(Series(_label(other), *other.series("update_ratio"), "#b45309", 1.2, dash="6 3"))
    return c


def more_chart(rd, names) -> Chart | None:
    names = [n for n in (names or []) if n in rd.cols]
    if not names:
        return None
    c = Chart("more signals", key="more", vlines=_rises(rd))
    for n in names:
        c.series.append(Series(n, *rd.series(n)))
    return c


def more_choices(rd) -> list:
    return [k for k in rd.numeric_keys() if k not in PLOTTED]


def default_more(rd) -> list:
    choices = more_choices(rd)
    prefer = ["stop_base", "noise_est", "d_est", "auto_lr_mean", "divergence_level", "steps_per_s"]
    return [p for p in prefer if p in choices][:3]


def charts(rd, other=None, more=None) -> dict:
    """key -> Chart or None (not drawn for this optimizer)."""
    return {"loss": loss_chart(rd, other), "emo": emo_chart(rd, other), "lr": lr_chart(rd, other),
            "shadow": shadow_chart(rd, other), "trust": trust_chart(rd, other), "motion": motion_chart(rd, other),
            "more": more_chart(rd, more)}


def svg(chart: Chart | None) -> str:
    return render(chart) if chart is not None else ""
