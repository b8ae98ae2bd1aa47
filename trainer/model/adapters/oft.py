"""Diag-OFT (LyCORIS's `diag-oft`): a layer's output channels, split into block_num blocks of block_size, are each
rotated by an orthogonal R = Cayley(Q) = (I + Q)(I - Q)^-1 of the skew-symmetric Q = B - B^T of the trained
`oft_blocks` B (zeros at the start: R = I, the base model). The merged weight's rows are
W'[k m] = sum_n R[k, n, m] W[k n], LyCORIS's and ComfyUI's einsum; the forward applies the same map to the layer's
output x W^T (LyCORIS's bypass form), so no weight-sized product or gradient is made.

The file's `alpha` is LyCORIS's constraint, always 0 here, and Diag-OFT has no `rescale`: trainer/oft_rules.py
says why (ComfyUI 0.3.75 reads both differently)."""

from __future__ import annotations

import torch
from torch import nn

from ...oft_rules import oft_layout, refusal
from .base import Adapter


class OFTAdapter(Adapter):
    kind = "oft"

    def __init__(self, name, base, rank, alpha=None, *, dropout=0.0, rslora=False, dora=False, tucker=False,
                 oft_rescale=False, oft_constraint=0.0, **_):
        super().__init__(name, base, rank, dropout=dropout)
        why = refusal(self.kind, dora=dora, rslora=rslora, tucker=tucker, dropout=dropout, rescale=oft_rescale,
                      constraint=oft_constraint)
        if why:
            raise ValueError(f"{name}: {why}")
        self.block_size, self.block_num = self.layout()
        dev = base.weight.device
        self.oft_blocks = nn.Parameter(torch.zeros(self.blocks_shape(), device=dev))
        self.rescale = None
        self.factor_names = ("oft_blocks",)
        if oft_rescale:  # LyCORIS's `rescaled`: a trained per-output-channel factor, ones at the start
            self.rescale = nn.Parameter(torch.ones(self.out_dim, *[1] * (len(self.weight_shape) - 1), device=dev))
            self.factor_names = ("oft_blocks", "rescale")
        self.alpha, self.scale = 0.0, 1.0  # no LoRA scale; alpha is the (zero) constraint

    # ------------------------------------------------------------------ layout
    def layout(self) -> tuple[int, int]:
        return oft_layout(self.out_dim, self.rank)

    def blocks_shape(self) -> tuple[int, ...]:
        return (self.block_num, self.block_size, self.block_size)

    # ------------------------------------------------------------------ the rotation
    def rotation(self) -> torch.Tensor:
        """R per block (float32), blended with I by the multiplier as LyCORIS does: s R + (1 - s) I."""
        with torch.autocast(self.oft_blocks.device.type, enabled=False):
            b = self.oft_blocks
            q = b - b.transpose(-1, -2)
            eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
            # (I - Q)^-1 (I + Q) = (I + Q)(I - Q)^-1 (they commute). I - Q is invertible for any real skew Q, so
            # no singularity check: solve()'s would read the device every call
            r = torch.linalg.solve_ex(eye - q, eye + q)[0]
            if self.multiplier != 1.0:
                r = self.multiplier * r + (1.0 - self.multiplier) * eye
        return r

    def rotate(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The rotation of the channels in y's last dimension."""
        z = y.unflatten(-1, (self.block_num, self.block_size))
        return torch.einsum("k n m, ... k n -> ... k m", r, z).flatten(-2)

    def _rotate_channels(self, y: torch.Tensor) -> torch.Tensor:
        """Rotate (and rescale) the channels of y, laid out as the layer's output (channels in dim 1 for a conv)."""
        y = y.movedim(1, -1) if self.is_conv else y
        y = self.rotate(y, self.rotation().to(y.dtype))
        if self.rescale is not None:
            y = y * self.rescale.reshape(-1).to(y.dtype)
        return y.movedim(-1, 1) if self.is_conv else y

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W' in float32: the base weight with its rows rotated (and rescaled), what a loader merges."""
        w = weight.float()
        return self._rotate_channels(w.movedim(0, 1)).movedim(1, 0) if w.dim() > 1 else self._rotate_channels(w)

    def delta_weight(self, dtype):
        raise NotImplementedError("OFT rotates the base weight: use merged_weight(weight)")

    def forward(self, base, x, args=(), kwargs=None, training=False):
        out = base(x, *args, **(kwargs or {}))
        if base.bias is None:
            return self._rotate_channels(out)
        bias = base.bias.to(out.dtype).reshape(-1, *[1] * (out.dim() - 2)) if self.is_conv else base.bias.to(out.dtype)
        return self._rotate_channels(out - bias) + bias  # W' rotates the weight only, never the bias

    # ------------------------------------------------------------------ files
    def export_tensors(self):
        sd = {suffix: p.detach() for suffix, p in self.named_factors()}
        sd["alpha"] = torch.tensor(0.0, dtype=torch.float32)  # LyCORIS's constraint buffer: 0 = none
        return sd

    def load_tensors(self, parts, describe):
        constraint = float(parts["alpha"]) if "alpha" in parts else 0.0
        if constraint:
            raise ValueError(f"{describe('alpha')}: {refusal(self.kind, constraint=constraint)}")
        with torch.no_grad():
            for suffix, p in self.named_factors():
                t = parts[suffix]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{describe(suffix)} has shape {tuple(t.shape)}, this network's {self.kind} "
                                     f"module needs {tuple(p.shape)}: {self._rank_hint(t)}")
                p.copy_(t.to(p))

    def _rank_hint(self, blocks: torch.Tensor) -> str:
        if blocks.dim() < 3:
            return "the rescale must have one value per output channel"
        return (f"train with rank {blocks.shape[-1]} (conv_rank for 3x3 convs), which gives blocks of "
                f"{blocks.shape[-1]}")
