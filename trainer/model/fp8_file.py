"""Checkpoints that store weights in float8: plain float8_e4m3fn / float8_e5m2, and ComfyUI's "scaled fp8" layout
(a `<prefix>scaled_fp8` marker tensor whose dtype names the format, a float32 `<layer>.scale_weight` scalar
beside each scaled weight, meaning weight = stored * scale, and an optional `<layer>.scale_input` for fp8 matmul
at inference, which training does not use).

Works on the single-file state dict (SGM key names) before its conversion to diffusers: scales are taken out,
checked, and either applied (the tensor is upcast) or handed back for the weights that stay in float8.
"""

from __future__ import annotations

import torch

from . import base_weights as BW
from . import sdxl_keys as K
from .errors import ModelError

MARKER = "scaled_fp8"
SCALE = ".scale_weight"
INPUT_SCALE = ".scale_input"


def check_dtypes(path: str, dtypes: dict[str, str], readable: dict) -> None:
    """Every tensor's stored dtype is one this torch reads; else an error naming the file, tensor and dtype."""
    for name, dt in dtypes.items():
        if readable.get(dt) is None:
            why = ("this torch has no float8 dtypes (torch >= 2.1 has them)" if dt in BW.FP8_NAMES
                   else "EmoLoRA cannot read that dtype")
            raise ModelError(f"{path}: tensor {name} is stored as {dt}: {why}")


def unet_fp8_share(shapes: dict[str, tuple], dtypes: dict[str, str]) -> float:
    """The share of the UNet's Linear/Conv weight elements (>= 2-D) stored in float8."""
    total = fp8 = 0
    for name, shape in shapes.items():
        if name.startswith(K.UNET_PREFIX) and name.endswith(".weight") and len(shape) >= 2:
            n = 1
            for d in shape:
                n *= d
            total += n
            fp8 += n if dtypes.get(name) in BW.FP8_NAMES else 0
    return fp8 / total if total else 0.0


def is_fp8_unet(shapes, dtypes) -> bool:
    """The file's UNet is an fp8 one: most of its weight elements are float8 (ComfyUI picks the dtype the same way)."""
    return unet_fp8_share(shapes, dtypes) > 0.5


def resolve_scales(path: str, sd: dict[str, torch.Tensor], keep, dtype_of) -> dict[str, torch.Tensor]:
    """Take the scaled-fp8 markers and scales out of `sd` (in place). Every float8 tensor for which `keep(key)`
    is false is upcast, times its scale, to `dtype_of(key)`; the kept ones stay float8.
    -> {kept weight key: its scale} (1 where the file has none)."""
    markers = [k for k in sd if k == MARKER or k.endswith("." + MARKER)]
    scaled_prefixes = [k[: -len(MARKER)] for k in markers]
    for k in markers:
        del sd[k]
    for k in [k for k in sd if k.endswith(INPUT_SCALE)]:
        del sd[k]
    scales = {}
    for k in [k for k in sd if k.endswith(SCALE)]:
        weight_key = k[: -len(SCALE)] + ".weight"
        scale = sd.pop(k)
        if weight_key not in sd:
            raise ModelError(f"{path}: scale {k} has no weight {weight_key}")
        if not BW.is_fp8(sd[weight_key].dtype):
            raise ModelError(f"{path}: scale {k} belongs to {weight_key}, which is stored as "
                             f"{sd[weight_key].dtype} rather than float8")
        if scale.numel() != 1 or not bool(torch.isfinite(scale.float()).all()) or not float(scale) > 0:
            raise ModelError(f"{path}: scale {k} must be one finite positive number (a per-tensor scale), got "
                             f"shape {tuple(scale.shape)}")
        scales[weight_key] = scale.reshape(()).to(torch.float32)
    kept = {}
    for key, t in sd.items():
        if not BW.is_fp8(t.dtype):
            continue
        # ComfyUI scales the Linear layers (2-D weights) under a marker; its other float8 tensors are unscaled
        scaled_layer = any(key.startswith(p) for p in scaled_prefixes) and key.endswith(".weight") and t.dim() == 2
        if scaled_layer and key not in scales:
            raise ModelError(f"{path}: scaled fp8 checkpoint without a scale for tensor {key} (expected "
                             f"{key[: -len('.weight')]}{SCALE})")
        scale = scales.get(key)
        if keep(key):
            kept[key] = scale if scale is not None else torch.ones((), dtype=torch.float32)
        else:
            sd[key] = BW.upcast(t, scale, dtype_of(key))
    return kept
