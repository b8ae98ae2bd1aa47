"""SDXL conditioning and latents, computed exactly as SDXL/diffusers/kohya do for training."""

from __future__ import annotations

import contextlib

import torch

from .lora import LoRAWrapper


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


def _needs_grad(*modules) -> bool:
    """Text-encoder LoRA training needs the graph; otherwise skip it to save memory. LoRA weights live
    outside the host's parameters(), so look at the wrappers too."""
    if not torch.is_grad_enabled():
        return False
    for module in modules:
        for sub in module.modules():
            params = sub.lora.parameters() if isinstance(sub, LoRAWrapper) else sub.parameters(recurse=False)
            if any(p.requires_grad for p in params):
                return True
    return False


def _tokens(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def encode_prompts(model, captions, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, 77, ctx], pooled [B, pool]).

    prompt_embeds = penultimate hidden states of CLIP-L and bigG concatenated (768 + 1280 = 2048 on
    SDXL); pooled = bigG's projected EOS embedding (text_embeds). Gradients flow only when a text
    encoder has trainable parameters (text-encoder LoRA) and grad mode is on.
    """
    captions = [captions] if isinstance(captions, str) else list(captions)
    device = torch.device(device) if device is not None else _device_of(model.te1)
    ctx = contextlib.nullcontext() if _needs_grad(model.te1, model.te2) else torch.no_grad()
    with ctx:
        out1 = model.te1(_tokens(model.tokenizer1, captions, device), output_hidden_states=True)
        out2 = model.te2(_tokens(model.tokenizer2, captions, device), output_hidden_states=True)
        h1, h2 = out1.hidden_states[-2], out2.hidden_states[-2]
        prompt_embeds = torch.cat([h1, h2.to(h1.dtype)], dim=-1)
        return prompt_embeds, out2.text_embeds


@torch.no_grad()
def encode_latents(model, images: torch.Tensor, *, generator: torch.Generator | None = None, sample: bool = True):
    """VAE latents of images in [-1, 1] (B, 3, H, W), scaled by the VAE config's scaling factor
    (0.13025 for SDXL). Samples the posterior like kohya/diffusers; sample=False takes its mode."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    vae = model.vae
    p = next(vae.parameters())
    dist = vae.encode(images.to(device=p.device, dtype=p.dtype)).latent_dist
    latents = dist.sample(generator=generator) if sample else dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()
