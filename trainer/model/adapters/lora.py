"""LoRA / LoCon (kohya's networks.lora layout): dW = up @ down, with DoRA and rsLoRA as options."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from .base import Adapter


class LoRAAdapter(Adapter):
    kind = "lora"
    factor_names = ("lora_down", "lora_up")

    def __init__(self, name, base, rank, alpha, *, dropout=0.0, rslora=False, dora=False, **_):
        super().__init__(name, base, rank, dropout=dropout, rslora=rslora)
        dev = base.weight.device
        if self.is_conv:
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
        return [("lora_down.weight", self.lora_down.weight), ("lora_up.weight", self.lora_up.weight)]

    def delta_weight(self, dtype):
        up = (self.lora_up.weight * (self.scale * self.multiplier)).to(dtype).flatten(1)
        return (up @ self.lora_down.weight.to(dtype).flatten(1)).reshape(self.weight_shape)

    def delta_output(self, x, dtype):
        # two thin layers instead of a weight-sized dW; the scale is folded into the small up matrix
        down = self.lora_down.weight.to(dtype)
        up = (self.lora_up.weight * (self.scale * self.multiplier)).to(dtype)
        if self.is_conv:
            return F.conv2d(F.conv2d(x, down, None, **self.conv_args), up)
        return F.linear(F.linear(x, down), up)
