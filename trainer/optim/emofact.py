"""EmoFact v3.6.1: factored Adafactor-style statistics, but the update is sign(g) (optimizers.md §2).

Upstream steps by sign(g/denom); denom is positive, so that is sign(g) for every finite gradient and the
factored statistics never reach the parameters. They are still kept (same state, same numbers) so that
state_dicts and telemetry carry what upstream users know; the update skips the full-size denominator.
"""

from ._tensors import batch, sq_means
from ._v36 import EmoV36


def fact_matrix_rule(p, g, st, lr, drive, b1, b2, eps, wd):
    r, c = sq_means(batch(g))  # foreach: one batched reduction per shape
    st["exp_avg_r"].mul_(b1).add_(r.add_(eps).sqrt_(), alpha=1 - b1)  # beta1, not beta2, as upstream
    st["exp_avg_c"].mul_(b1).add_(c.add_(eps).sqrt_(), alpha=1 - b1)
    p.add_(p, alpha=-wd * lr)
    p.add_(g.sign(), alpha=-lr * drive)


def fact_vector_rule(p, g, st, lr, drive, b1, b2, eps, wd):
    st["exp_avg_sq"].mul_(b1).addcmul_(g, g, value=1 - b2)  # beta1 decay with a (1-beta2) increment: upstream
    p.add_(p, alpha=-wd * lr)
    p.add_(g.sign(), alpha=-lr * drive)


class EmoFact(EmoV36):
    def _init_moments(self, p, state):
        if p.dim() >= 2:
            self._factored_zeros(p, state)
        else:
            state["exp_avg_sq"] = self._zeros(p)

    def _update(self, group, items, drive):
        b1, b2 = group["betas"]
        kw = dict(lr=group["lr"], drive=drive, b1=b1, b2=b2, eps=group["eps"], wd=group["weight_decay"])
        self._apply(fact_matrix_rule, [it for it in items if it[0].dim() >= 2], ("exp_avg_r", "exp_avg_c"),
                    grouped=True, **kw)
        self._apply(fact_vector_rule, [it for it in items if it[0].dim() < 2], ("exp_avg_sq",), **kw)
