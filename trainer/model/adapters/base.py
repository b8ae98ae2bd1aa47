"""What every adapter type shares: the base layer's geometry, alpha/scale (plain or rank-stabilised), the
multiplier, dropout, DoRA's weight decomposition, and the compute dtype.

An adapter describes a weight delta dW (LoRA: up @ down; LoHa: Hadamard product of two low-rank pairs; LoKr: a
Kronecker product) and adds its effect to the base layer's output. Scale convention (what ComfyUI, A1111 and
LyCORIS loaders apply): scale = alpha / rank, or alpha / sqrt(rank) with rsLoRA, whose files therefore store
alpha * sqrt(rank) so a standard loader applies the trained scale.

Compute dtype: the adapter weights stay float32 (the optimizer's master copy); in the forward they are cast to
the autocast dtype when autocast is on (else to the input's dtype), and the activations are never upcast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..base_weights import compute_dtype, dense_weight

__all__ = ["Adapter", "compute_dtype", "tucker_weight", "uses_tucker"]


def tucker_weight(core: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker form of a k x k conv factor: core (r, r, kh, kw) joined with b (r, in) and a (r, out) into
    (out, in, kh, kw), as ComfyUI's loaders rebuild it."""
    return torch.einsum("i j k l, j r, i p -> p r k l", core, b, a)


def uses_tucker(base: nn.Module, tucker: bool) -> bool:
    """LyCORIS's use_tucker applies to convolutions with a kernel larger than 1 x 1 only."""
    return bool(tucker) and isinstance(base, nn.Conv2d) and tuple(base.kernel_size) != (1, 1)


class Adapter(nn.Module):
    """One base nn.Linear / nn.Conv2d's trainable adapter. Subclasses define the factors (`factor_names`, in
    export order), `delta_weight()` and optionally a cheaper `delta_output()`."""

    kind = ""  # "lora" | "loha" | "lokr": the network type and the LyCORIS algo name
    factor_names: tuple[str, ...] = ()

    def __init__(self, name: str, base: nn.Module, rank: int, *, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.lora_name = name
        self.rank = int(rank)
        self.is_conv = isinstance(base, nn.Conv2d)
        self.weight_shape = tuple(base.weight.shape)  # (out, in) or (out, in, kh, kw)
        self.out_dim, self.in_dim = self.weight_shape[:2]
        if self.is_conv:
            self.conv_args = dict(stride=base.stride, padding=base.padding, dilation=base.dilation,
                                  groups=base.groups)
            if base.groups != 1 or base.padding_mode != "zeros":
                raise ValueError(f"{name}: grouped or non-zero-padded convolutions are not supported")
        self.rslora = bool(rslora)
        self.dropout = float(dropout)
        self.multiplier = 1.0
        self.dora_scale: nn.Parameter | None = None
        self.dora_on_output = False  # LyCORIS's wd_on_output; we write the input axis (see init_dora)

    def _finish(self, base: nn.Module, alpha, dora: bool) -> None:
        """Called by subclasses once their factors exist (LoKr's scale depends on which are full)."""
        self.set_alpha(alpha)
        if dora:
            self.init_dora(dense_weight(base))  # an fp8-stored base: its upcast, scaled weight

    # ------------------------------------------------------------------ scale
    @property
    def rank_divisor(self) -> float:
        return math.sqrt(self.rank) if self.rslora else float(self.rank)

    @property
    def scale_is_fixed(self) -> bool:
        """True where loaders ignore alpha (LoKr with both factors full): the scale is then 1."""
        return False

    def set_alpha(self, alpha) -> None:
        alpha = float(alpha) if alpha else float(self.rank)  # kohya: alpha 0/None means alpha = rank
        if self.scale_is_fixed:
            alpha = self.rank_divisor
        self.alpha = alpha
        self.scale = alpha / self.rank_divisor  # a Python float: no device sync per forward

    def file_alpha(self) -> float:
        """The `.alpha` a loader must read to apply self.scale (it divides by the rank)."""
        return self.scale * self.rank

    def set_file_alpha(self, stored: float) -> None:
        """Adopt a file's `.alpha` with the loaders' meaning (scale = stored / rank)."""
        self.set_alpha(float(stored) / self.rank * self.rank_divisor)

    # ------------------------------------------------------------------ DoRA
    def init_dora(self, weight: torch.Tensor, on_output: bool = False) -> None:
        """Magnitude = the base weight's norm per input channel (the axis ComfyUI, Forge and A1111 all apply
        correctly; their output-axis branch normalises by the unmerged weight). Stored with the same eps the
        forward adds, so the scale starts at exactly 1 and the delta at exactly zero."""
        self.dora_on_output = bool(on_output)
        with torch.no_grad():
            norm = self._weight_norm(weight.detach().float())
        self.dora_scale = nn.Parameter(norm.to(weight.device))

    def _weight_norm(self, w: torch.Tensor) -> torch.Tensor:
        if self.dora_on_output:
            n = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
        else:
            n = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(w.shape[1], *[1] * (w.dim() - 1))
            n = n.transpose(0, 1)
        return n + torch.finfo(torch.float32).eps

    def _dora_factor(self, base_weight: torch.Tensor, dw32: torch.Tensor) -> torch.Tensor:
        """magnitude / ||W + dW|| per input (or output) channel; the norm is a constant for the gradient, as
        the DoRA paper (sec. 4.3) and PEFT do, so no weight-sized tensor is kept for backward."""
        with torch.no_grad():
            norm = self._weight_norm(base_weight.float() + dw32)
        c = self.dora_scale / norm
        if self.multiplier != 1.0:
            c = self.multiplier * (c - 1) + 1
        return c

    # ------------------------------------------------------------------ the delta
    def named_factors(self) -> list[tuple[str, nn.Parameter]]:
        """(file key suffix, parameter) in export order."""
        return [(n, getattr(self, n)) for n in self.factor_names]

    def factors(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_factors()]

    def trainable(self) -> list[nn.Parameter]:
        """The parameters in a fixed order: the factors in export order, then DoRA's magnitude."""
        return self.factors() + ([self.dora_scale] if self.dora_scale is not None else [])

    def delta_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """dW * scale * multiplier in the base weight's shape, computed in `dtype`."""
        raise NotImplementedError

    def _layer(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, None, **self.conv_args) if self.is_conv else F.linear(x, w)

    def delta_output(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The adapter's contribution for input x (dropout already applied)."""
        return self._layer(x, self.delta_weight(dtype))

    def _dropout(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        return F.dropout(x, p=self.dropout, training=True) if training and self.dropout > 0 else x

    def forward(self, base: nn.Module, x: torch.Tensor, args=(), kwargs=None, training: bool = False):
        kwargs = kwargs or {}
        dt = compute_dtype(x)
        if self.dora_scale is None:
            out = base(x, *args, **kwargs)
            return out + self.delta_output(self._dropout(x, training), dt).to(out.dtype)
        return self._forward_dora(base, x, args, kwargs, training, dt)

    def _forward_dora(self, base, x, args, kwargs, training, dt):
        # W' = (W + dW) * c with c per input channel: y = (x*c) W^T + b + (x*c) dW^T. Per output channel:
        # y = (x W^T + x dW^T) * c + b.
        with torch.autocast(x.device.type, enabled=False):  # the norm needs dW in float32
            dw32 = self.delta_weight(torch.float32)
        c = self._dora_factor(dense_weight(base), dw32.detach())
        c = c.reshape((1, -1, 1, 1) if self.is_conv else (-1,)).to(dt)
        dw = dw32.to(dt)
        if not self.dora_on_output:
            xc = x * c
            out = base(xc, *args, **kwargs)
            return out + self._layer(self._dropout(xc, training), dw).to(out.dtype)
        out = base(x, *args, **kwargs)
        bias = None if base.bias is None else base.bias.reshape(c.shape).to(out.dtype)
        no_bias = out if bias is None else out - bias
        scaled = (no_bias + self._layer(self._dropout(x, training), dw).to(out.dtype)) * c
        return scaled if bias is None else scaled + bias

    # ------------------------------------------------------------------ files
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """suffix -> tensor (detached master weights) in the LyCORIS/kohya layout, alpha and dora_scale included."""
        sd = {suffix: p.detach() for suffix, p in self.named_factors()}
        sd["alpha"] = torch.tensor(self.file_alpha(), dtype=torch.float32)
        if self.dora_scale is not None:
            sd["dora_scale"] = self.dora_scale.detach()
        return sd

    def load_tensors(self, parts: dict[str, torch.Tensor], describe) -> None:
        """Copy a file's tensors (suffix -> tensor) into this adapter; `describe(suffix)` names the key in
        errors. Shapes must match exactly."""
        with torch.no_grad():
            for suffix, p in self.named_factors():
                t = parts[suffix]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{describe(suffix)} has shape {tuple(t.shape)}, this network's "
                                     f"{self.kind} module needs {tuple(p.shape)}")
                p.copy_(t.to(p))
            if "dora_scale" in parts:
                t = parts["dora_scale"]
                on_output = t.shape[0] == self.out_dim and t.shape[0] != 1
                if self.dora_scale is None or tuple(t.reshape(-1).shape) not in ((self.in_dim,), (self.out_dim,)):
                    raise ValueError(f"{describe('dora_scale')} of shape {tuple(t.shape)} does not fit")
                want = (self.out_dim, *[1] * (len(self.weight_shape) - 1)) if on_output else \
                    (1, self.in_dim, *[1] * (len(self.weight_shape) - 2))
                self.dora_on_output = on_output
                self.dora_scale = nn.Parameter(t.reshape(want).to(self.dora_scale))
        if "alpha" in parts:
            self.set_file_alpha(float(parts["alpha"]))
        else:
            self.set_file_alpha(self.rank)  # no alpha: loaders apply scale 1
