"""The emotion mechanics of the Emo family, written once (optimizers.md Part 2, B1-B6).

Everything here is plain python floats: the loss is the only host value an Emo optimizer needs, so the
emotional decisions cost no device work and no extra host syncs. Expressions keep upstream's exact float
order (the S33 branch test depends on last-bit rounding).
"""

import math
from collections import deque

FLOOR = 1e-5  # upstream's normaliser clamp for the loss EMAs


def update_ema(ema: dict, loss: float, medium: bool = True) -> dict:
    """B1: short/long (and medium) loss EMAs; a missing entry starts at the loss itself."""
    ema["short"] = 0.3 * loss + 0.7 * ema.get("short", loss)
    if medium:
        ema["medium"] = 0.05 * loss + 0.95 * ema.get("medium", loss)
    ema["long"] = 0.01 * loss + 0.99 * ema.get("long", loss)
    return ema


def scalar_s30(ema: dict) -> float:
    """S30 (v3.0, Clan/Zeal/Neco): positive means the loss is rising; depends on the loss scale."""
    return math.tanh(5 * (ema["short"] - ema["long"]))


def scalar_early(ema: dict) -> float:
    """S31 / early scalar: relative improvement rate, positive means the loss is falling."""
    return math.tanh(1 * ((ema["long"] - ema["short"]) / max(ema["long"], FLOOR)))


def scalar_s33(ema: dict) -> float:
    """S33, the medium-aware scalar. The medium branch is reached by rounding or the clamp only (as upstream)."""
    base_l = max(ema["long"], FLOOR)
    base_m = max(ema["medium"], FLOOR)
    diff_l = (ema["long"] - ema["short"]) / base_l
    diff_m = (ema["long"] - ema["short"]) / base_m
    if abs(diff_l) < 0.05:
        return math.tanh(diff_l)
    if abs(diff_m) * base_m < abs(diff_l) * base_l:
        return math.tanh(1 * diff_m)
    return math.tanh(1 * diff_l)


def trust(sigma: float) -> float:
    """B3: signed trust, |trust| = 1 - |sigma|."""
    return math.copysign(1.0 - abs(sigma), sigma)


def coeff36(sigma: float) -> float:
    return 1.0 - abs(sigma) if abs(sigma) > 0.25 else 1.0


def emo_drive(sigma: float) -> float:
    """B3: v3.6 emoDrive, an LR multiplier that accelerates in 0.25<|s|<0.5 and brakes above 0.75."""
    a = abs(sigma)
    if 0.25 < a < 0.5:
        tau = trust(sigma)
        return 8.0 * abs(tau) * (1.0 + 0.1 * tau)
    if a > 0.75:
        return coeff36(sigma)
    return 1.0


def drive_zone(sigma: float) -> str:
    a = abs(sigma)
    return "accel" if 0.25 < a < 0.5 else "brake" if a > 0.75 else "neutral"


def shadow_ratio36(sigma: float) -> float:
    """SH36: blend weight toward the shadow; 0 means 'lerp the shadow toward p' instead."""
    return 1.0 - abs(sigma) if abs(sigma) > 0.625 else 0.0


def shadow_ratio30(sigma: float) -> float:
    """SH30: the source's two-piece formula simplifies to |sigma| above 0.1."""
    return abs(sigma) if abs(sigma) > 0.1 else 0.0


def history_is_quiet(hist) -> tuple[bool, float, float]:
    """ES30/ES31: a full 32-entry history with small mean |s| and variance. Returns (quiet, avg_abs, var)."""
    n = len(hist)
    if n == 0:
        return False, 0.0, 0.0
    avg_abs = sum(abs(s) for s in hist) / n
    mean = sum(hist) / n
    var = sum((s - mean) ** 2 for s in hist) / n
    return n >= 32 and avg_abs < 0.05 and var < 0.005, avg_abs, var


def new_history() -> deque:
    return deque(maxlen=32)


class EmoPulse:
    """B6: the emoPulse LR estimator of the EmoSens line (and the EmoPulse scheduler), with the ESP stop rule."""

    FIELDS = ("emoScope", "dNR_hist", "noise_est", "d_est", "c_est")

    def __init__(self, scope: float, cap_scaled: bool = True):
        self.emoScope = scope
        self.cap_scaled = cap_scaled  # optimizers cap at scope*3e-3, the scheduler at an absolute 3e-3
        self.dNR_hist, self.noise_est, self.d_est, self.c_est = 1.0, 1.0, 0.02, 0.0
        self.last = {}

    def update(self, sigma: float, tau: float) -> float:
        self.noise_est = 0.97 * self.noise_est + 0.03 * abs(sigma)
        self.d_est = 0.97 * self.d_est + 0.03 * abs(tau)
        self.c_est = 0.7 * self.c_est + 0.3 * sigma
        noise = max(self.noise_est, 1e-10)
        n_b = abs(sigma - tau) + 0.1
        d_b = abs(noise - self.d_est) + 0.1
        r_now = (d_b / n_b) ** 2
        if r_now >= self.dNR_hist and tau >= 0.5:
            self.dNR_hist = min(r_now, self.dNR_hist * 1.50)
        elif -0.5 <= tau <= 0.5:
            self.dNR_hist = r_now * 0.80  # replaces, so it can also raise dNR_hist (upstream quirk)
        chain = self.emoScope * max(100 ** self.c_est, 0.01)
        cap = self.emoScope * 3e-3 if self.cap_scaled else 3e-3
        pulse = float(max(min(self.dNR_hist * (chain * 1e-4), cap), 1e-8))
        self.last = {"n_b": n_b, "d_b": d_b, "r_now": r_now, "emo_chain": chain}
        return pulse

    def ready_to_stop(self, medium: float, stopcoef: float) -> tuple[bool, float]:
        """ESP: recomputed every step, so the flag can fall again."""
        stop_base = self.d_est - self.noise_est
        return stop_base >= 0.3 and max(medium, FLOOR) <= stopcoef, stop_base

    def state(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    def load(self, state: dict) -> None:
        for k in self.FIELDS:
            if k in state:
                setattr(self, k, state[k])
