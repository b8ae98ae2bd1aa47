"""Run one update rule either tensor by tensor or as multi-tensor (foreach) kernels.

Each optimizer writes its rule once, with tensor methods (`m.lerp_(g, w)`, `p.addcdiv_(m, d, value=...)`).
Called with plain tensors it runs per tensor; called with TensorLists the same code runs as
`torch._foreach_*` kernels. On the CPU the per-tensor form is faster (each small LoRA tensor stays in cache
through all of its ops; foreach streams every op over all tensors), on CUDA foreach saves thousands of
kernel launches, so the default follows the device (measured by `python -m trainer.optim.bench`).

Rules with per-tensor reductions (factored row/column statistics, whole-tensor norms) run in foreach mode on
*grouped* TensorLists: the optimizer orders the tensors so that same-(shape, dtype, device) tensors are
consecutive, `batch(x)` stacks each run into one [n, *shape] tensor (a `Batched`, whose tensor methods apply
per stack) and the reductions become one batched op per shape. Passing a Batched to a TensorList method hands
over its unbound views, so results flow back to the per-tensor parameters and state in one foreach call. The
number of kernels then depends on the number of distinct shapes (9 in an SDXL LoRA), never on the number of
tensors.
"""

import itertools

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _fe(name):
    return getattr(torch, f"_foreach_{name}")


def _arg(x):
    if isinstance(x, Batched):
        return x.unbind()
    return list(x) if isinstance(x, TensorList) else x


class TensorList(list):
    """A list of tensors whose in-place tensor methods dispatch to torch._foreach_* kernels.

    `groups`, when set, holds the lengths of the consecutive same-shape runs (see `batch`)."""

    groups = None

    def __init__(self, tensors=(), groups=None):
        super().__init__(tensors)
        self.groups = groups

    def _call(self, name, *args, **kw):
        out = _fe(name)(self, *(_arg(a) for a in args), **kw)
        return self if name.endswith("_") else TensorList(out, self.groups)

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

    def div(self, other):
        return self._call("div", other)

    def float(self):
        if all(t.dtype == torch.float32 for t in self):
            return self
        return TensorList((t.float() for t in self), self.groups)  # low-precision compute only (state_dtype='param')

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
        return TensorList((t.clone() for t in self), self.groups)

    def norm(self, p=2):
        return TensorList(_fe("norm")(self, p), self.groups)


class Batched(list):
    """Stacked same-shape tensors, one [n, *shape] tensor per group; tensor methods apply to every stack
    (a Batched argument is matched stack by stack). In-place methods return self."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def call(*args, **kw):
            out = [getattr(t, name)(*(a[i] if isinstance(a, Batched) else a for a in args), **kw)
                   for i, t in enumerate(self)]
            return self if name.endswith("_") else Batched(out)

        return call

    def unbind(self):
        """The per-tensor views, in the grouped TensorList's order."""
        return [v for t in self for v in t.unbind(0)]


def batch(x):
    """A plain tensor as is; a grouped TensorList as a Batched (one torch.stack per shape group)."""
    if not isinstance(x, TensorList):
        return x
    if x.groups is None:
        raise ValueError("batch() needs a TensorList grouped by shape (EmoOptimizer._apply(..., grouped=True))")
    out, i = Batched(), 0
    for n in x.groups:
        out.append(torch.stack(x[i:i + n]))
        i += n
    return out


def sq_means(g):
    """Mean of g*g over every dim but the first (rows) and over the first (columns), both keepdim, for a tensor
    or a Batched (whose stacks carry one more leading dim)."""
    if isinstance(g, Batched):
        g2 = g.mul(g)
        return (Batched(t.mean(dim=tuple(range(2, t.dim())), keepdim=True) for t in g2),
                Batched(t.mean(dim=1, keepdim=True) for t in g2))
    g2 = g * g
    return g2.mean(dim=tuple(range(1, g.dim())), keepdim=True), g2.mean(dim=0, keepdim=True)


def whole_norm(g):
    """The float32 L2 norm of each whole tensor: 0-dim for a tensor, [n, 1, ..] (in the stack's dtype) for a
    Batched."""
    if isinstance(g, Batched):
        return Batched(torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True,
                                                dtype=torch.float32).to(t.dtype) for t in g)
    return torch.norm(g, dtype=torch.float32)


def div_into(num, den):
    """num / den, written into den's buffer where the result dtype allows (saves a full-size temporary)."""
    if isinstance(den, Batched):
        return Batched(div_into(n, d) for n, d in zip(num, den))
    return torch.div(num, den, out=den) if torch.result_type(num, den) == den.dtype else num / den


def shape_order(tensors):
    """(order, run lengths): indices that put same-(shape, dtype, device) tensors next to each other."""
    runs = {}
    for i, t in enumerate(tensors):
        runs.setdefault((t.shape, t.dtype, t.device), []).append(i)
    return [i for r in runs.values() for i in r], [len(r) for r in runs.values()]


def as_compute(params, grads, state_dtype):
    """Low-precision parameters are updated in the state dtype (float32) and written back afterwards."""
    work = [p if p.dtype == state_dtype or p.dtype not in LOW_PRECISION else p.float() for p in params]
    gw = [g if g.dtype == w.dtype else g.to(w.dtype) for g, w in zip(grads, work)]
    return work, gw


def write_back(params, work):
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)


def _cast_runs(tensors, groups, targets):
    """Each same-shape run in its target dtype: as is where it already is, else one stacked cast (views)."""
    out, i = [], 0
    for n, dtype in zip(groups, targets):
        run = tensors[i:i + n]
        i += n
        out.extend(run if all(t.dtype == dtype for t in run) else torch.stack(run).to(dtype).unbind(0))
    return out


def as_compute_runs(params, grads, state_dtype, groups):
    """as_compute() for foreach mode over shape-ordered tensors: one stacked cast per same-shape run."""
    starts = itertools.accumulate([0, *groups[:-1]])
    targets = [torch.float32 if params[i].dtype in LOW_PRECISION and params[i].dtype != state_dtype
               else params[i].dtype for i in starts]
    return _cast_runs(params, groups, targets), _cast_runs(grads, groups, targets)


def scale_(tensors, factor):
    """tensors *= factor, a 0-dim device tensor (no host read). Where a tensor's dtype differs from the factor's
    (bf16 params), the product is taken in float32 per shape run and rounded once, as a python-float multiply
    would: CUDA's foreach kernels read a tensor scalar in the list's dtype only, and bf16 would round it."""
    same = [t for t in tensors if t.dtype == factor.dtype]
    other = [t for t in tensors if t.dtype != factor.dtype]
    if same:
        torch._foreach_mul_(same, factor)
    if other:
        order, groups = shape_order(other)
        other = [other[i] for i in order]
        work = _cast_runs(other, groups, [factor.dtype] * len(groups))
        torch._foreach_mul_(work, factor)
        torch._foreach_copy_(other, work)


def write_back_foreach(params, work):
    """write_back() as one torch._foreach_copy_ (it casts)."""
    pairs = [(p, w) for p, w in zip(params, work) if w is not p]
    if pairs:
        torch._foreach_copy_([p for p, _ in pairs], [w for _, w in pairs])


def default_foreach(params) -> bool:
    return any(p.is_cuda for p in params)
