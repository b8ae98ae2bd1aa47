"""State-dict conversion between the single-file (SGM/LDM) SDXL layout and diffusers/HF components.

Loading (single file -> diffusers) is diffusers' own conversion (diffusers.loaders.single_file_utils, which
the model classes import anyway), fed the configs detect.py infers from shapes, so nothing is fetched; the
tensors are the same objects ours gave and it costs milliseconds more. What diffusers lacks stays here: the
reverse direction (writing the tiny/Vega test checkpoints in the exact layout ComfyUI reads; sdxl_keys also
gives export its kohya names) and the check that every checkpoint tensor has a place in the inferred model:
diffusers' converters skip keys they do not expect, and a silently dropped tensor would train another model.
"""

from __future__ import annotations

import torch

from . import sdxl_keys as K


def split_components(sd: dict) -> dict[str, dict]:
    """Group a single-file checkpoint by component prefix (prefix stripped); the rest goes to 'other'."""
    parts: dict[str, dict] = {"unet": {}, "te1": {}, "te2": {}, "vae": {}, "other": {}}
    prefixes = (("unet", K.UNET_PREFIX), ("te1", K.TE1_PREFIX), ("te2", K.TE2_PREFIX), ("vae", K.VAE_PREFIX))
    for key, value in sd.items():
        for part, prefix in prefixes:
            if key.startswith(prefix):
                parts[part][key[len(prefix) :]] = value
                break
        else:
            parts["other"][key] = value
    return parts


def _param_map(module_map: dict[str, str]) -> dict[str, str]:
    return {f"{d}.{p}": f"{s}.{p}" for d, s in module_map.items() for p in ("weight", "bias")}


def _rename(sd: dict, mapping: dict[str, str]) -> tuple[dict, list[str]]:
    out, left = {}, []
    for key, value in sd.items():
        if key in mapping:
            out[mapping[key]] = value
        else:
            left.append(key)
    return out, left


# ------------------------------------------------------------------ single file -> diffusers/HF
def to_diffusers(sd: dict, unet_config: dict, vae_config: dict, te2_model) -> dict[str, dict]:
    """A single-file SDXL state dict (prefixed keys) -> {"unet", "te1", "te2", "vae"} diffusers/HF state dicts
    (text-encoder names canonical, see te_keys_for). te2_model: the (meta) CLIPTextModelWithProjection, which
    diffusers' OpenCLIP converter consults for its width."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    te1, _ = te1_to_hf(convert_ldm_clip_checkpoint(sd))
    te2 = convert_open_clip_checkpoint(te2_model, sd, prefix=K.TE2_PREFIX)
    return {
        "unet": convert_ldm_unet_checkpoint(sd, unet_config),
        "te1": te1,
        "te2": {canonical_te_name(k): v for k, v in te2.items()},
        "vae": convert_ldm_vae_checkpoint(sd, vae_config),
    }


def unplaced(parts: dict[str, dict], layout: K.UNetLayout) -> dict[str, list[str]]:
    """Per component (split_components output), the checkpoint tensors no module of the inferred architecture takes."""
    known_unet = set(_param_map(K.unet_module_map(layout)).values())
    modules, attn = _vae_maps(parts["vae"])
    known_vae = set(_param_map(modules).values()) | set(_param_map(attn).values())
    n = _te2_layers(parts["te2"])
    known_te2 = {*K.te2_param_map(n).values(), K.TE2_TEXT_PROJECTION[1], *K.TE2_IGNORED}
    for i in range(n):
        known_te2.update(K.te2_qkv_names(i)[:2])
    return {
        "UNet": [k for k in parts["unet"] if k not in known_unet],
        "OpenCLIP bigG": [k for k in parts["te2"] if k not in known_te2],
        "VAE": [k for k in parts["vae"] if k not in known_vae],
    }


# ------------------------------------------------------------------ diffusers/HF -> single file
def unet_from_diffusers(diff: dict, layout: K.UNetLayout) -> tuple[dict, list[str]]:
    return _rename(diff, _param_map(K.unet_module_map(layout)))


# ------------------------------------------------------------------ CLIP-L (HF layout in both)
TEXT_MODEL = "text_model."


def canonical_te_name(name: str) -> str:
    """HF text-encoder name as checkpoints and kohya spell it (`text_model.encoder...`): transformers 5
    dropped the `text_model` wrapper from CLIPTextModel, 4.x and CLIPTextModelWithProjection keep it."""
    if name.startswith(TEXT_MODEL) or name.startswith("text_projection") or not name:
        return name
    return TEXT_MODEL + name


def te_keys_for(sd: dict, net) -> dict:
    """Canonical text-encoder keys -> the spelling of this transformers version's module tree."""
    if hasattr(net, "text_model"):
        return {canonical_te_name(k): v for k, v in sd.items()}
    return {k.removeprefix(TEXT_MODEL): v for k, v in sd.items()}


def te1_to_hf(sd: dict) -> tuple[dict, list[str]]:
    # position_ids is a non-persistent buffer in current transformers; old exports carry it.
    out = {canonical_te_name(k): v for k, v in sd.items() if not k.endswith("position_ids")}
    return out, []


# ------------------------------------------------------------------ OpenCLIP bigG
def _te2_layers(keys) -> int:
    ids = {int(k.split(".")[2]) for k in keys if k.startswith("transformer.resblocks.")}
    return max(ids) + 1 if ids else 0


def te2_from_hf(hf: dict) -> tuple[dict, list[str]]:
    hf = {canonical_te_name(k): v for k, v in hf.items()}
    n = _te2_layers(k.replace("text_model.encoder.layers.", "transformer.resblocks.") for k in hf)
    mapping = K.te2_param_map(n)
    out, left = {}, []
    hf_proj, oc_proj = K.TE2_TEXT_PROJECTION
    qkv = {}
    for i in range(n):
        w, b, proj = K.te2_qkv_names(i)
        for j, p in enumerate(proj):
            qkv[f"{p}.weight"] = (w, j)
            qkv[f"{p}.bias"] = (b, j)
    parts: dict[str, list] = {}
    for key, value in hf.items():
        if key in mapping:
            out[mapping[key]] = value
        elif key in qkv:
            target, j = qkv[key]
            parts.setdefault(target, [None] * 3)[j] = value
        elif key == hf_proj:
            out[oc_proj] = value.t().contiguous()
        elif key.endswith("position_ids"):
            continue
        else:
            left.append(key)
    for target, chunks in parts.items():
        out[target] = torch.cat(chunks, dim=0)
    # OpenCLIP carries a CLIP logit scale; ComfyUI ignores it but real checkpoints have it.
    out["logit_scale"] = torch.tensor(4.6052, dtype=next(iter(hf.values())).dtype)
    return out, left


# ------------------------------------------------------------------ VAE
def _vae_maps(keys) -> tuple[dict[str, str], dict[str, str]]:
    keys = list(keys)
    enc_levels = {
        int(k.split(".")[2]) for k in keys if k.startswith("encoder.down.") or k.startswith("encoder.down_blocks.")
    }
    layers = {
        int(k.split(".")[4]) for k in keys if k.startswith(("encoder.down.0.block.", "encoder.down_blocks.0.resnets."))
    }
    mid_attn = any(".attn_1." in k or ".attentions.0." in k for k in keys)
    return K.vae_module_map(len(enc_levels), len(layers), mid_attn), (K.vae_attention_map() if mid_attn else {})


def vae_from_diffusers(diff: dict) -> tuple[dict, list[str]]:
    modules, attn = _vae_maps(diff)
    out, left = _rename(diff, _param_map(modules))
    attn_map = _param_map(attn)
    rest = []
    for key in left:
        if key in attn_map:
            value = diff[key]
            out[attn_map[key]] = value[:, :, None, None] if value.ndim == 2 else value
        else:
            rest.append(key)
    return out, rest


def to_single_file(unet: dict, te1: dict, te2: dict, vae: dict, layout: K.UNetLayout) -> dict:
    """diffusers/HF component state dicts -> one original-layout SDXL state dict."""
    sd = {}
    for prefix, (converted, left) in (
        (K.UNET_PREFIX, unet_from_diffusers(unet, layout)),
        (K.TE1_PREFIX, te1_to_hf(te1)),
        (K.TE2_PREFIX, te2_from_hf(te2)),
        (K.VAE_PREFIX, vae_from_diffusers(vae)),
    ):
        if left:
            raise ValueError(f"cannot place {len(left)} keys under {prefix}: {left[:5]}")
        sd.update({prefix + k: v for k, v in converted.items()})
    return sd
