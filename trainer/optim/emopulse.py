"""EmoPulseScheduler v1.0.0: emoPulse as an LR scheduler for any optimizer, AdamW included (§12).

step(loss) feeds the loss, sets every group's lr to emoPulse (used by the next optimizer.step()) and
updates the ESP should_stop flag. The cap is the absolute 3e-3 (the optimizers cap at emoScope*3e-3), as
upstream. Upstream falls back to a process-wide backward() capture when no loss is given; here a missing
loss counts as 0 with a warning, and nothing is patched.
"""

import logging
import math

from . import _emotion as emo

log = logging.getLogger("emolora.optim")


class EmoPulseScheduler:
    def __init__(self, optimizer, base_lr=1.0, stopcoef=0.04, notify: bool = True):
        self.optimizer = optimizer
        self._init_lr = base_lr
        self.stopcoef = stopcoef
        self.notify = notify
        self.should_stop = False
        self.ema = {}
        self.pulse = emo.EmoPulse(base_lr, cap_scaled=False)
        self.last_lr = None
        self.telemetry = {}
        self._warned = False

    def step(self, loss_val=None) -> float:
        if loss_val is None:
            if not self._warned:
                self._warned = True
                log.warning("EmoPulseScheduler.step() got no loss: it feels nothing (loss 0). Pass the loss.")
            loss_val = 0.0
        loss_val = float(loss_val)
        if not math.isfinite(loss_val):
            return self.last_lr
        ema = emo.update_ema(self.ema, loss_val)
        sigma = emo.scalar_s33(ema)
        tau = emo.trust(sigma)
        pulse = self.pulse.update(sigma, tau)
        for group in self.optimizer.param_groups:
            group["lr"] = pulse
        stop, stop_base = self.pulse.ready_to_stop(ema["medium"], self.stopcoef)
        if stop and not self.should_stop and self.notify:
            log.info("EmoPulseScheduler: ready to stop (emoPulse %.3e)", pulse)
        self.should_stop = stop
        self.last_lr = pulse
        self.telemetry = {"loss": loss_val, "emo_scalar": sigma, "trust": tau, "emo_pulse": pulse,
                          "noise_est": self.pulse.noise_est, "d_est": self.pulse.d_est, "c_est": self.pulse.c_est,
                          "dNR_hist": self.pulse.dNR_hist, "stop_base": stop_base,
                          "scale_base_m": max(ema["medium"], emo.FLOOR), "should_stop": stop}
        return pulse

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        return {"emo_internal": {**self.pulse.state(), "should_stop": self.should_stop, "stopcoef": self.stopcoef},
                "scheduler_state": {"ema": dict(self.ema)}, "last_lr": self.last_lr}

    def load_state_dict(self, state_dict):
        internal = state_dict.get("emo_internal") or {}
        self.pulse.load(internal)
        self.should_stop = internal.get("should_stop", False)
        self.stopcoef = internal.get("stopcoef", self.stopcoef)
        self.ema = dict((state_dict.get("scheduler_state") or {}).get("ema", {}))
        self.last_lr = state_dict.get("last_lr")
