"""The frozen UNet's Linear/Conv weights stored in a dtype other than the compute dtype: float8 (e4m3fn or e5m2)
with a per-tensor scale, or plainly bf16/fp16/fp32.

A stored layer (StoredLinear / StoredConv2d, subclasses of nn.Linear / nn.Conv2d, so the LoRA targeting and the
adapters see the layer they expect) upcasts its weight to the compute dtype inside its forward and again inside
its backward (a custom autograd function that saves the stored weight, not the upcast copy), so at most one
layer's full-precision weight exists at a time, with or without gradient checkpointing. Nothing here needs
float8 matmul: upcast-then-compute is the design (ComfyUI and kohya train fp8 bases the same way).

Norms, embeddings, biases, the time/text-time embedding MLPs, each resnet's time projection and the UNet's first
and last convolutions stay in the compute dtype: they are a fraction of a percent of SDXL's weights and the
conditioning is sensitive to rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# safetensors dtype names of the float8 formats -> torch attribute names (absent on a torch without float8).
FP8_NAMES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
FP8_TRAINING = "float8_e4m3fn"  # what a higher-precision base is quantized to (3 mantissa bits, max 448)

# diffusers UNet module names (prefixes and last parts) kept in the compute dtype.
KEEP_PREFIXES = ("time_embedding.", "add_embedding.", "conv_in", "conv_out")
KEEP_NAMES = ("time_emb_proj",)


def fp8_dtype(name: str = FP8_TRAINING) -> torch.dtype | None:
    """torch's float8 dtype of that name, or None on a torch without float8 dtypes."""
    return getattr(torch, name, None)


def fp8_dtypes() -> tuple[torch.dtype, ...]:
    return tuple(d for d in (fp8_dtype(n) for n in FP8_NAMES.values()) if d is not None)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in fp8_dtypes()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in for input x: autocast's when it is on, else x's own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def keeps_compute_dtype(name: str) -> bool:
    """True for the UNet modules whose weights stay in the compute dtype (see the module docstring)."""
    return name.startswith(KEEP_PREFIXES) or name.rpartition(".")[2] in KEEP_NAMES


# ---- the stored weight -------------------------------------------------------------------------------------------
def upcast(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, exact: bool = False) -> torch.Tensor:
    """weight * scale in `dtype`. With `exact` (a power-of-two scale, ours) the product is exact in any dtype;
    another scale (a file's) is applied in float32 first, so the result is rounded once."""
    if scale is None:
        return weight.to(dtype)
    if exact or dtype == torch.float32:
        return weight.to(dtype).mul_(scale.to(weight.device, dtype))
    return weight.to(torch.float32).mul_(scale.to(weight.device, torch.float32)).to(dtype)


def is_power_of_two(scale: torch.Tensor | None) -> bool:
    if scale is None:
        return False
    if scale.is_meta:
        return True  # only quantize() makes meta scales, and its scales are powers of two
    value = float(scale)
    return value > 0 and math.frexp(value)[0] == 0.5


def quantize(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (weight in float8 `dtype`, float32 scale) with weight ~= q * scale. The scale is the power of two that
    puts the tensor's largest magnitude just under the format's maximum, so no value saturates, the most
    mantissa is used, and upcasting multiplies exactly."""
    if weight.is_meta:  # shapes only (byte counts of a model built on the meta device)
        return torch.empty(weight.shape, dtype=dtype, device="meta"), torch.ones((), device="meta")
    w = weight.detach().to(torch.float32)
    amax = float(w.abs().max()) if w.numel() else 0.0
    if not math.isfinite(amax):
        raise ValueError("cannot quantize a weight with non-finite values to float8")
    fmax = torch.finfo(dtype).max
    scale = 2.0 ** math.ceil(math.log2(amax / fmax)) if amax > 0 else 1.0
    q = (w / scale).clamp_(-fmax, fmax).to(dtype)
    return q, torch.tensor(scale, dtype=torch.float32)


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight as a plain tensor (upcast and scaled when it is stored), in `dtype` (default: as
    stored for a plain layer, float32 for a stored one). Adapters read the base weight through this (DoRA)."""
    if isinstance(module, StoredLayer):
        return module.upcast_weight(dtype or torch.float32)
    w = module.weight
    return w if dtype is None else w.to(dtype)


class StoredLayer:
    """Mixin of the stored Linear/Conv2d: `weight` is the stored tensor (frozen), `weight_scale` a float32 scalar
    buffer or None."""

    weight_scale: torch.Tensor | None
    scale_exact: bool  # the scale is a power of two (read once at store time: no device sync per call)

    def upcast_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return upcast(self.weight, self.weight_scale, dtype, self.scale_exact)

    def extra_repr(self) -> str:
        scaled = ", scaled" if self.weight_scale is not None else ""
        return f"{super().extra_repr()}, stored={str(self.weight.dtype).removeprefix('torch.')}{scaled}"


class _StoredLayerFn(torch.autograd.Function):
    """y = op(x, upcast(W), b) whose backward upcasts W again instead of keeping the upcast copy alive. The base is
    frozen, so only x gets a gradient. The stored weight (and scale) go through save_for_backward, not through the
    layer, so saved-tensor hooks see them: UNet block offloading (trainer/offload.py) fetches a dropped block's
    weights for the backward that way."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer, ctx.x_shape, ctx.x_dtype = layer, x.shape, x.dtype
        scale = layer.weight_scale
        ctx.save_for_backward(layer.weight, *(() if scale is None else (scale,)))
        w = layer.upcast_weight(compute_dtype(x))
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(x, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        layer, saved = ctx.layer, ctx.saved_tensors
        w = upcast(saved[0], saved[1] if len(saved) > 1 else None, grad.dtype, layer.scale_exact)
        if isinstance(layer, nn.Conv2d):
            gx = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad, layer.stride, layer.padding, layer.dilation,
                                            layer.groups)
        else:
            gx = grad @ w
        return gx.to(ctx.x_dtype), None, None


class StoredLinear(StoredLayer, nn.Linear):
    def forward(self, x):
        return _StoredLayerFn.apply(x, self, self.bias)


class StoredConv2d(StoredLayer, nn.Conv2d):
    def forward(self, x):
        return _StoredLayerFn.apply(x, self, self.bias)


_STORED = {nn.Linear: StoredLinear, nn.Conv2d: StoredConv2d}


def store(module: nn.Module, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Turn a plain nn.Linear / nn.Conv2d into its stored form holding `weight` (frozen) and `scale`."""
    if isinstance(module, StoredLayer):
        module.__class__ = next(c for c in module.__class__.__mro__ if c in _STORED)
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.register_buffer("weight_scale", None if scale is None else scale.to(weight.device, torch.float32))
    module.scale_exact = is_power_of_two(scale)
    module.__class__ = _STORED[type(module)]


def storable_layers(unet: nn.Module):
    """(name, module) of the UNet's plain Linear/Conv2d layers whose weights may be stored in another dtype."""
    for name, module in unet.named_modules():
        if type(module) in _STORED or isinstance(module, StoredLayer):
            if not keeps_compute_dtype(name) and getattr(module, "padding_mode", "zeros") == "zeros":
                yield name, module


def store_unet(unet: nn.Module, storage: torch.dtype, compute: torch.dtype,
               file_scales: dict[str, torch.Tensor] | None = None) -> int:
    """Store the UNet's storable layers' weights in `storage` (a float8 dtype: quantized with a per-tensor scale;
    else a plain cast). A layer already holding float8 weights (an fp8 checkpoint) keeps them as they are, with
    its file scale (file_scales: diffusers module name -> scale) or 1. Every other float8 tensor is upcast to
    `compute` (what a layer outside the storable set needs). -> the number of stored layers."""
    file_scales = file_scales or {}
    count = 0
    storable = dict(storable_layers(unet))
    for name, module in storable.items():
        w = module.weight.detach()
        if is_fp8(w.dtype):
            store(module, w, file_scales.get(name, torch.ones((), dtype=torch.float32, device=w.device)))
        elif is_fp8(storage):
            store(module, *quantize(w, storage))
        elif w.dtype != compute or storage != compute:
            store(module, w.to(storage), None)
        else:
            continue
        count += 1
    for name, module in unet.named_modules():
        if name in storable:
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            if is_fp8(p.dtype):
                scale = file_scales.get(name) if pname == "weight" else None
                setattr(module, pname, nn.Parameter(upcast(p.detach(), scale, compute), requires_grad=False))
    return count


def weight_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of the module's parameters and buffers by dtype name, counted on the live tensors."""
    out: dict[str, int] = {}
    for t in (*module.parameters(), *module.buffers()):
        key = str(t.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out
