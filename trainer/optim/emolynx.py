"""EmoLynx v3.6.1: Lion with the emoDrive multiplier (optimizers.md §3)."""

from ._v36 import EmoV36


def lynx_rule(p, g, st, lr, drive, b1, b2, wd):
    m = st["exp_avg"]
    p.mul_(1 - lr * wd)
    blended = g.mul(1 - b1).add_(m, alpha=b1)
    p.add_(blended.sign_(), alpha=-lr * drive)
    m.mul_(b2).add_(g, alpha=1 - b2)


class EmoLynx(EmoV36):
    def _init_moments(self, p, state):
        state["exp_avg"] = self._zeros(p)

    def _update(self, group, items, drive):
        b1, b2 = group["betas"]
        self._apply(lynx_rule, items, ("exp_avg",), lr=group["lr"], drive=drive, b1=b1, b2=b2,
                    wd=group["weight_decay"])
