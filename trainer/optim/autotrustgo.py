"""AutoTrustGO: confidence-gated heavy-ball/Nesterov momentum with a rank mask and a norm brake (§14).

Upstream reads three statistics per parameter back to the host every step; here flip_ema, mask_ema and
thr live on the device as 0-dim tensors, the threshold feedback uses torch.where, and nothing syncs. The
loss never enters this optimizer; `confidence` only decays the consensus (as upstream), but its mean is
published as telemetry.
"""

import torch

from ._base import EmoOptimizer


def _step_consts(dtype, lr, thr, mask_ema, flip_ema):
    """The 0-dim factors every tensor of a group shares in one step, computed once (same ops, same values)."""
    floor = (0.08 + 0.22 * (1.0 - mask_ema)).to(dtype)
    return {"lr": lr.to(dtype), "thr": thr.to(dtype), "temp": (0.15 + 0.2 * (1.0 - mask_ema)).to(dtype),
            "floor": floor, "one_minus_floor": 1.0 - floor, "conf_decay": (1.0 - 0.3 * flip_ema).to(dtype),
            "flip04": 0.4 * flip_ema}


def trust_rule(p, g, st, lr, T, beta, eps, cap, thr, mask_ema, flip_ema, acc, consts):
    c = consts.get(g.dtype)
    if c is None:
        c = consts[g.dtype] = _step_consts(g.dtype, lr, thr, mask_ema, flip_ema)
    s = torch.sign(g)  # {-1, 0, +1} (+0 for zeros and NaN): bitwise sign(g).to(int8).to(g.dtype)
    sign_g = s.to(torch.int8)
    flip = sign_g != st["prev_sign"]
    acc["flip"].add_(torch.count_nonzero(flip).to(torch.float32).div_(flip.numel()))  # == flip.float().mean()
    st["prev_sign"].copy_(sign_g)
    rank = g.abs()
    rank.div_(rank.mean() + eps)
    conf_rank = rank + 1.0
    torch.div(rank, conf_rank, out=conf_rank).clamp_(max=0.85)
    consensus = st["consensus"]
    consensus.addcmul_(s, conf_rank).clamp_(-cap, cap)  # s * conf_rank is exact: one rounding, as add_(s * conf_rank)
    confidence = consensus.abs().div_(cap).clamp_(max=1.0)  # conf_stab, then in place:
    confidence.mul_(0.4).add_(0.6).mul_(conf_rank).mul_(c["conf_decay"])  # conf_rank * (0.6 + 0.4 * conf_stab) * decay
    high_conf = torch.count_nonzero(confidence > 0.6).to(torch.float32).div_(confidence.numel())
    consensus.mul_((1.0 - 0.02 * high_conf * flip_ema).to(consensus.dtype))
    mask = rank.sub_(c["thr"]).div_(c["temp"]).sigmoid_()  # the gate, in rank's buffer
    mask.mul_(c["one_minus_floor"]).add_(c["floor"])  # floor + (1 - floor) * gate
    mask_ratio = mask.mean()
    acc["mask"].add_(mask_ratio)  # float64 accumulator: the same double add as += mask_ratio.double()
    m = st["momentum"]
    m.mul_(beta).add_(g)
    d = m.mul(beta).add_(g).mul_(mask)  # (g + beta * m) * mask
    norm = d.norm()
    danger = 0.6 * (norm / (norm + 1.0)) + c["flip04"]
    local_trust = T * (0.4 + 0.4 * mask_ratio)
    d.mul_((1.0 / (1.0 + danger * local_trust * norm)).to(d.dtype))
    p.sub_(d.mul_(c["lr"]))
    acc["confidence"].add_(confidence.mean())
    acc["danger"].add_(danger)


class AutoTrustGO(EmoOptimizer):
    needs_loss = False

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
            self._apply(trust_rule, items, (), per_tensor=True, lr=group["lr"] * lr_scale, T=T, beta=self.beta,
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
