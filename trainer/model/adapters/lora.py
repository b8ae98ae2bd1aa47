"""LoRA / LoCon (kohya's networks.lora layout): dW = up @ down, with DoRA and rsLoRA as options. With tucker, a
k x k conv is down (1 x 1) -> mid (k x k, r -> r) -> up (1 x 1), LyCORIS's lora_mid layout."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, uses_tucker


class LoRAAdapter(Adapter):
    kind = "lora"
    factor_names = ("lora_down", "lora_up")

    def __init__(self, name, base, rank, alpha, *, dropout=0.0, rslora=False, dora=False, tucker=False, **_):
        super().__init__(name, base, rank, dropout=dropout, rslora=rslora)
        dev = base.weight.device
        self.lora_mid = None
        if uses_tucker(base, tucker):
            self.lora_down = nn.Conv2d(self.in_dim, rank, 1, bias=False, device=dev)
            self.lora_mid = nn.Conv2d(rank, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                                      bias=False, device=dev)
            self.lora_up = nn.Conv2d(rank, self.out_dim, 1, bias=False, device=dev)
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))
        elif self.is_conv:
            self.lora_down = nn.Conv2d(self.in_dim, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, bias=False, device=dev)
            self.lora_up = nn.Conv2d(rank, self.out_dim, 1, bias=False, device=dev)
        else:
            self.lora_down = nn.Linear(self.in_dim, rank, bias=False, device=dev)
            self.lora_up = nn.Linear(rank, self.out_dim, bias=False, device=dev)
        # kohya/Microsoft/PEFT init: down kaiming-uniform, up zero, so training starts at the base model.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self._finish(base, alpha, dora)

    def named_factors(self):
        mid = [("lora_mid.weight", self.lora_mid.weight)] if self.lora_mid is not None else []
        return [("lora_down.weight", self.lora_down.weight), *mid, ("lora_up.weight", self.lora_up.weight)]

    def delta_weight(self, dtype):
        up = (self.lora_up.weight * (self.scale * self.multiplier)).to(dtype).flatten(1)
        down = self.lora_down.weight.to(dtype).flatten(1)
        if self.lora_mid is not None:  # (r, in, kh, kw): the core joined with down; up is applied below
            down = torch.einsum("i j k l, j r -> i r k l", self.lora_mid.weight.to(dtype), down).flatten(1)
        return (up @ down).reshape(self.weight_shape)

    def delta_output(self, x, dtype):
        # thin layers instead of a weight-sized dW; the scale is folded into the small up matrix
        down = self.lora_down.weight.to(dtype)
        up = (self.lora_up.weight * (self.scale * self.multiplier)).to(dtype)
        if self.lora_mid is not None:
            return F.conv2d(F.conv2d(F.conv2d(x, down), self.lora_mid.weight.to(dtype), None, **self.conv_args), up)
        if self.is_conv:
            return F.conv2d(F.conv2d(x, down, None, **self.conv_args), up)
        return F.linear(F.linear(x, down), up)
