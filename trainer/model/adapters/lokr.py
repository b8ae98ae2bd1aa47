"""LoKr (LyCORIS): dW = kron(w1, w2). out = a*b and in = c*d are split by `factorization` (LyCORIS's rule);
w1 (a x c) is full unless decompose_both, w2 (b x d[*kh*kw]) is a rank-r pair unless the rank is at least
half its size or full_matrix is set. Loaders apply alpha / rank only when a factor is decomposed, so with both
factors full the scale is 1 (LyCORIS stores alpha = rank then)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...divisors import balanced_pair
from .base import Adapter


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dim: `factor` itself when it divides dim and factor^2 <= dim; otherwise the
    divisor pair closest to sqrt(dim) whose smaller part does not exceed factor (factor < 0: no limit)."""
    if factor > 0 and dim % factor == 0 and dim >= factor * factor:
        return min(factor, dim // factor), max(factor, dim // factor)
    return balanced_pair(dim, dim if factor < 0 else factor)


class LoKrAdapter(Adapter):
    kind = "lokr"

    def __init__(self, name, base, rank, alpha, *, dropout=0.0, rslora=False, dora=False, lokr_factor=-1,
                 lokr_full_matrix=False, lokr_decompose_both=False, **_):
        super().__init__(name, base, rank, dropout=dropout, rslora=rslora)
        dev = base.weight.device
        a, b = factorization(self.out_dim, lokr_factor)
        c, d = factorization(self.in_dim, lokr_factor)
        d_flat = d * math.prod(self.weight_shape[2:])
        names = []
        if lokr_decompose_both and not lokr_full_matrix and rank < max(a, c) / 2:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, rank, device=dev))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, c, device=dev))
            names += ["lokr_w1_a", "lokr_w1_b"]
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c, device=dev))
            names.append("lokr_w1")
        if lokr_full_matrix or rank >= max(b, d) / 2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *self.weight_shape[2:], device=dev))
            names.append("lokr_w2")
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank, device=dev))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, d_flat, device=dev))
            names += ["lokr_w2_a", "lokr_w2_b"]
        self.factor_names = tuple(names)
        self.w2_shape = (b, d_flat)
        # LyCORIS's init: the w2 side's last factor zero (so kron(w1, w2) starts at zero), the rest kaiming
        for n in names:
            if n in ("lokr_w2", "lokr_w2_b"):
                nn.init.zeros_(getattr(self, n))
            else:
                nn.init.kaiming_uniform_(getattr(self, n), a=math.sqrt(5))
        self._finish(base, alpha, dora)

    @property
    def scale_is_fixed(self):
        return "lokr_w1" in self.factor_names and "lokr_w2" in self.factor_names

    def _w1(self, dtype):
        if "lokr_w1" in self.factor_names:
            return self.lokr_w1.to(dtype)
        return self.lokr_w1_a.to(dtype) @ self.lokr_w1_b.to(dtype)

    def _w2(self, dtype):
        if "lokr_w2" in self.factor_names:
            return self.lokr_w2.to(dtype).reshape(self.w2_shape)
        return self.lokr_w2_a.to(dtype) @ self.lokr_w2_b.to(dtype)

    def delta_weight(self, dtype):
        w1 = self._w1(torch.float32) * (self.scale * self.multiplier)  # the scale on the small factor
        return torch.kron(w1.to(dtype), self._w2(dtype)).reshape(self.weight_shape)
