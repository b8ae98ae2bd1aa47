"""LoHa (LyCORIS): dW = (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two rank-r pairs, so the delta
can reach rank r^2 with the parameters of two LoRAs. Conv layers are flattened (in * kh * kw), as LyCORIS does
without Tucker."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter


class LoHaAdapter(Adapter):
    kind = "loha"
    factor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, name, base, rank, alpha, *, dropout=0.0, rslora=False, dora=False, **_):
        super().__init__(name, base, rank, dropout=dropout, rslora=rslora)
        fan_in = math.prod(self.weight_shape[1:])
        dev = base.weight.device
        self.hada_w1_a = nn.Parameter(torch.empty(self.out_dim, rank, device=dev))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, fan_in, device=dev))
        self.hada_w2_a = nn.Parameter(torch.empty(self.out_dim, rank, device=dev))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, fan_in, device=dev))
        # LyCORIS's init: w2_a zero, so the delta starts at exactly zero while the other three carry signal.
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        self._finish(base, alpha, dora)

    def delta_weight(self, dtype):
        w1 = self.hada_w1_a.to(dtype) @ self.hada_w1_b.to(dtype)
        # the scale goes on the smallest factor: one weight-sized product fewer
        w2 = (self.hada_w2_a * (self.scale * self.multiplier)).to(dtype) @ self.hada_w2_b.to(dtype)
        return (w1 * w2).reshape(self.weight_shape)
