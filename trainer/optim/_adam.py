"""The Adam update without bias correction that EmoNavi and EmoSens share.

The default path reproduces upstream bit for bit. With fused=True, where parameter, gradient and state share a
dtype, it runs torch's fused AdamW kernel instead: with its step count set so high that beta**step underflows
to 0, both bias corrections are exactly 1 and the kernel computes the same m, v and update, only with other
rounding (FMA, weight decay as a product), about 2x faster on the CPU. It is opt-in because those last-bit
differences, amplified by the emotion's thresholds, drift from upstream by ~1e-5 over a few hundred steps.
"""

import torch

_NO_BIAS_STEP = {}  # device -> a step tensor so large that the bias corrections vanish


def adam_rule(p, g, st, lr, lr_wd, b1, b2, eps, wd):
    m, v = st["exp_avg"], st["exp_avg_sq"]
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = v.sqrt().add_(eps)
    if wd:
        p.add_(p, alpha=-wd * lr_wd)
    p.addcdiv_(m, denom, value=-lr)


def _fusable(opt, items, lr):
    if not getattr(opt, "fused", False) or not hasattr(torch, "_fused_adamw_") or lr <= 0:
        return False
    p0 = items[0][0]
    if p0.device.type not in ("cpu", "cuda"):
        return False
    return all(p.dtype == g.dtype == st["exp_avg"].dtype == st["exp_avg_sq"].dtype and p.device == p0.device
               for p, g, st in items)


def adam_step(opt, group, items, *, lr, lr_wd):
    """p <- p - lr_wd*wd*p; m, v EMAs; p <- p - lr*m/(sqrt(v)+eps), over one group's items."""
    if not items:
        return
    b1, b2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    if _fusable(opt, items, lr):
        dev = items[0][0].device
        step = _NO_BIAS_STEP.setdefault(dev, torch.tensor(1e9, dtype=torch.float32, device=dev))
        params = [p for p, _, _ in items]
        torch._fused_adamw_(params, [g for _, g, _ in items], [st["exp_avg"] for _, _, st in items],
                            [st["exp_avg_sq"] for _, _, st in items], [], [step] * len(params),
                            lr=lr, beta1=b1, beta2=b2, weight_decay=wd * lr_wd / lr, eps=eps,
                            amsgrad=False, maximize=False)
        return
    opt._apply(adam_rule, items, ("exp_avg", "exp_avg_sq"), lr=lr, lr_wd=lr_wd, b1=b1, b2=b2, eps=eps, wd=wd)
