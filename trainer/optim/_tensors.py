"""Run one update rule either tensor by tensor or as multi-tensor (foreach) kernels.

Each optimizer writes its rule once, with tensor methods (`m.lerp_(g, w)`, `p.addcdiv_(m, d, value=...)`).
Called with plain tensors it runs per tensor; called with TensorLists the same code runs as
`torch._foreach_*` kernels. On the CPU the per-tensor form is faster (each small LoRA tensor stays in cache
through all of its ops; foreach streams every op over all tensors), on CUDA foreach saves thousands of
kernel launches, so the default follows the device (measured by `python -m trainer.optim.bench`).
"""

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _fe(name):
    return getattr(torch, f"_foreach_{name}")


def _arg(x):
    return list(x) if isinstance(x, TensorList) else x


class TensorList(list):
    """A list of tensors whose in-place tensor methods dispatch to torch._foreach_* kernels."""

    def _call(self, name, *args, **kw):
        out = _fe(name)(self, *(_arg(a) for a in args), **kw)
        return self if name.endswith("_") else TensorList(out)

    def mul_(self, other):
        return self._call("mul_", other)

    def mul(self, other):
        return self._call("mul", other)

    def div_(self, other):
        return self._call("div_", other)

    def add_(self, other, alpha=1):
        if isinstance(other, (int, float)):
            return self._call("add_", other)
        return self._call("add_", other, alpha=alpha)

    def add(self, other, alpha=1):
        if isinstance(other, (int, float)):
            return self._call("add", other)
        return self._call("add", other, alpha=alpha)

    def sub(self, other):
        return self._call("sub", other)

    def addcmul_(self, t1, t2, value=1):
        return self._call("addcmul_", t1, t2, value=value)

    def addcdiv_(self, t1, t2, value=1):
        return self._call("addcdiv_", t1, t2, value=value)

    def lerp_(self, end, weight):
        return self._call("lerp_", end, weight)

    def lerp(self, end, weight):
        return self._call("lerp", end, weight)

    def sqrt(self):
        return self._call("sqrt")

    def sign(self):
        return self._call("sign")

    def sign_(self):
        return self._call("sign_")

    def abs(self):
        return self._call("abs")

    def neg_(self):
        return self._call("neg_")

    def copy_(self, src):
        return self._call("copy_", src)

    def clamp_(self, min=None, max=None):
        if min is not None:
            self._call("clamp_min_", min)
        if max is not None:
            self._call("clamp_max_", max)
        return self

    def clone(self):
        return TensorList(t.clone() for t in self)

    def norm(self, p=2):
        return TensorList(_fe("norm")(self, p))


def as_compute(params, grads, state_dtype):
    """Low-precision parameters are updated in the state dtype (float32) and written back afterwards."""
    work = [p if p.dtype == state_dtype or p.dtype not in LOW_PRECISION else p.float() for p in params]
    gw = [g if g.dtype == w.dtype else g.to(w.dtype) for g, w in zip(grads, work)]
    return work, gw


def write_back(params, work):
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)


def default_foreach(params) -> bool:
    return any(p.is_cuda for p in params)
