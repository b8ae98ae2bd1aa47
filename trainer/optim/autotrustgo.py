"""AutoTrustGO: confidence-gated heavy-ball/Nesterov momentum with a rank mask and a norm brake (§14).

Upstream reads three statistics per parameter back to the host every step; here flip_ema, mask_ema and
thr live on the device as 0-dim tensors, the threshold feedback uses torch.where, and nothing syncs. The
loss never enters this optimizer; `confidence` only decays the consensus (as upstream), but its mean is
published as telemetry.
"""

import torch

from ._base import EmoOptimizer


def trust_rule(p, g, st, lr, T, beta, eps, cap, thr, mask_ema, flip_ema, acc):
    sign_g = torch.sign(g).to(torch.int8)
    acc["flip"] += (sign_g != st["prev_sign"]).float().mean().double()
    st["prev_sign"].copy_(sign_g)
    mag = g.abs()
    rank = mag / (mag.mean() + eps)
    conf_rank = (rank / (rank + 1.0)).clamp_(max=0.85)
    consensus = st["consensus"]
    consensus.add_(sign_g.to(conf_rank.dtype) * conf_rank).clamp_(-cap, cap)
    conf_stab = (consensus.abs() / cap).clamp_(max=1.0)
    confidence = conf_rank * (0.6 + 0.4 * conf_stab)
    confidence *= (1.0 - 0.3 * flip_ema).to(confidence.dtype)
    high_conf = (confidence > 0.6).float().mean()
    consensus.mul_((1.0 - 0.02 * high_conf * flip_ema).to(consensus.dtype))
    gate = torch.sigmoid((rank - thr.to(rank.dtype)) / (0.15 + 0.2 * (1.0 - mask_ema)).to(rank.dtype))
    floor = (0.08 + 0.22 * (1.0 - mask_ema)).to(gate.dtype)
    mask = floor + (1.0 - floor) * gate
    mask_ratio = mask.mean()
    acc["mask"] += mask_ratio.double()
    m = st["momentum"]
    m.mul_(beta).add_(g)
    d = (g + beta * m) * mask
    norm = d.norm()
    danger = 0.6 * (norm / (norm + 1.0)) + 0.4 * flip_ema
    local_trust = T * (0.4 + 0.4 * mask_ratio)
    d.mul_((1.0 / (1.0 + danger * local_trust * norm)).to(d.dtype))
    p.sub_(d.mul_(lr.to(d.dtype)))
    acc["confidence"] += confidence.mean().double()
    acc["danger"] += danger.double()


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
                        eps=self.eps, cap=self.consensus_cap, thr=thr, mask_ema=mask_ema, flip_ema=flip_ema, acc=acc)
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
