"""LoHa (LyCORIS): dW = (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two rank-r pairs, so the delta
can reach rank r^2 with the parameters of two LoRAs. Conv layers are flattened (in * kh * kw), as LyCORIS does
without Tucker; with tucker, each pair of a k x k conv is LyCORIS's (hada_t, w_a (r, out), w_b (r, in)) form."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, tucker_weight, uses_tucker


class HadamardProduct(torch.autograd.Function):
    """(w1_a @ w1_b) * (w2_a @ w2_b) keeping only the four thin factors for backward (the two weight-sized
    products are recomputed there), as LyCORIS does: plain autograd would keep both products per module."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return (w1a @ w1b) * (w2a @ w2b)

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        g1 = grad * (w2a @ w2b)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2


class LoHaAdapter(Adapter):
    kind = "loha"
    factor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, name, base, rank, alpha, *, dropout=0.0, rslora=False, dora=False, tucker=False, **_):
        super().__init__(name, base, rank, dropout=dropout, rslora=rslora)
        dev = base.weight.device
        self.tucker = uses_tucker(base, tucker)
        if self.tucker:
            a_shape, b_shape = (rank, self.out_dim), (rank, self.in_dim)
            self.hada_t1 = nn.Parameter(torch.empty(rank, rank, *self.weight_shape[2:], device=dev))
            self.hada_t2 = nn.Parameter(torch.empty(rank, rank, *self.weight_shape[2:], device=dev))
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
            self.factor_names = (*self.factor_names, "hada_t1", "hada_t2")
        else:
            a_shape, b_shape = (self.out_dim, rank), (rank, math.prod(self.weight_shape[1:]))
        self.hada_w1_a = nn.Parameter(torch.empty(*a_shape, device=dev))
        self.hada_w1_b = nn.Parameter(torch.empty(*b_shape, device=dev))
        self.hada_w2_a = nn.Parameter(torch.empty(*a_shape, device=dev))
        self.hada_w2_b = nn.Parameter(torch.empty(*b_shape, device=dev))
        # LyCORIS's init: w2_a zero, so the delta starts at exactly zero while the other three carry signal.
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        self._finish(base, alpha, dora)

    def delta_weight(self, dtype):
        # the scale goes on the smallest factor: no weight-sized multiply for it
        w2a = (self.hada_w2_a * (self.scale * self.multiplier)).to(dtype)
        if self.tucker:  # conv factors only, so plain autograd's two kept products stay small
            w1 = tucker_weight(self.hada_t1.to(dtype), self.hada_w1_b.to(dtype), self.hada_w1_a.to(dtype))
            return w1 * tucker_weight(self.hada_t2.to(dtype), self.hada_w2_b.to(dtype), w2a)
        factors = (self.hada_w1_a.to(dtype), self.hada_w1_b.to(dtype), w2a, self.hada_w2_b.to(dtype))
        return HadamardProduct.apply(*factors).reshape(self.weight_shape)
