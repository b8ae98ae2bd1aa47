"""Recognise an SDXL-family single-file checkpoint and infer every component's config from tensor shapes.

Works from the safetensors header alone (names + shapes), so a wrong file (SD1.5, SD2, Flux, a LoRA)
is rejected before anything heavy is built, and fine-tunes / distilled variants need no hub config.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from . import sdxl_keys as K
from .errors import ModelError

SDXL_ADD_TIME_DIM = 256  # per-value sinusoidal width of SDXL's size/crop conditioning (6 values)
HEAD_CHANNELS = 64  # SDXL, SSD-1B, Vega and both CLIPs use 64-channel attention heads
# Canonical SDXL down-path transformer depths (per input block) -> architecture name.
KNOWN_DEPTHS = {
    (0, 0, 2, 2, 10, 10): "sdxl",
    (0, 0, 2, 2, 4, 4): "ssd-1b",
    (0, 0, 1, 1, 2, 2): "vega",
}


@dataclass
class CheckpointInfo:
    path: str
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # safetensors dtype names (F16, BF16, F8_E4M3, ...)


def read_header(path: str) -> CheckpointInfo:
    """Tensor names and shapes without reading tensor data."""
    if not os.path.isfile(path):
        raise ModelError(f"checkpoint not found: {path}")
    if not path.lower().endswith(".safetensors"):
        raise ModelError(f"{path}: only .safetensors single-file checkpoints (or a diffusers folder) are supported")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
            dtypes = {k: s.get_dtype() for k, s in slices.items()}
            metadata = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for truncated/garbage files
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from exc
    if not shapes:
        raise ModelError(f"{path}: the file contains no tensors")
    return CheckpointInfo(path, shapes, metadata, dtypes)


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    ids = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(ids) + 1 if ids else 0


def check_family(info: CheckpointInfo) -> None:
    """Raise ModelError naming the file and what it looks like unless it is an SDXL-base-family model."""
    keys = info.shapes
    name = info.path

    def fail(found: str) -> None:
        raise ModelError(
            f"{name} is not an SDXL-family checkpoint: {found}. EmoLoRA trains LoRAs for SDXL and its "
            "fine-tunes/distillations (Pony, Illustrious, NoobAI, SSD-1B, Vega)."
        )

    if any(".double_blocks." in k or k.startswith(("double_blocks.", "img_in.")) or ".img_in." in k for k in keys):
        fail("found Flux transformer keys (double_blocks / img_in)")
    if any("joint_blocks." in k for k in keys):
        fail("found SD3 MMDiT keys (joint_blocks)")
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        fail("it is a LoRA, not a base model")
    if not any(k.startswith(K.UNET_PREFIX) for k in keys):
        fail(f"no UNet weights ({K.UNET_PREFIX}*); a UNet-only or VAE-only file cannot be trained on")
    ctx = _context_dim(keys)
    if any(k.startswith("cond_stage_model.") for k in keys):
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            fail(f"found SD2.x layout (OpenCLIP cond_stage_model.model.*, cross-attention context {ctx})")
        fail(f"found SD1.x layout (CLIP cond_stage_model.transformer.*, cross-attention context {ctx})")
    has_te1 = any(k.startswith(K.TE1_PREFIX) for k in keys)
    has_te2 = any(k.startswith(K.TE2_PREFIX) for k in keys)
    if not has_te1 and any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        fail("found the SDXL refiner layout (only OpenCLIP bigG, no CLIP-L)")
    if not (has_te1 and has_te2):
        fail(
            f"text encoders missing (conditioner.embedders.0.transformer: {has_te1}, "
            f"conditioner.embedders.1.model: {has_te2}; context {ctx})"
        )
    if not any(k.startswith(K.VAE_PREFIX) for k in keys):
        fail("no VAE weights (first_stage_model.*)")
    if "model.diffusion_model.label_emb.0.0.weight" not in keys:
        fail("the UNet has no size/pooled-text conditioning (label_emb)")


def _context_dim(shapes, prefix: str = K.UNET_PREFIX) -> int | None:
    """Cross-attention context width (768 SD1, 1024 SD2, 2048 SDXL) from any attn2.to_k weight."""
    for k, s in shapes.items():
        if k.endswith("attn2.to_k.weight") and k.startswith(prefix):
            return s[1]
    return None


def _heads(channels: int) -> int:
    return max(1, channels // HEAD_CHANNELS)


def _depth(keys, prefix: str) -> int:
    return _count(keys, re.escape(prefix) + r"transformer_blocks\.(\d+)\.")


def infer_unet(shapes: dict[str, tuple[int, ...]], pooled_dim: int) -> tuple[dict, K.UNetLayout]:
    """diffusers UNet2DConditionModel config from original-layout UNet shapes (prefix stripped)."""
    keys = set(shapes)
    n_in = _count(keys, r"input_blocks\.(\d+)\.")
    levels: list[list[tuple[int, int]]] = [[]]
    for i in range(1, n_in):
        if f"input_blocks.{i}.0.op.weight" in keys:
            levels.append([])
        elif f"input_blocks.{i}.0.in_layers.0.weight" in keys:
            ch = shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0]
            levels[-1].append((ch, _depth(keys, f"input_blocks.{i}.1.")))
        else:
            raise ModelError(f"unrecognised UNet input block {i}")
    channels = []
    for lvl in levels:
        if not lvl or len({c for c, _ in lvl}) != 1:
            raise ModelError(f"unsupported UNet level layout {lvl}")
        channels.append(lvl[0][0])
    down = tuple(tuple(d for _, d in lvl) for lvl in levels)
    n_out = _count(keys, r"output_blocks\.(\d+)\.")
    up, idx = [], 0
    for lvl in reversed(range(len(levels))):
        count = len(levels[lvl]) + 1
        up.append(tuple(_depth(keys, f"output_blocks.{idx + j}.1.") for j in range(count)))
        idx += count
    if idx != n_out:
        raise ModelError(f"UNet has {n_out} output blocks, expected {idx} for its input layout")
    if "middle_block.1.proj_in.weight" in keys:
        mid = _depth(keys, "middle_block.1.")
    elif "middle_block.0.in_layers.0.weight" in keys:
        mid = 0
    else:
        mid = None
    layout = K.UNetLayout(down, tuple(up), mid)
    try:
        fields = K.diffusers_config_layout_fields(layout)
    except ValueError as exc:
        raise ModelError(f"unsupported UNet layout: {exc}") from exc
    proj = next((s for k, s in shapes.items() if k.endswith(".proj_in.weight")), None)
    if proj is None:
        raise ModelError("the UNet has no cross-attention transformer blocks")
    adm = shapes["label_emb.0.0.weight"][1]
    if (adm - pooled_dim) % 6 or adm <= pooled_dim:
        raise ModelError(f"label_emb input {adm} does not fit pooled text {pooled_dim} + 6 size embeddings")
    cfg = {
        "sample_size": 128,
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "out_channels": shapes["out.2.weight"][0],
        "block_out_channels": channels,
        "attention_head_dim": [_heads(c) for c in channels],  # diffusers' legacy name: number of heads
        "cross_attention_dim": _context_dim(shapes, prefix=""),
        "use_linear_projection": len(proj) == 2,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": (adm - pooled_dim) // 6,
        "projection_class_embeddings_input_dim": adm,
        "time_embedding_dim": shapes["time_embed.0.weight"][0],
        "norm_num_groups": 32,
        **fields,
    }
    return cfg, layout


def infer_clip(shapes: dict[str, tuple[int, ...]], *, openclip: bool) -> dict:
    """transformers CLIPTextConfig kwargs from CLIP-L (HF names) or OpenCLIP bigG shapes."""
    if openclip:
        vocab, width = shapes["token_embedding.weight"]
        positions = shapes["positional_embedding"][0]
        layers = _count(shapes, r"transformer\.resblocks\.(\d+)\.")
        inter = shapes["transformer.resblocks.0.mlp.c_fc.weight"][0]
        proj = shapes["text_projection"][1] if "text_projection" in shapes else width
        act = "gelu"
    else:
        vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
        positions = shapes["text_model.embeddings.position_embedding.weight"][0]
        layers = _count(shapes, r"text_model\.encoder\.layers\.(\d+)\.")
        inter = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
        proj = width
        act = "quick_gelu"
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": _heads(width),
        "max_position_embeddings": positions,
        "hidden_act": act,
        "projection_dim": proj,
        "layer_norm_eps": 1e-5,
    }


def infer_vae(shapes: dict[str, tuple[int, ...]]) -> dict:
    """diffusers AutoencoderKL config from LDM first_stage_model shapes (prefix stripped)."""
    levels = _count(shapes, r"encoder\.down\.(\d+)\.")
    per = _count(shapes, r"encoder\.down\.0\.block\.(\d+)\.")
    channels = [shapes[f"encoder.down.{i}.block.{per - 1}.conv2.weight"][0] for i in range(levels)]
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": per,
        "latent_channels": shapes["quant_conv.weight"][0] // 2,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,  # SDXL's VAE constant; not recoverable from weights
        "force_upcast": True,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
    }


@dataclass
class InferredConfigs:
    unet: dict
    layout: K.UNetLayout
    te1: dict
    te2: dict
    vae: dict
    arch: str
    prediction_type: str
    zero_terminal_snr: bool


def infer_configs(info: CheckpointInfo) -> InferredConfigs:
    check_family(info)
    parts: dict[str, dict] = {"unet": {}, "te1": {}, "te2": {}, "vae": {}}
    for key, shape in info.shapes.items():
        for part, prefix in (
            ("unet", K.UNET_PREFIX),
            ("te1", K.TE1_PREFIX),
            ("te2", K.TE2_PREFIX),
            ("vae", K.VAE_PREFIX),
        ):
            if key.startswith(prefix):
                parts[part][key[len(prefix) :]] = shape
    try:
        te1 = infer_clip(parts["te1"], openclip=False)
        te2 = infer_clip(parts["te2"], openclip=True)
        unet, layout = infer_unet(parts["unet"], te2["projection_dim"])
        vae = infer_vae(parts["vae"])
    except (KeyError, IndexError, StopIteration) as exc:
        raise ModelError(f"{info.path}: SDXL-like but a required tensor is missing or malformed: {exc!r}") from exc
    ctx = unet["cross_attention_dim"]
    if ctx != te1["hidden_size"] + te2["hidden_size"]:
        raise ModelError(
            f"{info.path}: UNet context {ctx} != CLIP-L {te1['hidden_size']} + bigG {te2['hidden_size']}; "
            "not an SDXL-family checkpoint"
        )
    flat = tuple(d for lvl in layout.down_depths for d in lvl)
    standard = ctx == 2048 and unet["projection_class_embeddings_input_dim"] == 2816
    arch = KNOWN_DEPTHS.get(flat, "sdxl-custom") if standard else "tiny-sdxl"
    vpred = "v_pred" in info.shapes or info.metadata.get("modelspec.prediction_type", "") in ("v", "v_prediction")
    return InferredConfigs(
        unet, layout, te1, te2, vae, arch, "v_prediction" if vpred else "epsilon", "ztsnr" in info.shapes
    )
