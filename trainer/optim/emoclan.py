"""EmoClan v3.0: one global loss scalar picks a Lynx, Fact or Navi update per step (optimizers.md §4).

sigma_g = tanh(5*(short-long)) (positive = worsening, loss-scale dependent): |sigma_g| > 0.6 Lynx,
> 0.3 Fact, else Navi. Each phase's state is created on first use and frozen while another phase runs.
"""

import torch

from . import _emotion as emo
from ._base import EmoOptimizer
from ._tensors import batch, div_into, sq_means
from ._v30 import sh30_ratio, shadow30


def lynx_phase(p, g, st, lr, s, wd_lynx, betas, lynx_betas, eps, wd):
    b1, b2 = lynx_betas
    m = st["exp_avg_lynx"]
    p.mul_(1.0 - lr * wd_lynx)
    blended = g.mul(1.0 - b1).add_(m, alpha=b1)
    p.add_(blended.sign_(), alpha=-lr * (1 - s))
    m.mul_(b2).add_(g, alpha=1.0 - b2)


def fact_matrix_phase(p, g, st, lr, s, wd_lynx, betas, lynx_betas, eps, wd):
    b1, b2 = betas
    g = batch(g)  # foreach: the same-shape gradients stacked, one batched op per shape
    r, c = sq_means(g.float())
    st["exp_avg_r_fact"].mul_(b1).add_(r.add_(eps).sqrt_(), alpha=1 - b1)
    st["exp_avg_c_fact"].mul_(b1).add_(c.add_(eps).sqrt_(), alpha=1 - b1)
    update = batch(st["exp_avg_r_fact"]).mul(batch(st["exp_avg_c_fact"]))  # float32; one temporary for the update
    update.sqrt_().add_(eps)
    update = div_into(g, update)
    p.mul_(1 - wd * lr)
    p.add_(update, alpha=-lr * (1 - s))


def fact_vector_phase(p, g, st, lr, s, wd_lynx, betas, lynx_betas, eps, wd):
    b1, b2 = betas
    g32 = g.float()
    m, v = st["exp_avg_fact"], st["exp_avg_sq_fact"]
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g32, g32, value=1 - b2)
    update = m.div(v.sqrt().add_(eps))
    p.mul_(1 - wd * lr)
    p.add_(update, alpha=-lr * (1 - s))


def navi_phase(p, g, st, lr, s, wd_lynx, betas, lynx_betas, eps, wd):
    b1, b2 = betas
    m, v = st["exp_avg_navi"], st["exp_avg_sq_navi"]
    g32 = g.float()
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g32, g32, value=1 - b2)
    denom = v.sqrt().add_(eps)
    if wd:
        p.mul_(1 - lr * wd)
    p.addcdiv_(m, denom, value=-lr * (1 - s))


def _every(p):
    return True


def _matrix(p):
    return p.dim() >= 2


def _vector(p):
    return p.dim() < 2


# phase -> [(rule, state keys, grouped by shape, which params)]
PHASES = {
    "lynx": [(lynx_phase, ("exp_avg_lynx",), False, _every)],
    "fact": [(fact_matrix_phase, ("exp_avg_r_fact", "exp_avg_c_fact"), True, _matrix),
             (fact_vector_phase, ("exp_avg_fact", "exp_avg_sq_fact"), False, _vector)],
    "navi": [(navi_phase, ("exp_avg_navi", "exp_avg_sq_navi"), False, _every)],
}


class EmoClan(EmoOptimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, lynx_betas=(0.9, 0.99),
                 decoupled_weight_decay: bool = False, use_shadow: bool = False, **kw):
        if lr < 0 or eps < 0:
            raise ValueError(f"EmoClan: lr and eps must be >= 0, got lr={lr}, eps={eps}")
        for b in (*betas, *lynx_betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"EmoClan: every beta must be in [0, 1), got betas={betas}, lynx_betas={lynx_betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, lynx_betas=tuple(lynx_betas),
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, **kw)
        self._init_lr = lr
        self.use_shadow = use_shadow
        self.ema = {}
        self.hist = emo.new_history()

    def _phase_state(self, p, st, phase):
        f32 = {"dtype": torch.float32, "device": p.device}
        if phase == "lynx" and "exp_avg_lynx" not in st:
            st["exp_avg_lynx"] = self._zeros(p)
        elif phase == "navi" and "exp_avg_navi" not in st:
            st["exp_avg_navi"] = self._zeros(p)
            st["exp_avg_sq_navi"] = torch.zeros(p.shape, **f32)
        elif phase == "fact" and p.dim() >= 2 and "exp_avg_r_fact" not in st:
            st["exp_avg_r_fact"] = torch.zeros((p.shape[0],) + (1,) * (p.dim() - 1), **f32)
            st["exp_avg_c_fact"] = torch.zeros((1,) + tuple(p.shape[1:]), **f32)
        elif phase == "fact" and p.dim() < 2 and "exp_avg_fact" not in st:
            st["exp_avg_fact"] = self._zeros(p)
            st["exp_avg_sq_fact"] = torch.zeros(p.shape, **f32)

    def build_full_state(self):
        """Every phase's state for every parameter that has state: the most this optimizer holds (the VRAM
        estimate counts it, trainer/vram.py)."""
        for st_p, st in self.state.items():
            for phase in PHASES:
                self._phase_state(st_p, st, phase)

    def _step(self, loss):
        sigma = emo.scalar_s30(emo.update_ema(self.ema, loss, medium=False))
        self.hist.append(sigma)
        s = abs(sigma)
        phase = "lynx" if s > 0.6 else "fact" if s > 0.3 else "navi"
        for group in self.param_groups:
            items = self._with_grad(group)
            if self.use_shadow:
                self._shadow(items, loss)
            for p, _, st in items:
                self._phase_state(p, st, phase)
            wd = group["weight_decay"]
            wd_lynx = wd / self._init_lr if group["decoupled_weight_decay"] else wd
            kw = dict(lr=group["lr"], s=s, wd_lynx=wd_lynx, betas=group["betas"], lynx_betas=group["lynx_betas"],
                      eps=group["eps"], wd=wd)
            for rule, keys, grouped, part in PHASES[phase]:
                self._apply(rule, [it for it in items if part(it[0])], keys, grouped=grouped, **kw)
        quiet, avg_abs, var = emo.history_is_quiet(self.hist)
        if quiet:
            self.should_stop = True
        lr = self.param_groups[0]["lr"]
        self._publish({"loss": loss, "emo_scalar": sigma, "emo_scalar_min": sigma, "emo_scalar_max": sigma,
                       "effective_lr": lr * (1 - s), "phase": phase, "mode": phase,
                       "ema_short": self.ema["short"], "ema_long": self.ema["long"],
                       "shadow_ratio": 0.0, "shadow_active": False, "hist_avg_abs": avg_abs, "hist_var": var})

    def _shadow(self, items, loss):
        """SH30 per parameter, each with its own loss EMA; parameters with equal ratios blend together."""
        by_ratio = {}
        for item in items:
            ratio = sh30_ratio(emo.scalar_s30(emo.update_ema(item[2].setdefault("ema", {}), loss, medium=False)))
            by_ratio.setdefault(ratio, []).append(item)
        for ratio, group_items in by_ratio.items():
            shadow30(self, group_items, ratio)
