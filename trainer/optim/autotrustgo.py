"""AutoTrustGO: confidence-gated heavy-ball/Nesterov momentum with a rank mask and a norm brake (§14).

Upstream reads three statistics per parameter back to the host every step; here flip_ema, mask_ema and
thr live on the device as 0-dim tensors, the threshold feedback uses torch.where, and nothing syncs. The
loss never enters this optimizer; `confidence` only decays the consensus (as upstream), but its mean is
published as telemetry.

Per tensor on the CPU (faster there: each tensor stays in cache); in foreach mode the same rule runs on one
stack per distinct shape (9 in an SDXL LoRA), so a step dispatches ~80 ops per shape whatever the tensor count
(780 for kohya's 1,444 SDXL UNet LoRA tensors, upstream's loop 93,934).
"""

import torch

from ._base import EmoOptimizer
from ._tensors import Batched, batch, div_into


def _step_consts(dtype, lr, thr, mask_ema, flip_ema):
    """The 0-dim factors every tensor of a group shares in one step, computed once (same ops, same values)."""
    floor = (0.08 + 0.22 * (1.0 - mask_ema)).to(dtype)
    return {"lr": lr.to(dtype), "thr": thr.to(dtype), "temp": (0.15 + 0.2 * (1.0 - mask_ema)).to(dtype),
            "floor": floor, "one_minus_floor": 1.0 - floor, "conf_decay": (1.0 - 0.3 * flip_ema).to(dtype),
            "flip04": 0.4 * flip_ema}


def _dims(t):
    return tuple(range(1, t.dim()))


def _reduce(x, op):
    """op (mean, norm) over each whole tensor: 0-dim per tensor, [n, 1, ..] per stack of a Batched."""
    if isinstance(x, Batched):
        fn = torch.linalg.vector_norm if op == "norm" else torch.mean
        return Batched(fn(t, dim=_dims(t), keepdim=True) for t in x)
    return getattr(x, op)()


def _fraction(mask):
    """The float32 fraction of true elements (== mask.float().mean(), as upstream), per tensor or per stack."""
    if isinstance(mask, Batched):
        return Batched(t.count_nonzero(dim=_dims(t)).to(torch.float32).div_(t[0].numel())
                       .view(-1, *(1,) * (t.dim() - 1)) for t in mask)
    return torch.count_nonzero(mask).to(torch.float32).div_(mask.numel())


def _dtype(x):
    return x[0].dtype if isinstance(x, list) else x.dtype


def _accumulate(acc, x):
    """acc (float64) += x, summed over the tensors of a Batched in float64 (as the per-tensor adds are)."""
    if isinstance(x, Batched):
        for t in x:
            acc.add_(t.sum(dtype=torch.float64))
    else:
        acc.add_(x)


def trust_rule(p, g, st, lr, T, beta, eps, cap, thr, mask_ema, flip_ema, acc, consts):
    """Upstream's per-parameter update. Per tensor on plain tensors; in grouped foreach mode g and the state
    come as shape-ordered TensorLists and the whole rule runs on per-shape stacks (a Batched: every method
    below is one op per shape), the stacks going back to the state and the parameters in one foreach op each."""
    c = consts.get(_dtype(g))
    if c is None:
        c = consts[_dtype(g)] = _step_consts(_dtype(g), lr, thr, mask_ema, flip_ema)
    g = batch(g)
    s = g.sign()  # {-1, 0, +1} (+0 for zeros and NaN): bitwise sign(g).to(int8).to(g.dtype)
    sign_g = s.to(torch.int8)
    _accumulate(acc["flip"], _fraction(sign_g.ne(batch(st["prev_sign"]))))
    st["prev_sign"].copy_(sign_g)
    rank = g.abs()
    rank.div_(_reduce(rank, "mean").add(eps))
    conf_rank = rank.add(1.0)
    conf_rank = div_into(rank, conf_rank).clamp_(max=0.85)
    consensus = batch(st["consensus"])
    consensus.addcmul_(s, conf_rank).clamp_(-cap, cap)  # s * conf_rank is exact: one rounding, as add_(s * conf_rank)
    confidence = consensus.abs().div_(cap).clamp_(max=1.0)  # conf_stab, then in place:
    confidence.mul_(0.4).add_(0.6).mul_(conf_rank).mul_(c["conf_decay"])  # conf_rank * (0.6 + 0.4 * conf_stab) * decay
    high_conf = _fraction(confidence.gt(0.6)).double()  # upstream: a python float
    consensus.mul_(high_conf.mul(flip_ema).mul_(-0.02).add_(1.0).to(_dtype(consensus)))  # 1 - 0.02 h flip_ema
    mask = rank.sub_(c["thr"]).div_(c["temp"]).sigmoid_()  # the gate, in rank's buffer
    mask.mul_(c["one_minus_floor"]).add_(c["floor"])  # floor + (1 - floor) * gate
    mask_ratio = _reduce(mask, "mean")
    _accumulate(acc["mask"], mask_ratio)  # float64 accumulator: the same double add as += mask_ratio.double()
    m = batch(st["momentum"])
    m.mul_(beta).add_(g)
    d = m.mul(beta).add_(g).mul_(mask)  # (g + beta * m) * mask
    if isinstance(m, Batched):
        st["momentum"].copy_(m)
        st["consensus"].copy_(consensus)
    norm = _reduce(d, "norm")
    danger = norm.div(norm.add(1.0)).mul(0.6).add(c["flip04"])  # 0.6 * N / (N + 1) + 0.4 * flip_ema
    local_trust = mask_ratio.mul(0.4).add(0.4).mul(T)  # T * (0.4 + 0.4 * mask_ratio)
    scale = danger.mul(local_trust).mul(norm).add(1.0).reciprocal()  # 1 / (1 + danger * local_trust * N)
    d.mul_(scale.to(_dtype(d)))
    p.add_(d.mul_(c["lr"]), alpha=-1)
    _accumulate(acc["confidence"], _reduce(confidence, "mean"))
    _accumulate(acc["danger"], danger)


class AutoTrustGO(EmoOptimizer):
    needs_loss = False
    reads_loss = False

    def __init__(self, params, lr=1e-3, trust_level=0.4, eps=1e-8, **kw):
        super().__init__(params, dict(lr=lr), **kw)
        self.trust_level = float(max(0.0, min(1.0, trust_level)))
        self.beta = 0.94
        self.eps = eps
        self.consensus_cap = int(2 + round(2 * self.trust_level))
        self.thr = self.mask_ema = self.flip_ema = None  # 0-dim float64 tensors on the parameters' device

    def _scalars(self, device):
        if self.thr is None:
            f64 = dict(dtype=torch.float64, device=device)
            self.thr = torch.tensor(0.60 - 0.25 * self.trust_level, **f64)
            self.mask_ema = torch.zeros((), **f64)
            self.flip_ema = torch.zeros((), **f64)
        return self.thr, self.mask_ema, self.flip_ema

    def _init_state(self, p, state, group):
        state["momentum"] = self._zeros(p)
        state["consensus"] = self._zeros(p)
        state["prev_sign"] = torch.zeros(p.shape, dtype=torch.int8, device=p.device)

    def _step(self, loss):
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if first is None:
            return
        thr, mask_ema, flip_ema = self._scalars(first.device)
        T = self.trust_level
        lr_scale = (1.0 - (0.15 + 0.15 * T) * flip_ema.clamp(0.0, 1.0)).clamp(0.6, 1.0)
        acc = {k: torch.zeros((), dtype=torch.float64, device=first.device)
               for k in ("flip", "mask", "confidence", "danger")}
        count = 0
        for group in self.param_groups:
            items = self._with_grad(group)
            count += len(items)
            self._apply(trust_rule, items, ("momentum", "consensus", "prev_sign"), grouped=True,
                        lr=group["lr"] * lr_scale, T=T, beta=self.beta,
                        eps=self.eps, cap=self.consensus_cap, thr=thr, mask_ema=mask_ema, flip_ema=flip_ema, acc=acc,
                        consts={})
        if count:
            mask_ratio, flip_ratio = acc["mask"] / count, acc["flip"] / count
            self.mask_ema = 0.92 * mask_ema + 0.08 * mask_ratio
            self.flip_ema = 0.92 * flip_ema + 0.08 * flip_ratio
            tuned = torch.where(self.mask_ema < 0.10, thr * 0.995, torch.where(self.mask_ema > 0.35, thr * 1.005, thr))
            self.thr = tuned.clamp(0.3, 0.7)
        n = max(count, 1)
        lr = self.param_groups[0]["lr"]
        self._publish({"loss": loss}, {
            "lr_scale": lr_scale, "effective_lr": lr * lr_scale, "mask_ema": self.mask_ema, "flip_ema": self.flip_ema,
            "thr": self.thr, "confidence_mean": acc["confidence"] / n, "danger_mean": acc["danger"] / n,
            "mask_ratio": acc["mask"] / n, "flip_ratio": acc["flip"] / n})

    def _extra_state(self):
        return {k: None if v is None else v.clone() for k, v in
                (("thr", self.thr), ("mask_ema", self.mask_ema), ("flip_ema", self.flip_ema))}

    def _load_extra_state(self, extra):
        for k in ("thr", "mask_ema", "flip_ema"):
            v = extra.get(k)
            setattr(self, k, None if v is None else v.clone())
