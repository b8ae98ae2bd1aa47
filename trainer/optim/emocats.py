"""EmoCats v3.9.1: Lion at emoPulse (optimizers.md §9)."""

from ._v39 import EmoV39


def cats_rule(p, g, st, pulse, b1, b2, wd):
    m = st["exp_avg"]
    p.mul_(1.0 - wd * pulse)
    blended = g.mul(1 - b1).add_(m, alpha=b1)
    p.add_(blended.sign_(), alpha=-pulse)
    m.mul_(b2).add_(g, alpha=1 - b2)


class EmoCats(EmoV39):
    def _init_moments(self, p, state):
        state["exp_avg"] = self._zeros(p)

    def _update(self, group, items, pulse):
        b1, b2 = group["betas"]
        self._apply(cats_rule, items, ("exp_avg",), pulse=pulse, b1=b1, b2=b2, wd=group["weight_decay"])
