"""EmoTion v3.9.1: sign of a freshness-weighted gradient EMA at emoPulse (optimizers.md §10).

Freshness phi comes from the relative change of the group-0 L1 norm against a stored reference that
upstream multiplies by rho (a quirk that makes phi cycle 0.1, 1, 1); kept as is. weight_decay, beta2 and eps
are accepted and unused, as upstream.
"""

import math

from ._v39 import EmoV39
from ._wref import group0_l1


def tion_rule(p, g, st, pulse, alpha):
    m = st["exp_avg"]
    m.mul_(1.0 - alpha).add_(g, alpha=alpha)
    p.add_(m.sign(), alpha=-pulse)


class EmoTion(EmoV39):
    def __init__(self, params, lr=1.0, eps=1e-8, betas=(0.9, 0.995), *args, **kw):
        super().__init__(params, lr, eps, betas, *args, **kw)
        self.beta3 = 1.0 - betas[0]  # from the constructor betas, not the group's: upstream
        self.prev_gl1 = None
        self.g_freshness = 1.0

    def _init_moments(self, p, state):
        state["exp_avg"] = self._zeros(p)

    def _before_update(self):
        gl1 = group0_l1(self)
        rho = None
        if self.prev_gl1 is not None:
            prev = self.prev_gl1.to(gl1.device)
            rho = (abs(gl1 - prev) / (prev + 1e-8)).item()  # the one host sync EmoTion needs
            self.g_freshness = max(math.tanh(rho / 0.03), self.beta3)
            gl1 = gl1 * rho
        else:
            self.g_freshness = 1.0
        self.prev_gl1 = gl1
        return {"freshness": self.g_freshness, "rho": rho if rho is not None else 0.0}

    def _update(self, group, items, pulse):
        alpha = (1.0 - group["betas"][0]) * self.g_freshness
        self._apply(tion_rule, items, ("exp_avg",), pulse=pulse, alpha=alpha)

    def _extra_state(self):
        return {**super()._extra_state(), "prev_gl1": self.prev_gl1, "g_freshness": self.g_freshness}

    def _load_extra_state(self, extra):
        super()._load_extra_state(extra)
        self.prev_gl1 = extra.get("prev_gl1")
        self.g_freshness = extra.get("g_freshness", 1.0)
