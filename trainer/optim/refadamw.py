"""RefAdamWminiScheduleFree: AdamW without bias correction, a gradient-norm-ratio LR per parameter, and a
mid-run injection of parameter values into the first moment (optimizers.md §13).

Not Adam-mini and not schedule-free, whatever the name says. The gradient norms come back to the host in one
transfer per step (upstream syncs once per parameter); parameters that never had a gradient are skipped by the
injection (upstream raises KeyError), as are elements whose second moment is still 0 (upstream steps them by
~p/eps, which diverges), and the validation-history scan cannot run off its start (IndexError).
"""

import logging

import torch

from ._base import EmoOptimizer

log = logging.getLogger("emolora.optim")


def ref_rule(p, g, st, auto_lr, eps, wd, b1, b2):
    m, v = st["exp_avg"], st["exp_avg_sq"]
    st["step"] += 1
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = v.float().sqrt().add_(eps).to(p.dtype)
    if wd != 0:
        p.add_(p, alpha=-wd * auto_lr)
    p.addcdiv_(m, denom, value=-auto_lr)


def _inject(p, st, ref_alpha):
    m = st["exp_avg"].mul_(1 - ref_alpha).add_(p.to(st["exp_avg"].dtype), alpha=ref_alpha)
    # Elements that never had a gradient (v == 0) would step by ~p/eps: keep their m at 0.
    m.masked_fill_(st["exp_avg_sq"] == 0, 0.0)


def auto_lrs(group, states, norms):
    """Per-parameter LR: group lr times the gradient-norm EMA over the current norm, clamped (python floats)."""
    out, a = [], group["schedulefree_alpha"]
    for st, n in zip(states, norms):
        ema = st.get("grad_norm_ema")
        st["grad_norm_ema"] = n if ema is None else (1 - a) * ema + a * n
        out.append(max(min(group["max_lr"], group["lr"] * (st["grad_norm_ema"] / (n + 1e-12))), group["min_lr"]))
    return out


class RefAdamWminiScheduleFree(EmoOptimizer):
    needs_loss = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, min_lr=1e-6,
                 max_lr=1e-2, schedulefree_alpha=0.05, dtype=None, ref_alpha=0.5, ref_window=20,
                 ref_base_eps=1e-3, ref_min_eps=1e-5, ref_max_steps=None, **kw):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_lr=min_lr, max_lr=max_lr,
                        schedulefree_alpha=schedulefree_alpha, dtype=dtype)
        super().__init__(params, defaults, **kw)
        self._user_dtype = dtype
        self.ref_alpha = ref_alpha
        self.ref_window, self.ref_base_eps, self.ref_min_eps = ref_window, ref_base_eps, ref_min_eps  # unused upstream
        self.ref_max_steps = ref_max_steps
        self.counters = dict(step=0, skip_ema=False, skip_count=0, improve_count=0, divergence_steps=0,
                             last_loss=None, val_history=[])

    @torch.no_grad()
    def step(self, closure=None, loss=None, max_steps=None, val_loss=None):
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            if loss is None:
                loss = result
        self._step_ref(None if loss is None else float(loss), max_steps, val_loss)
        if self.writer is not None:
            self._write()
        return result

    def _state_dtype(self, p, group):
        dtype = group.get("dtype") or self._user_dtype
        return dtype if dtype is not None else self._compute_dtype(p)

    def _init_state(self, p, state, group):
        dtype = self._state_dtype(p, group)
        state["step"] = 0
        state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)

    def _step_ref(self, loss, max_steps, val_loss):
        c = self.counters
        c["step"] += 1
        hist = c["val_history"]
        if val_loss is not None:
            hist.append(float(val_loss))
            del hist[:-20]
        overfit = len(hist) >= 4 and hist[-1] > hist[-2] > hist[-3] > hist[-4]
        threshold = min(20, max(10, int(0.0001 * (max_steps or 1000))))
        improving = 0
        for i in range(1, min(len(hist) - 1, threshold) + 1):  # upstream reads past the start here
            if hist[-i] < hist[-i - 1]:
                improving += 1
            else:
                break
        improve = len(hist) >= 2 and improving >= threshold
        if overfit:
            c.update(skip_ema=True, skip_count=0, improve_count=0)
        if c["skip_ema"]:
            c["skip_count"] += 1
            c["improve_count"] = c["improve_count"] + 1 if improve else 0
            if c["improve_count"] >= threshold:
                c.update(skip_ema=False, skip_count=0, improve_count=0)
        level = 0
        if loss is not None and c["last_loss"] is not None:
            ratio = loss / (c["last_loss"] + 1e-8)
            level = 3 if ratio > 2.0 else 2 if ratio > 1.5 else 1 if ratio > 1.2 else 0
        if loss is not None:
            c["last_loss"] = loss
        c["divergence_steps"] = c["divergence_steps"] + 1 if level else 0

        # The injection decision only needs host values known now; it runs right after each update (cache-hot).
        ref_alpha, progress = 0.0, None
        if loss is not None:
            total = max_steps if max_steps is not None else self.ref_max_steps
            progress = 0.5 if total is None or total <= 0 else c["step"] / total
            if 0.2 <= progress <= 0.8 and not c["skip_ema"]:
                ds = c["divergence_steps"]
                ref_alpha = (1.0 if level == 3 or ds >= 3 else 0.8 if level == 2 or ds == 2
                             else 0.6 if level == 1 or ds == 1 else self.ref_alpha)
        if ref_alpha > 0:
            log.debug("ref inject: step=%d ref_alpha=%s skip=%s div=%d", c["step"], ref_alpha, c["skip_ema"], level)

        # All gradient norms in one transfer (upstream reads each back separately), then python-float LRs.
        groups = [(group, self._with_grad(group)) for group in self.param_groups]
        grads = [g.to(st["exp_avg"].dtype) for _, items in groups for _, g, st in items]
        norms = torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads)]).tolist() if grads else []
        lrs, k = [], 0
        injected = set()
        for group, items in groups:
            group_lrs = auto_lrs(group, [st for _, _, st in items], norms[k:k + len(items)])
            group_grads = grads[k:k + len(items)]
            k += len(items)
            lrs += group_lrs
            b1, b2 = group["betas"]
            for (p, _, st), lr, g in zip(items, group_lrs, group_grads):
                work = p if p.dtype == g.dtype or st["exp_avg"].dtype != torch.float32 else p.float()
                ref_rule(work, g, st, auto_lr=lr, eps=group["eps"], wd=group["weight_decay"], b1=b1, b2=b2)
                if work is not p:
                    p.copy_(work)
                if ref_alpha > 0:
                    _inject(p, st, ref_alpha)
                    injected.add(id(p))
        if ref_alpha > 0:  # parameters with state but no gradient this step are injected too, as before
            for group in self.param_groups:
                for p in group["params"]:
                    if id(p) not in injected and p in self.state and "exp_avg" in self.state[p]:
                        _inject(p, self.state[p], ref_alpha)

        self._publish({"auto_lr_mean": sum(lrs) / len(lrs) if lrs else 0.0,
                       "loss": loss if loss is not None else float("nan"), "ref_alpha": ref_alpha,
                       "ref_inject": ref_alpha > 0, "progress": -1.0 if progress is None else progress,
                       "divergence_level": level, "divergence_steps": c["divergence_steps"],
                       "skip_ema": c["skip_ema"], "overfit": overfit})

    def _extra_state(self):
        return {"counters": {**self.counters, "val_history": list(self.counters["val_history"])}}

    def _load_extra_state(self, extra):
        if "counters" in extra:
            self.counters = {**extra["counters"], "val_history": list(extra["counters"]["val_history"])}
