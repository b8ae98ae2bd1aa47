"""Which zone of its optimizer a step was in, from the step's recorded emo_scalar (sigma) and trust (tau).

The zones are where the loss changes the update (../shared/optimizers.md, trainer/optim/_emotion.py):
- v3.6 EmoNavi/EmoFact/EmoLynx, emoDrive: accel (0.25 < |s| < 0.5, LR x3.8-6.45), brake (|s| > 0.75, LR
  x(1-|s|)), neutral otherwise. (Their opt-in shadow blends where |s| > 0.625, inside neutral/brake.)
- v3.0 EmoZeal: plain (|s| <= 0.1), softsign (0.1 < |s| <= 0.6), cautious (|s| > 0.6); EmoNeco: softsign
  (0.2 < |s| <= 0.5), cautious otherwise; EmoClan: its phase, navi (|s| <= 0.3), fact (<= 0.6), lynx. The v3.0
  update is also scaled by 1 - |s|.
- v3.9 EmoSens line, emoPulse's noise/distance ratio dNR_hist: grow (tau >= 0.5: may grow up to x1.5 a step),
  reset (|tau| <= 0.5: replaced by 0.8 x the current ratio), hold (tau < -0.5: kept).
- RefAdamWminiScheduleFree, fed a loss: inject (its mid-run injection at ref_alpha 0.5, between 20% and 80% of the
  steps, pulls the weights toward 0), inject-jump (ref_alpha 0.6-1.0: the loss jumped by over 1.2x from the
  previous step), neutral (no injection: always, without a loss).
AdamW and AutoTrustGO never read the loss: no zones.
"""

from __future__ import annotations

import math

V36 = ("EmoNavi", "EmoFact", "EmoLynx")
V39 = ("EmoSens", "EmoAiry", "EmoCats", "EmoTion", "EmoVoid")
REFADAMW = "RefAdamWminiScheduleFree"
SIGNAL = {REFADAMW: "ref_alpha"}  # the record field a zone is read from; the Emo family's: emo_scalar


def zone(optimizer: str, value: float, tau: float | None = None) -> str | None:
    """The step's zone from its signal `value` (emo_scalar sigma; RefAdamW's ref_alpha) and trust tau; None for
    an optimizer without zones."""
    if optimizer == REFADAMW:
        return "inject-jump" if value > 0.5 else "inject" if value > 0 else "neutral"
    s = abs(value)
    if optimizer in V36:
        return "accel" if 0.25 < s < 0.5 else "brake" if s > 0.75 else "neutral"
    if optimizer == "EmoZeal":
        return "cautious" if s > 0.6 else "softsign" if s > 0.1 else "plain"
    if optimizer == "EmoNeco":
        return "softsign" if 0.2 < s <= 0.5 else "cautious"
    if optimizer == "EmoClan":
        return "lynx" if s > 0.6 else "fact" if s > 0.3 else "navi"
    if optimizer in V39:
        t = math.copysign(1.0 - s, value) if tau is None else tau
        return "grow" if t >= 0.5 else "hold" if t < -0.5 else "reset"
    return None


def zone_shares(optimizer: str, records) -> dict:
    """{zone: share of the steps} over the unskipped records that carry the optimizer's zone signal; {} without
    zones."""
    key = SIGNAL.get(optimizer, "emo_scalar")
    counts: dict = {}
    n = 0
    for r in records:
        value = r.get(key)
        if not isinstance(value, (int, float)) or r.get("skipped"):
            continue
        z = zone(optimizer, value, r.get("trust"))
        if z is None:
            return {}
        counts[z] = counts.get(z, 0) + 1
        n += 1
    return {z: c / n for z, c in sorted(counts.items())} if n else {}
