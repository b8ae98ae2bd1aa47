"""A run folder as the trainer writes it, without training: the panel tests' input."""

import os
import time
from pathlib import Path

from trainer.runstore import RunStore

V36 = ["loss", "ema_short", "ema_medium", "ema_long", "emo_scalar", "early_scalar", "trust", "emo_drive",
       "effective_lr", "coeff", "shadow_ratio", "shadow_active", "should_stop"]
ATG = ["lr_scale", "effective_lr", "mask_ema", "flip_ema", "thr", "confidence_mean", "danger_mean", "mask_ratio",
       "flip_ratio", "should_stop"]


def fake_run(runs_dir, name, optimizer="EmoNavi", signals=V36, steps=50, status="finished", use_shadow=False,
             pid=None, rise_at=None, lora=None):
    store = RunStore(Path(runs_dir) / name)
    store.write_config({"optimizer": optimizer, "steps": steps, "auto_stop": "stop",
                        "optimizer_args": {"use_shadow": use_shadow} if use_shadow else {}})
    store.set_meta(status=status, optimizer=optimizer, signals=signals, steps_total=steps,
                   pid=pid if pid is not None else os.getpid(), started_at=time.time(), lora_path=lora)
    for s in range(1, steps + 1):
        rec = {"loss": 1.0 / s + 0.1, "lr": 1e-4, "steps_per_s": 5.0, "rss_mb": 400.0, "rss_peak_mb": 410.0,
               "should_stop": bool(rise_at and s >= rise_at)}
        if "emo_scalar" in signals:
            sigma = 0.9 * (-1) ** s / s
            rec.update(ema_short=1.0 / s, ema_medium=1.1 / s, ema_long=1.2 / s, emo_scalar=sigma, trust=1 - abs(sigma),
                       emo_drive=1.0, effective_lr=1e-4 * (1 + s % 3), shadow_ratio=0.3 if s % 5 == 0 else 0.0,
                       shadow_active=s % 5 == 0)
        if "confidence_mean" in signals:
            rec.update(confidence_mean=0.5, mask_ema=0.1 * (s % 4), flip_ema=0.2, thr=0.5, danger_mean=0.3,
                       mask_ratio=0.4, flip_ratio=0.2, lr_scale=1.0, effective_lr=1e-4)
        store.log_step(s, rec)
        if rise_at == s:
            store.event(s, "should_stop", {"value": True, "auto_stop": "mark"})
    return store
