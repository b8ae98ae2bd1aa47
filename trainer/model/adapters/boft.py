"""BOFT (LyCORIS's `boft`, butterfly OFT): the output channels pass through boft_m stages; each stage permutes
them butterfly-fashion (stride 2^i * b/2), rotates blocks of b by Cayley(Q) as in Diag-OFT, and permutes back.
oft_blocks is (boft_m, block_num, b, b); b is the largest even size <= rank that leaves a power-of-two block
count, so on SDXL's widths (5 * 2^k, CLIP-L's 3 * 2^k) the rank must be at least 10. An optional trained
`rescale` multiplies the output channels (ComfyUI 0.3.75 applies it for BOFT, unlike Diag-OFT's)."""

from __future__ import annotations

import torch

from ...oft_rules import boft_layout, boft_stages, boft_width_error
from .oft import OFTAdapter


class BOFTAdapter(OFTAdapter):
    kind = "boft"

    def layout(self) -> tuple[int, int]:
        found = boft_layout(self.out_dim, self.rank)
        if found is None:
            raise ValueError(f"{self.lora_name}: {boft_width_error([self.out_dim], self.rank)}")
        return found

    def blocks_shape(self) -> tuple[int, ...]:
        return (boft_stages(self.block_num), self.block_num, self.block_size, self.block_size)

    def rotate(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        b = self.block_size
        for i in range(r.shape[0]):
            k = (b // 2) << i  # stage i pairs channels k apart
            y = y.unflatten(-1, (-1, 2, k)).transpose(-2, -1).flatten(-3).unflatten(-1, (-1, b))
            y = torch.einsum("b i j, ... b j -> ... b i", r[i], y)
            y = y.flatten(-2).unflatten(-1, (-1, k, 2)).transpose(-2, -1).flatten(-3)
        return y
