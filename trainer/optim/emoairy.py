"""EmoAiry v3.9.1: Adafactor-style statistics with a sign(g) update at emoPulse (optimizers.md §8).

As in EmoFact, sign(g/denom) is sign(g) for finite gradients; the statistics are kept but skipped in the
update.
"""

from ._tensors import batch, sq_means
from ._v39 import EmoV39


def airy_matrix_rule(p, g, st, pulse, b2, wd):
    r, c = sq_means(batch(g))  # foreach: one batched reduction per shape
    st["exp_avg_r"].mul_(b2).add_(r, alpha=1 - b2)
    st["exp_avg_c"].mul_(b2).add_(c, alpha=1 - b2)
    p.mul_(1.0 - wd * pulse)
    p.add_(g.sign(), alpha=-pulse)


def airy_vector_rule(p, g, st, pulse, b2, wd):
    st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
    p.mul_(1.0 - wd * pulse)
    p.add_(g.sign(), alpha=-pulse)


class EmoAiry(EmoV39):
    def _init_moments(self, p, state):
        if p.dim() >= 2:
            self._factored_zeros(p, state)
        else:
            state["exp_avg_sq"] = self._zeros(p)

    def _update(self, group, items, pulse):
        kw = dict(pulse=pulse, b2=group["betas"][1], wd=group["weight_decay"])
        self._apply(airy_matrix_rule, [it for it in items if it[0].dim() >= 2], ("exp_avg_r", "exp_avg_c"),
                    grouped=True, **kw)
        self._apply(airy_vector_rule, [it for it in items if it[0].dim() < 2], ("exp_avg_sq",), **kw)
