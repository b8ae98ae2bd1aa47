"""EmoTion v3.9.1: sign of a freshness-weighted gradient EMA at emoPulse (optimizers.md §10).

Freshness phi comes from the relative change of the group-0 L1 norm against a stored reference that
upstream multiplies by rho (a quirk that makes phi cycle 0.1, 1, 1); kept as is. weight_decay, beta2 and eps
are accepted and unused, as upstream.
"""

import torch

from ._tensors import LOW_PRECISION
from ._v39 import EmoV39
from ._wref import group0_l1


def tion_rule(p, g, st, pulse, alpha, keep):
    """m <- (1 - alpha) m + alpha g; p <- p - pulse sign(m). alpha/keep: floats, or 0-dim device tensors."""
    m = st["exp_avg"]
    if isinstance(alpha, float):
        m.mul_(keep).add_(g, alpha=alpha)
    else:
        m.mul_(keep).add_(g.mul(alpha))
    p.add_(m.sign(), alpha=-pulse)


class EmoTion(EmoV39):
    def __init__(self, params, lr=1.0, eps=1e-8, betas=(0.9, 0.995), *args, **kw):
        super().__init__(params, lr, eps, betas, *args, **kw)
        self.beta3 = 1.0 - betas[0]  # from the constructor betas, not the group's: upstream
        self.prev_gl1 = None
        self.g_freshness = 1.0  # a float, or in foreach mode a 0-dim float64 device tensor (no host read)

    def _init_moments(self, p, state):
        state["exp_avg"] = self._zeros(p)

    def _before_update(self):
        gl1 = group0_l1(self)
        if self.prev_gl1 is None:
            self.prev_gl1 = gl1
            self.g_freshness = 1.0
            return {"freshness": 1.0, "rho": 0.0}
        prev = self.prev_gl1.to(gl1.device)
        rho = (gl1 - prev).abs_().div_(prev + 1e-8)
        # upstream does this in python floats (double): the same on the device in float64
        fresh = torch.tanh(rho.double() / 0.03).clamp_min_(self.beta3)
        params = self.param_groups[0]["params"]
        # A host float per tensor (the CPU default) and for a low-precision m (state_dtype='param'): CUDA's
        # foreach kernels would round a tensor factor to bf16, upstream multiplies by a float32 one.
        device = self._uses_foreach(params) and self._compute_dtype(params[0]) not in LOW_PRECISION
        self.g_freshness = fresh if device else fresh.item()
        self.prev_gl1 = gl1 * rho
        return {"freshness": self.g_freshness, "rho": rho}

    def _update(self, group, items, pulse):
        alpha = (1.0 - group["betas"][0]) * self.g_freshness
        keep = 1.0 - alpha
        if torch.is_tensor(alpha) and items:  # the foreach kernels take a scalar tensor of the compute dtype
            dtype = self._compute_dtype(items[0][0])
            alpha, keep = alpha.to(dtype), keep.to(dtype)
        self._apply(tion_rule, items, ("exp_avg",), pulse=pulse, alpha=alpha, keep=keep)

    def _extra_state(self):
        return {**super()._extra_state(), "prev_gl1": self.prev_gl1, "g_freshness": self.g_freshness}

    def _load_extra_state(self, extra):
        super()._load_extra_state(extra)
        self.prev_gl1 = extra.get("prev_gl1")
        self.g_freshness = extra.get("g_freshness", 1.0)
