"""RefAdamWminiScheduleFree: AdamW without bias correction, a gradient-norm-ratio LR per parameter, and a
mid-run injection of parameter values into the first moment (optimizers.md §13).

Not Adam-mini and not schedule-free, whatever the name says. Deliberate differences from upstream:
- the gradient norms, their EMAs and the per-parameter LRs stay on the device (0-dim float64 `grad_norm_ema`
  per parameter); the foreach path reads nothing back (upstream syncs once per parameter), the per-tensor path
  reads the LRs once per group;
- a non-finite loss skips the step (counted in skipped_nonfinite), as everywhere in the family;
- parameters that never had a gradient are skipped by the injection (upstream raises KeyError), as are elements
  whose second moment is still 0 (upstream steps them by ~p/eps), and the validation-history scan cannot run off
  its start (IndexError);
- `bounded_injection=True` (the trainer's default, see `factory_kwargs`; the class default stays upstream's maths,
  which the golden check proves): after an injection, |m| is capped at B * (sqrt(v) + eps) per element, where
  B = (1 - b1) / sqrt(1 - b2) / sqrt(1 - b1^2 / b2) (7.27 for the default betas) is the largest |m| / sqrt(v) that
  gradients alone can produce. Upstream's injected m ~ ref_alpha * p then steps a weight by about
  auto_lr * b1 * ref_alpha * p / sqrt(v): on a LoRA, whose gradients (1e-7..1e-5) are tiny next to its weights
  (0.1), that is hundreds of times the weight, so every injected step multiplies |p| by hundreds and the run
  reaches inf within four steps. With the cap the injection still pulls the weights toward 0, at most as fast
  as the largest gradient step; it changes nothing where |m| stays within the bound (always, without an
  injection). Upstream overshoots on the golden toy problem too (a conv weight goes 0.6 -> 12 and back), so the
  cap would change those trajectories: hence off in the bare class.
"""

import logging
import math

import torch

from ._base import EmoOptimizer
from ._tensors import Batched, TensorList, batch

log = logging.getLogger("emolora.optim")


def momentum_bound(b1, b2):
    """The largest |m| / sqrt(v) any gradient sequence gives this Adam without bias correction (inf if none)."""
    if b1 * b1 >= b2 or b2 >= 1:
        return math.inf
    return (1 - b1) / math.sqrt(1 - b2) / math.sqrt(1 - b1 * b1 / b2)


def ref_rule(p, g, st, auto_lr, eps, wd, b1, b2):
    m, v = st["exp_avg"], st["exp_avg_sq"]
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = v.float().sqrt().add_(eps).to(p.dtype)
    if wd != 0:
        p.add_(p, alpha=-wd * auto_lr)
    p.addcdiv_(m, denom, value=-auto_lr)


def _inject(p, st, ref_alpha, bound, eps):
    m, v = st["exp_avg"], st["exp_avg_sq"]
    m.mul_(1 - ref_alpha).add_(p.to(m.dtype), alpha=ref_alpha)
    # Elements that never had a gradient (v == 0) would step by ~p/eps: keep their m at 0.
    m.masked_fill_(v == 0, 0.0)
    if bound is not None:
        cap = v.sqrt().add_(eps).mul_(bound)
        torch.minimum(m, cap, out=m)
        torch.maximum(m, cap.neg_(), out=m)


def _inject_foreach(params, ms, vs, ref_alpha, bound, eps):
    """_inject over lists: the v == 0 mask as m * sign(v) (v >= 0), the cap as two list clamps."""
    torch._foreach_mul_(ms, 1 - ref_alpha)
    torch._foreach_add_(ms, params, alpha=ref_alpha)
    torch._foreach_mul_(ms, torch._foreach_sign(vs))
    if bound is not None:
        cap = torch._foreach_sqrt(vs)
        torch._foreach_add_(cap, eps)
        torch._foreach_mul_(cap, bound)
        torch._foreach_clamp_max_(ms, cap)
        torch._foreach_neg_(cap)
        torch._foreach_clamp_min_(ms, cap)


def auto_lrs(group, states, grads):
    """Per-parameter LR, a float64 vector on the device: group lr times the gradient-norm EMA over the current
    norm, clamped as upstream (max_lr first, then min_lr). Updates each state's 0-dim `grad_norm_ema`."""
    dev = grads[0].device
    norms = torch.stack([n if n.device == dev else n.to(dev) for n in torch._foreach_norm(grads)]).double()
    emas = [st["grad_norm_ema"] for st in states]
    first = [st["step"] == 0 for st in states]
    a = group["schedulefree_alpha"]
    if all(first):
        ema = norms
    else:
        ema = torch.stack(emas).mul_(1 - a).add_(norms, alpha=a)
        if any(first):
            ema = torch.where(torch.tensor(first, device=dev), norms, ema)
    torch._foreach_copy_(emas, ema.unbind(0))
    for st in states:
        st["step"] += 1
    return (ema / (norms + 1e-12)).mul_(group["lr"]).clamp_max_(group["max_lr"]).clamp_min_(group["min_lr"])


def _scaled(tensors, scales, groups):
    """[scales[i] * tensors[i]] for shape-ordered tensors (run lengths `groups`) and a vector of per-tensor scales
    on the device: one stacked multiply per shape, returned as views of the products."""
    stacks = batch(TensorList(tensors, groups))
    factors, start = Batched(), 0
    for t in stacks:
        factors.append(scales[start:start + len(t)].view(-1, *(1,) * (t.dim() - 1)))
        start += len(t)
    return stacks.mul_(factors).unbind()


class RefAdamWminiScheduleFree(EmoOptimizer):
    needs_loss = False  # optional: without a loss there is no divergence check and no injection (§13e)
    factory_kwargs = {"bounded_injection": True}  # what create_optimizer (the trainer, nodes, panel) adds

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, min_lr=1e-6,
                 max_lr=1e-2, schedulefree_alpha=0.05, dtype=None, ref_alpha=0.5, ref_window=20,
                 ref_base_eps=1e-3, ref_min_eps=1e-5, ref_max_steps=None, bounded_injection=False, **kw):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_lr=min_lr, max_lr=max_lr,
                        schedulefree_alpha=schedulefree_alpha, dtype=dtype)
        super().__init__(params, defaults, **kw)
        self._user_dtype = dtype
        self.ref_alpha = ref_alpha
        self.ref_window, self.ref_base_eps, self.ref_min_eps = ref_window, ref_base_eps, ref_min_eps  # unused upstream
        self.ref_max_steps = ref_max_steps
        self.bounded_injection = bool(bounded_injection)
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
        if loss is not None:
            loss = self._loss_value(loss)  # a non-finite loss skips the step and is counted, as in the family
            if loss is None:
                return result
        self._step_ref(loss, max_steps, val_loss)
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
        state["grad_norm_ema"] = torch.zeros((), dtype=torch.float64, device=p.device)

    def _counters_step(self, loss, max_steps, val_loss):
        """Upstream's host-side bookkeeping (val history, overfit/skip, divergence) -> (ref_alpha, progress,
        level, overfit). Everything here comes from python floats the caller passed: no device read."""
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
        return ref_alpha, progress, level, overfit

    def _list_path(self, params, states):
        """Whether these tensors take the foreach path: asked for (or on CUDA) and one dtype for parameter and
        state (upstream casts otherwise; the per-tensor path does that)."""
        use = self.foreach if self.foreach is not None else any(p.is_cuda for p in params)
        return use and all(p.dtype == st["exp_avg"].dtype for p, st in zip(params, states))

    def _step_ref(self, loss, max_steps, val_loss):
        ref_alpha, progress, level, overfit = self._counters_step(loss, max_steps, val_loss)
        host_lrs, device_sums, count = [], [], 0
        for group in self.param_groups:
            items = self._with_grad(group)
            order, groups = self._shape_order(items)  # the foreach path scales each run of equal shapes at once
            items = [items[i] for i in order]
            bound = momentum_bound(*group["betas"]) if self.bounded_injection else None
            bound = None if bound == math.inf else bound
            per_tensor = False
            if items:
                states = [st for _, _, st in items]
                grads = [g if g.dtype == st["exp_avg"].dtype else g.to(st["exp_avg"].dtype) for _, g, st in items]
                lrs = auto_lrs(group, states, grads)
                count += len(items)
                if self._list_path([p for p, _, _ in items], states) and all(
                        g.dtype == st["exp_avg"].dtype for g, st in zip(grads, states)):
                    self._update_foreach(group, items, grads, lrs, groups)
                    device_sums.append(lrs.sum())
                else:
                    per_tensor = True
                    group_lrs = lrs.tolist()  # the per-tensor path's one read per group (the CPU default)
                    host_lrs += group_lrs
                    self._update_per_tensor(group, items, grads, group_lrs, ref_alpha, bound)
            if ref_alpha > 0:  # every parameter with state, with or without a gradient this step
                done = {id(p) for p, _, _ in items} if per_tensor else set()
                self._inject_group(group, done, ref_alpha, bound)
        signals = {"loss": loss if loss is not None else float("nan"), "ref_alpha": ref_alpha,
                   "ref_inject": ref_alpha > 0, "progress": -1.0 if progress is None else progress,
                   "divergence_level": level, "divergence_steps": self.counters["divergence_steps"],
                   "skip_ema": self.counters["skip_ema"], "overfit": overfit}
        if device_sums:
            total = torch.stack(device_sums).sum() if len(device_sums) > 1 else device_sums[0]
            self._publish(signals, {"auto_lr_mean": (total + sum(host_lrs)) / count})
        else:
            self._publish({**signals, "auto_lr_mean": sum(host_lrs) / count if count else 0.0})

    def _update_per_tensor(self, group, items, grads, lrs, ref_alpha, bound):
        b1, b2 = group["betas"]
        for (p, _, st), lr, g in zip(items, lrs, grads):
            work = p if p.dtype == g.dtype or st["exp_avg"].dtype != torch.float32 else p.float()
            ref_rule(work, g, st, auto_lr=lr, eps=group["eps"], wd=group["weight_decay"], b1=b1, b2=b2)
            if work is not p:
                p.copy_(work)
            if ref_alpha > 0:  # right after the update, while the tensors are in cache
                _inject(p, st, ref_alpha, bound, group["eps"])

    def _update_foreach(self, group, items, grads, lrs, groups):
        """ref_rule in a number of ops that does not grow with the number of tensors (items come ordered by
        shape, `groups` their run lengths): the per-tensor LRs multiply one stack per shape."""
        b1, b2 = group["betas"]
        params = [p for p, _, _ in items]
        ms = [st["exp_avg"] for _, _, st in items]
        vs = [st["exp_avg_sq"] for _, _, st in items]
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, grads, alpha=1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, group["eps"])
        upd = torch._foreach_div(ms, denom)
        del denom
        lrs = lrs.to(params[0].dtype)
        if group["weight_decay"] != 0:  # upstream's order: p <- p - wd * lr * p, then the Adam step
            torch._foreach_add_(params, _scaled(params, lrs.mul(-group["weight_decay"]), groups))
        torch._foreach_sub_(params, _scaled(upd, lrs, groups))

    def _inject_group(self, group, done, ref_alpha, bound):
        todo = [p for p in group["params"] if id(p) not in done and "exp_avg" in self.state.get(p, {})]
        if not todo:
            return
        states = [self.state[p] for p in todo]
        if self._list_path(todo, states):
            _inject_foreach(todo, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                            ref_alpha, bound, group["eps"])
        else:
            for p, st in zip(todo, states):
                _inject(p, st, ref_alpha, bound, group["eps"])

    def _load_extra_state(self, extra):
        if "counters" in extra:
            self.counters = {**extra["counters"], "val_history": list(extra["counters"]["val_history"])}
        for group in self.param_groups:  # states saved before the EMA moved to the device held a python float
            for p in group["params"]:
                st = self.state.get(p)
                if st and "grad_norm_ema" in st and not torch.is_tensor(st["grad_norm_ema"]):
                    st["grad_norm_ema"] = torch.tensor(float(st["grad_norm_ema"]), dtype=torch.float64,
                                                       device=p.device)

    def _extra_state(self):
        return {"counters": {**self.counters, "val_history": list(self.counters["val_history"])}}
