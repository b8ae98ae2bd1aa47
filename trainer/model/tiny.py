"""Random-weight SDXL-topology checkpoints for tests, written in the single-file layout ComfyUI reads.

The tiny model keeps SDXL's structure (3 levels, 2 resnets per level, attention-free first level,
deeper transformers further down, text_time conditioning, two CLIP encoders with bigG's projection,
a 4-channel VAE that downsamples 8x) at a few MB, so loader, LoRA and export run for real in tests.
Weights are seeded per tensor name, so the files are byte-identical across runs.
"""

from __future__ import annotations

import math
import os
import zlib

import torch

from ..atomic import atomic_directory, atomic_write
from ..cachedir import cache_root
from . import clip_tokenizers, convert, detect
from . import sdxl_keys as K

TINY_VERSION = "tiny-sdxl-v1"  # bump when the tiny structure changes: the cache path includes it
SEED = 20240611
ADD_TIME = detect.SDXL_ADD_TIME_DIM
# A few merges so common caption words become single tokens, like in the real CLIP vocabulary.
TINY_MERGES = ["t h", "th e</w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>", "c a", "ca t</w>", "a n", "an d</w>"]


def _unet_config(channels, layout: K.UNetLayout, context: int, pooled: int) -> dict:
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": list(channels),
        "attention_head_dim": [max(1, c // detect.HEAD_CHANNELS) for c in channels],
        "cross_attention_dim": context,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": ADD_TIME,
        "projection_class_embeddings_input_dim": pooled + 6 * ADD_TIME,
        "time_embedding_dim": 4 * channels[0],
        "norm_num_groups": 32,
        **K.diffusers_config_layout_fields(layout),
    }


def _clip_config(vocab, width, layers, inter, *, openclip: bool, proj=None) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, width // detect.HEAD_CHANNELS),
        "max_position_embeddings": 77,
        "hidden_act": "gelu" if openclip else "quick_gelu",
        "projection_dim": proj or width,
        "layer_norm_eps": 1e-5,
    }


def _vae_config(channels, layers) -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": list(channels),
        "layers_per_block": layers,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
        "mid_block_add_attention": True,
    }


def tiny_configs(vocab_size: int) -> dict:
    """Configs of the tiny model, in exactly the form load_sdxl infers them back from shapes.

    Text widths differ (CLIP-L 32, bigG 48, projection 40) so a swapped concat or an untransposed
    projection fails loudly instead of passing by symmetry.
    """
    layout = K.UNetLayout(
        down_depths=((0, 0), (1, 1), (2, 2)), up_depths=((2, 2, 2), (1, 1, 1), (0, 0, 0)), mid_depth=2
    )
    te1 = _clip_config(vocab_size, 32, 2, 64, openclip=False)
    te2 = _clip_config(vocab_size, 48, 3, 96, openclip=True, proj=40)
    return {
        "unet": _unet_config((32, 64, 64), layout, 32 + 48, 40),
        "te1": te1,
        "te2": te2,
        "vae": _vae_config((32, 32, 32, 32), 1),
        "layout": layout,
    }


def vega_configs() -> dict:
    """Segmind-Vega-shaped: SDXL widths, depths [0,0,1,1,2,2], a single-resnet mid block (Vega's
    ~31M-parameter mid block is one 1280-channel resnet), full-size CLIP-L, bigG and SDXL VAE."""
    layout = K.UNetLayout(
        down_depths=((0, 0), (1, 1), (2, 2)), up_depths=((2, 2, 2), (1, 1, 1), (0, 0, 0)), mid_depth=0
    )
    return {
        "unet": _unet_config((320, 640, 1280), layout, 2048, 1280),
        "te1": _clip_config(49408, 768, 12, 3072, openclip=False),
        "te2": _clip_config(49408, 1280, 32, 5120, openclip=True, proj=1280),
        "vae": _vae_config((128, 256, 512, 512), 2),
        "layout": layout,
    }


def _random_state(net: torch.nn.Module, seed: int, dtype: torch.dtype, te: bool = False) -> dict[str, torch.Tensor]:
    """Seeded per-name random weights: fan-in scaled for linear/conv, ~1 for norms, small elsewhere.
    Every tensor is distinct so layout-conversion mistakes cannot cancel out."""
    out = {}
    for mod_name, module in net.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            key = f"{mod_name}.{p_name}" if mod_name else p_name
            if te:  # canonical names: the weights must not depend on the transformers version
                key = convert.canonical_te_name(key)
            g = torch.Generator().manual_seed(seed ^ zlib.crc32(key.encode()))
            t = torch.randn(p.shape, generator=g)
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and p_name == "weight":
                t = 1.0 + 0.1 * t
            elif p_name == "weight" and p.ndim >= 2 and not isinstance(module, torch.nn.Embedding):
                t = t / math.sqrt(p[0].numel())
            else:
                t = 0.02 * t
            out[key] = t.to(dtype)
    return out


def _build_state(cfgs: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    v = cfgs["te1"]["vocab_size"]
    ids = {"bos_token_id": v - 2, "eos_token_id": v - 1, "pad_token_id": v - 1}  # CLIP order: specials last
    with torch.device("meta"):  # shapes only; weights come from _random_state
        unet = UNet2DConditionModel(**cfgs["unet"])
        te1 = CLIPTextModel(CLIPTextConfig(**cfgs["te1"], **ids))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["te2"], **ids))
        vae = AutoencoderKL(**cfgs["vae"])
    parts = [_random_state(net, seed + i, dtype, te=i in (1, 2)) for i, net in enumerate((unet, te1, te2, vae))]
    return convert.to_single_file(*parts, cfgs["layout"])


def _save_atomic(sd: dict, path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))


def _write_tokenizers(path: str, merges: list[str]) -> int:
    """`<stem>_tokenizer/tokenizer{,_2}` beside the checkpoint (load_sdxl finds it); returns vocab size."""
    sizes = []

    def build(tmp) -> None:
        sizes.append(clip_tokenizers.write_bpe(os.path.join(tmp, "tokenizer"), merges))
        clip_tokenizers.write_bpe(os.path.join(tmp, "tokenizer_2"), merges, pad_token=clip_tokenizers.BIGG_PAD)

    atomic_directory(clip_tokenizers.sidecar_dir(path), build)
    return sizes[0]


def build_tiny_sdxl(path, *, seed: int = SEED) -> str:
    """Write the tiny random SDXL checkpoint (fp16, single-file layout) plus its tokenizer folder."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    vocab = _write_tokenizers(path, TINY_MERGES)
    sd = _build_state(tiny_configs(vocab), seed, torch.float16)
    _save_atomic(sd, path, {"emolora_test_model": f"{TINY_VERSION} seed={seed}"})
    return path


def build_vega_layout(path, *, seed: int = SEED) -> str:
    """Write a random Segmind-Vega-shaped checkpoint (~3.3 GB fp16) for ComfyUI integration tests."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_tokenizers(path, TINY_MERGES)
    sd = _build_state(vega_configs(), seed, torch.float16)
    _save_atomic(sd, path, {"emolora_test_model": f"vega-layout seed={seed}"})
    return path


def tiny_model_path() -> str:
    """Path of the cached tiny checkpoint under <cache>/models/, built on first use."""
    path = os.path.join(cache_root(), "models", f"{TINY_VERSION}.safetensors")
    if not (os.path.isfile(path) and os.path.isdir(clip_tokenizers.sidecar_dir(path))):
        build_tiny_sdxl(path)
    return path
