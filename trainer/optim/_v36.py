"""The v3.6.1 emotion loop shared by EmoNavi, EmoFact and EmoLynx (optimizers.md §1-3).

One global 3-EMA of the loss, the S33 scalar, emoDrive as an LR multiplier, the SH36 shadow, and a
latched 32-step quiet-history stop flag. Subclasses supply `_update(group, items, drive)`.
"""

from . import _emotion as emo
from ._base import EmoOptimizer


def shadow36(p, g, st, ratio, tau_abs):
    """SH36, before the gradient update: blend p toward the shadow, or lerp the shadow toward p."""
    if ratio > 0:
        p.mul_(1 - ratio).add_(st["shadow"], alpha=tau_abs)
    else:
        st["shadow"].lerp_(p, 0.1 * tau_abs)


class EmoV36(EmoOptimizer):
    hist_of_early = False  # EmoNavi keeps the early scalar in its stop history, Fact/Lynx keep sigma
    writer_tags = {"emoLR/base": "lr", "emoLR/Turbo": "effective_lr", "emostate/emoDrive": "emo_drive",
                   "emostate/scalar": "emo_scalar"}

    def __init__(self, params, lr=1e-3, eps=1e-8, betas=(0.9, 0.995), weight_decay=0.01,
                 use_shadow: bool = False, writer=None, *, foreach=None, state_dtype=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, foreach=foreach, state_dtype=state_dtype, writer=writer)
        self.use_shadow = use_shadow
        self.ema = {}
        self.hist = emo.new_history()

    def _init_state(self, p, state, group):
        self._init_moments(p, state)
        if self.use_shadow:
            state["shadow"] = p.detach().to(self._compute_dtype(p), copy=True)

    def _init_moments(self, p, state):
        raise NotImplementedError

    def _step(self, loss):
        ema = emo.update_ema(self.ema, loss)
        early = emo.scalar_early(ema)
        sigma = emo.scalar_s33(ema)
        tau = emo.trust(sigma)
        ratio = emo.shadow_ratio36(sigma) if self.use_shadow else 0.0
        drive = emo.emo_drive(sigma)
        for group in self.param_groups:
            items = self._with_grad(group)
            if self.use_shadow:
                self._apply(shadow36, items, ("shadow",), ratio=ratio, tau_abs=abs(tau))
            self._update(group, items, drive)
        self.hist.append(early if self.hist_of_early else sigma)
        quiet, avg_abs, var = emo.history_is_quiet(self.hist)
        if quiet:
            self.should_stop = True  # latched, as upstream
        lr = self.param_groups[-1]["lr"]
        self._publish({
            "loss": loss, "ema_short": ema["short"], "ema_medium": ema["medium"], "ema_long": ema["long"],
            "emo_scalar": sigma, "early_scalar": early, "trust": tau, "emo_drive": drive,
            "drive_zone": emo.drive_zone(sigma), "lr": lr, "effective_lr": lr * drive,
            "coeff": emo.coeff36(sigma), "shadow_ratio": ratio, "shadow_active": ratio > 0,
            "hist_avg_abs": avg_abs, "hist_var": var,
        })

    def _update(self, group, items, drive):
        raise NotImplementedError
