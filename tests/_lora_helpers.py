"""Shared helpers of the LoRA-family tests: a fixed UNet call, random adapter weights, the TE key names."""

import re

import torch

from trainer.model import LoRANetwork, encode_prompts, load_sdxl

# every adapter type and option worth proving, as LoRANetwork keyword sets (rank 4, LoCon convs, text encoders)
CONFIGS = {
    "lora": dict(network="lora"),
    "dora": dict(network="lora", dora=True),
    "rslora": dict(network="lora", rslora=True),
    "loha": dict(network="loha"),
    "lokr": dict(network="lokr"),  # LyCORIS defaults: factor -1, w1 full, w2 full or a rank-r pair by size
    "lokr-decomposed": dict(network="lokr", lokr_factor=2, lokr_decompose_both=True),
    "loha-dora": dict(network="loha", dora=True),
    # LyCORIS's use_tucker: cores on the 3x3 convs (lora_mid, hada_t1/t2)
    "lora-tucker": dict(network="lora", tucker=True),
    "loha-tucker": dict(network="loha", tucker=True),
    # LyCORIS's Diag-OFT and BOFT (rank = LyCORIS's dim; BOFT needs an even block size <= rank leaving a power-of-two
    # block count on every width: 6 splits the tiny model's 32/48/64/96/256/512)
    "oft": dict(network="oft"),
    "boft": dict(network="boft", rank=6),
    "boft-rescale": dict(network="boft", rank=6, oft_rescale=True),
}
NET = dict(rank=4, alpha=3.0, conv_rank=2, conv_alpha=1.5, train_te=True)

_TE_CHILD = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
             "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
             "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}
_TE_RE = re.compile(r"^lora_te([12])_text_model_encoder_layers_(\d+)_(\w+)$")


def unet_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = model.unet.dtype
    x = torch.randn(2, 4, 8, 8, generator=g).to(dt)
    embeds, pooled = encode_prompts(model, ["a photo of the cat", "the dog"])
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2).to(dt)}
    return model.unet(x, torch.tensor([100, 700]), embeds, added_cond_kwargs=cond).sample


def randomize(network, std=0.2, seed=1):
    """Every factor random (so every factor matters); DoRA magnitudes and OFT rescales jittered around their
    starting values (the base norms, ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(network.loras):
            adapter = network.loras[name]
            for suffix, p in adapter.named_factors():
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if suffix == "rescale" else 0.0))
            if adapter.dora_scale is not None:
                d = adapter.dora_scale
                d.mul_(1 + 0.2 * torch.randn(d.shape, generator=g))


def base_modules(network) -> dict:
    """kohya module name -> the wrapped base nn.Linear / nn.Conv2d."""
    return {wrapper.lora.lora_name: wrapper.base for _, _, wrapper in network._wrapped}


def comfy_key(name: str) -> str:
    """ComfyUI's model key (diffusion_model.* or clip_l/clip_g.transformer.*) of one of our module names."""
    m = _TE_RE.match(name)
    if m:
        clip = "clip_l" if m.group(1) == "1" else "clip_g"
        return f"{clip}.transformer.text_model.encoder.layers.{m.group(2)}.{_TE_CHILD[m.group(3)]}.weight"
    return None


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


def make(tiny, **kw):
    """A fresh tiny model and a LoRANetwork on it: NET's settings with `kw` over them."""
    model = load_sdxl(tiny)
    return model, LoRANetwork(model, **{**NET, **kw})
