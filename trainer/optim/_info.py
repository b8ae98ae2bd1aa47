"""Per-optimizer metadata that the nodes, presets and panel read (optimizers.md Part 2 §16)."""

from dataclasses import dataclass

V36 = ("loss", "ema_short", "ema_medium", "ema_long", "emo_scalar", "early_scalar", "trust", "emo_drive",
       "effective_lr", "coeff", "shadow_ratio", "shadow_active", "should_stop")
V39 = ("loss", "ema_short", "ema_medium", "ema_long", "emo_scalar", "trust", "emo_pulse", "effective_lr",
       "noise_est", "d_est", "c_est", "dNR_hist", "stop_base", "scale_base_m", "shadow_ratio", "shadow_active",
       "should_stop")
V30 = ("loss", "emo_scalar", "emo_scalar_min", "emo_scalar_max", "effective_lr", "mode", "shadow_ratio",
       "shadow_active", "should_stop")


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    family: str  # "adam", "sign", "lion", "hybrid", "momentum"
    description: str
    upstream_version: str
    recommended_lr: float  # for SDXL LoRA; for the EmoSens line this is emoScope, not a step size
    state_per_param: str  # full-size state tensors per parameter, without shadow
    signals: tuple


_ROWS = [
    ("EmoNavi", "adam", "AdamW without bias correction, LR scaled by emoDrive from the loss trend", "3.6.1",
     6e-5, "2", V36),
    ("EmoFact", "sign", "sign-SGD with emoDrive; keeps Adafactor-style factored statistics", "3.6.1", 1e-4,
     "0 (>=2-D), 1 (1-D)", V36),
    ("EmoLynx", "lion", "Lion with emoDrive", "3.6.1", 8e-5, "1", V36),
    ("EmoClan", "hybrid", "switches between Navi, Fact and Lynx updates by the loss scalar", "3.0", 6e-5,
     "up to 3 (>=2-D), up to 5 (1-D)", V30 + ("phase",)),
    ("EmoZeal", "hybrid", "Adafactor-like update plus cautious/softsign steps in emotional zones", "3.0", 1e-4,
     "1 (>=2-D, never updated), 2 (1-D)", V30),
    ("EmoNeco", "lion", "cautious Lion with a softsign zone", "3.0", 8e-5, "1", V30),
    ("EmoSens", "adam", "AdamW without bias correction; step size from emoPulse (lr is emoScope)", "3.9.1", 1.0,
     "2", V39),
    ("EmoAiry", "sign", "sign-SGD at emoPulse; keeps Adafactor-style statistics", "3.9.1", 1.0,
     "0 (>=2-D), 1 (1-D)", V39),
    ("EmoCats", "lion", "Lion at emoPulse", "3.9.1", 1.0, "1", V39),
    ("EmoTion", "sign", "sign of a freshness-weighted gradient EMA at emoPulse", "3.9.1", 1.0, "1",
     V39 + ("freshness", "rho")),
    ("EmoVoid", "sign", "sign(g) at emoPulse with an L1-norm lock over the first 56 steps", "3.9.1", 1.0, "0",
     V39 + ("rescale", "warmup_count")),
    ("RefAdamWminiScheduleFree", "adam",
     "AdamW without bias correction, gradient-norm-ratio LR and mid-run momentum injection", "c7d276c", 1e-4,
     "2", ("loss", "auto_lr_mean", "ref_alpha", "progress", "divergence_level", "skip_ema", "should_stop")),
    ("AutoTrustGO", "momentum", "confidence-gated Nesterov-like momentum with a norm brake", "c82f70e", 1e-4,
     "2 + 1 int8", ("lr_scale", "effective_lr", "mask_ema", "flip_ema", "thr", "confidence_mean", "danger_mean",
                    "mask_ratio", "flip_ratio", "should_stop")),
]

OPTIMIZER_INFO = {r[0]: OptimizerInfo(*r) for r in _ROWS}
OPTIMIZER_INFO["AdamW"] = OptimizerInfo("AdamW", "adam", "torch.optim.AdamW, the baseline", "torch", 1e-4, "2",
                                        ("loss",))
