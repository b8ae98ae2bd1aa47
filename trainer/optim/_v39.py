"""The v3.9.1 emotion loop shared by EmoSens, EmoAiry, EmoCats, EmoTion and EmoVoid (optimizers.md §7-11).

The group LR is not a learning rate but emoScope; emoPulse (B6) derives the step size from the loss
series every step and is written back into group['lr']. should_stop follows the ESP rule (B5), recomputed
every step. Unlike upstream, importing this never patches torch.Tensor.backward: the loss comes from
step(loss=...) or a closure.
"""

import logging

from . import _emotion as emo
from ._base import EmoOptimizer
from ._v36 import shadow36

log = logging.getLogger("emolora.optim")


class EmoV39(EmoOptimizer):
    def __init__(self, params, lr=1.0, eps=1e-8, betas=(0.9, 0.995), weight_decay=0.01, stopcoef=0.04,
                 use_shadow: bool = False, notify: bool = True, *, foreach=None, state_dtype=None, writer=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, foreach=foreach, state_dtype=state_dtype, writer=writer)
        self._init_lr = lr
        self.stopcoef = stopcoef
        self.use_shadow = use_shadow
        self.notify = notify
        self.ema = {}
        self.pulse = emo.EmoPulse(lr)

    def _init_state(self, p, state, group):
        self._init_moments(p, state)
        if self.use_shadow:
            state["shadow"] = p.detach().to(self._compute_dtype(p), copy=True)

    def _init_moments(self, p, state):
        pass

    def _step(self, loss):
        ema = emo.update_ema(self.ema, loss)
        sigma = emo.scalar_s33(ema)
        tau = emo.trust(sigma)
        ratio = emo.shadow_ratio36(sigma) if self.use_shadow else 0.0
        pulse = self.pulse.update(sigma, tau)
        extra = self._before_update()
        for group in self.param_groups:
            items = self._with_grad(group)
            if self.use_shadow:
                self._apply(shadow36, items, ("shadow",), ratio=ratio, tau_abs=abs(tau))
            self._update(group, items, pulse)
        for group in self.param_groups:
            group["lr"] = pulse
        stop, stop_base = self.pulse.ready_to_stop(ema["medium"], self.stopcoef)
        if stop and not self.should_stop:
            self._on_stop_edge()
            if self.notify:
                log.info("%s: ready to stop (emoPulse %.3e)", type(self).__name__, pulse)
        self.should_stop = stop
        self._publish({
            "loss": loss, "ema_short": ema["short"], "ema_medium": ema["medium"], "ema_long": ema["long"],
            "emo_scalar": sigma, "trust": tau, "emo_pulse": pulse, "effective_lr": pulse,
            "pulse_cap_fraction": pulse / (self.pulse.emoScope * 3e-3),
            "noise_est": self.pulse.noise_est, "d_est": self.pulse.d_est, "c_est": self.pulse.c_est,
            "dNR_hist": self.pulse.dNR_hist, **self.pulse.last, "stop_base": stop_base,
            "scale_base_m": max(ema["medium"], emo.FLOOR), "shadow_ratio": ratio, "shadow_active": ratio > 0,
            **extra,
        })

    def _before_update(self) -> dict:
        return {}

    def _on_stop_edge(self):
        pass

    def _update(self, group, items, pulse):
        raise NotImplementedError

    def _extra_state(self):
        return {**super()._extra_state(), **self.pulse.state(), "stopcoef": self.stopcoef}

    def _load_extra_state(self, extra):
        super()._load_extra_state(extra)
        self.pulse.load(extra)
        self.stopcoef = extra.get("stopcoef", self.stopcoef)
