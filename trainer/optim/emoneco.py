"""EmoNeco v3.0: cautious Lion with a softsign zone (optimizers.md §6).

Upstream raises NameError('eps') as soon as a parameter's |sigma| enters (0.2, 0.5]; here the softsign
step uses the group's eps.
"""

from ._tensors import batch, whole_norm
from ._v30 import EmoV30, softsign


def neco_rule(p, g, st, lr, s, b1, b2, eps, wd):
    m = st["exp_avg"]
    p.mul_(1.0 - lr * wd)
    blended = batch(g.mul(1.0 - b1).add_(m, alpha=b1))  # foreach: stacked per shape for the zone's reductions
    if 0.2 < s <= 0.5:  # -lr * (softsign(blended) * (norm + eps) * (1 - s))
        p.add_(softsign(blended).mul_(whole_norm(batch(g)).add(eps)).mul_(1 - s).mul_(-lr))
    else:  # cautious Lion: step only where the blended direction agrees with the raw gradient's sign
        direction = blended.sign_()  # direction * agree is in {-1, 0, +1}: one rounding, as p.add_(., alpha)
        p.addcmul_(direction, batch(g).sign().eq_(direction), value=-lr * (1 - s))
    m.mul_(b2).add_(g, alpha=1.0 - b2)


class EmoNeco(EmoV30):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01,
                 decoupled_weight_decay: bool = False, use_shadow: bool = False, **kw):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), use_shadow, **kw)
        self._init_lr = lr
        self.decoupled_wd = decoupled_weight_decay

    def _init_state(self, p, state, group):
        state["exp_avg"] = self._zeros(p)

    def _mode(self, sigma):
        return "softsign" if 0.2 < abs(sigma) <= 0.5 else "cautious"

    def _update(self, group, items, sigma):
        b1, b2 = group["betas"]
        wd = group["weight_decay"] / self._init_lr if self.decoupled_wd else group["weight_decay"]
        self._apply(neco_rule, items, ("exp_avg",), grouped=True, lr=group["lr"], s=abs(sigma), b1=b1, b2=b2,
                    eps=group["eps"], wd=wd)
