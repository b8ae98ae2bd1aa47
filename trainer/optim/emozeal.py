"""EmoZeal v3.0: Adafactor-like update plus cautious / softsign steps in the emotional zones (§5).

Upstream allocates a >=2-D `exp_avg` that it never updates, so its "blended" gradient is (1-beta1)*g;
we compute exactly that without allocating the dead tensor (0 full-size states for >=2-D parameters).
"""

from ._tensors import batch, div_into, sq_means, whole_norm
from ._v30 import EmoV30, softsign


def zeal_matrix_rule(p, g, st, lr, s, b1, b2, eps, wd):
    g = batch(g)  # foreach: the same-shape gradients stacked, one batched op per shape
    r, c = sq_means(g)
    # blended = (1 - beta1) * g (+ beta1 * exp_avg, which upstream never updates from 0), only where a zone uses it
    if s > 0.6:  # cautious: the mask keeps where the blended and raw gradients agree in sign
        direction = g.mul(1 - b1).sign()
        p.add_(direction.mul(direction.eq(g.sign())).mul_(1 - s), alpha=-lr)
    elif s > 0.1:  # softsign step scaled by the whole-tensor gradient norm: -lr * (softsign * (norm + eps) * (1 - s))
        p.add_(softsign(g.mul(1 - b1)).mul_(whole_norm(g).add(eps)).mul_(1 - s).mul_(-lr))
    st["exp_avg_r"].mul_(b1).add_(r.add_(eps).sqrt_(), alpha=1 - b1)
    st["exp_avg_c"].mul_(b1).add_(c.add_(eps).sqrt_(), alpha=1 - b1)
    update = batch(st["exp_avg_r"]).mul(batch(st["exp_avg_c"]))  # one full-size temporary for sqrt(r*c) + eps
    update.sqrt_().add_(eps)
    p.add_(p, alpha=-wd * lr)
    p.add_(div_into(g, update), alpha=-lr * (1 - s))


def zeal_vector_rule(p, g, st, lr, s, b1, b2, eps, wd):
    m, v = st["exp_avg"], st["exp_avg_sq"]
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = v.sqrt().add_(eps)
    p.add_(p, alpha=-wd * lr)
    p.addcdiv_(m, denom, value=-lr * (1 - s))


class EmoZeal(EmoV30):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 use_shadow: bool = False, **kw):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), use_shadow, **kw)

    def _init_state(self, p, state, group):
        if p.dim() >= 2:
            self._factored_zeros(p, state)
        else:
            state["exp_avg"] = self._zeros(p)
            state["exp_avg_sq"] = self._zeros(p)

    def _mode(self, sigma):
        s = abs(sigma)
        return "cautious" if s > 0.6 else "softsign" if s > 0.1 else "plain"

    def _update(self, group, items, sigma):
        b1, b2 = group["betas"]
        kw = dict(lr=group["lr"], s=abs(sigma), b1=b1, b2=b2, eps=group["eps"], wd=group["weight_decay"])
        self._apply(zeal_matrix_rule, [it for it in items if it[0].dim() >= 2], ("exp_avg_r", "exp_avg_c"),
                    grouped=True, **kw)
        self._apply(zeal_vector_rule, [it for it in items if it[0].dim() < 2], ("exp_avg", "exp_avg_sq"), **kw)
