"""The v3.0 emotion of EmoZeal and EmoNeco (optimizers.md §5-6, B1/B2/B4/B5).

Each parameter keeps its own 2-EMA of the loss (updated only when it has a gradient), so sigma is
per parameter (S30: positive means the loss is rising). The stop history gets one sigma per parameter
per step (ES30, latched), and the optional shadow follows SH30. Parameters whose sigma is equal (all of
them, unless some missed gradients) are updated together.
"""

from . import _emotion as emo
from ._base import EmoOptimizer


def sh30_ratio(sigma: float) -> float:
    """SH30 as the source writes it (it simplifies to |sigma|, but not bit for bit)."""
    a = abs(sigma)
    if a > 0.6:
        return 0.6 + (a - 0.6) / 0.4 * 0.4
    if a > 0.1:
        return 0.1 + (a - 0.1) / 0.5 * 0.5
    return 0.0


def shadow30_rule(p, g, st, ratio):
    """SH30 blend, then the shadow follows p (in the compute dtype: a bf16 p is rounded once, on write-back)."""
    shadow = st["shadow"]
    p.mul_(1 - ratio).add_(shadow, alpha=ratio)
    shadow.lerp_(p, 0.05)


def shadow30(opt, items, ratio):
    """SH30 over items sharing one ratio: a missing shadow is created as a copy of p (the lerp toward p that
    follows upstream's creation leaves it unchanged), the others blend as one foreach call."""
    if ratio <= 0:
        return
    blend = []
    for item in items:
        p, _, st = item
        if "shadow" in st:
            blend.append(item)
        else:
            st["shadow"] = p.detach().to(opt._compute_dtype(p), copy=True)
    opt._apply(shadow30_rule, blend, ("shadow",), ratio=ratio)


def softsign(x):
    """x / (1 + |x|), as methods so it also runs on a Batched."""
    return x.div(x.abs().add_(1))


class EmoV30(EmoOptimizer):
    def __init__(self, params, defaults, use_shadow=False, **kw):
        super().__init__(params, defaults, **kw)
        self.use_shadow = use_shadow
        self.hist = emo.new_history()

    def _step(self, loss):
        sigmas = []
        for group in self.param_groups:
            by_sigma = {}
            for item in self._with_grad(group):
                sigma = emo.scalar_s30(emo.update_ema(item[2].setdefault("ema", {}), loss, medium=False))
                by_sigma.setdefault(sigma, []).append(item)
                self.hist.append(sigma)
                sigmas.append(sigma)
            for sigma, items in by_sigma.items():
                if self.use_shadow:
                    shadow30(self, items, sh30_ratio(sigma))
                self._update(group, items, sigma)
        quiet, avg_abs, var = emo.history_is_quiet(self.hist)
        if quiet:
            self.should_stop = True
        lr = self.param_groups[0]["lr"]
        s = sigmas[-1] if sigmas else 0.0
        self._publish({"loss": loss, "emo_scalar": s, "emo_scalar_min": min(sigmas, default=0.0),
                       "emo_scalar_max": max(sigmas, default=0.0), "effective_lr": lr * (1 - abs(s)),
                       "mode": self._mode(s), "shadow_ratio": sh30_ratio(s) if self.use_shadow else 0.0,
                       "shadow_active": self.use_shadow and sh30_ratio(s) > 0,
                       "hist_avg_abs": avg_abs, "hist_var": var})

    def _mode(self, sigma) -> str:
        return ""

    def _update(self, group, items, sigma):
        raise NotImplementedError
