"""diffusers <-> original SDXL name mapping, checked on real architectures built on the meta device
(no weights) and against diffusers' own independent single-file converter."""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from trainer.model import LoRANetwork, convert, detect
from trainer.model import sdxl_keys as K
from trainer.model.tiny import tiny_configs, vega_configs

# The official SDXL base UNet config (layout-relevant fields).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
BIG_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32}

KOHYA_RE = re.compile(
    r"^lora_(unet_((input|output)_blocks_\d+_1|middle_block_1)_(proj_in|proj_out|transformer_blocks_\d+_"
    r"(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))"
    r"|te[12]_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12]))$"
)


def meta_unet(cfg):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**cfg)


def meta_model(unet_cfg, te1=CLIP_L, te2=BIG_G):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    heads = {"num_attention_heads": 1, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    with torch.device("meta"):
        return SimpleNamespace(
            unet=meta_unet(unet_cfg),
            te1=CLIPTextModel(CLIPTextConfig(**te1, **heads)),
            te2=CLIPTextModelWithProjection(CLIPTextConfig(**te2, **heads, projection_dim=te2["hidden_size"])),
        )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_meta():
    return meta_model(SDXL_UNET)


def test_sdxl_example_names():
    m = K.unet_module_map(K.layout_from_diffusers_config(SDXL_UNET))
    tb = "transformer_blocks"
    expected = {
        f"down_blocks.1.attentions.0.{tb}.0.attn1.to_q": f"input_blocks.4.1.{tb}.0.attn1.to_q",
        f"down_blocks.2.attentions.0.{tb}.9.ff.net.0.proj": f"input_blocks.7.1.{tb}.9.ff.net.0.proj",
        f"mid_block.attentions.0.{tb}.0.attn2.to_k": f"middle_block.1.{tb}.0.attn2.to_k",
        f"up_blocks.0.attentions.0.{tb}.0.attn2.to_out.0": f"output_blocks.0.1.{tb}.0.attn2.to_out.0",
        "down_blocks.1.attentions.0.proj_in": "input_blocks.4.1.proj_in",
        "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
        "down_blocks.0.resnets.1.time_emb_proj": "input_blocks.2.0.emb_layers.1",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.2.norm1": "output_blocks.8.0.in_layers.0",
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_out": "out.2",
    }
    for diffusers_name, sgm_name in expected.items():
        assert m[diffusers_name] == sgm_name
    assert "up_blocks.2.upsamplers.0.conv" not in m  # the last level has no upsampler
    assert K.kohya_unet_name(m["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]) == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )


def test_sdxl_default_targets_are_kohyas_722_plus_264(sdxl_meta):
    net = LoRANetwork(sdxl_meta, rank=4, train_te=True)
    names = sorted(net.loras)
    assert sum(n.startswith("lora_unet_") for n in names) == 722
    assert sum(n.startswith("lora_te1_") for n in names) == 72
    assert sum(n.startswith("lora_te2_") for n in names) == 192
    assert all(KOHYA_RE.match(n) for n in names), [n for n in names if not KOHYA_RE.match(n)][:5]
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_31_mlp_fc2",
    ):
        assert name in net.loras
    net.remove()
    # LoCon adds the 3x3 convs of every resnet/resampler plus their time-embedding Linear and 1x1 shortcut.
    conv = LoRANetwork(sdxl_meta, rank=4, conv_rank=2)
    extra = sorted(set(conv.loras) - set(names))
    assert len(conv.loras) == 722 + 66
    assert "lora_unet_input_blocks_3_0_op" in extra and "lora_unet_output_blocks_2_2_conv" in extra
    assert conv.loras["lora_unet_input_blocks_1_0_in_layers_2"].rank == 2
    assert conv.loras["lora_unet_input_blocks_1_0_emb_layers_1"].rank == 4
    assert conv.loras["lora_unet_input_blocks_4_0_skip_connection"].rank == 4
    conv.remove()


@pytest.mark.parametrize("name", ["sdxl", "vega", "tiny"])
def test_unet_map_agrees_with_diffusers_converter(name):
    """Our original names, fed to diffusers' own LDM->diffusers converter, land on the same modules."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = {"sdxl": SDXL_UNET, "vega": vega_configs()["unet"], "tiny": tiny_configs(600)["unet"]}[name]
    unet = meta_unet(cfg)
    layout = K.layout_from_diffusers_config(dict(unet.config))
    diff = dict(unet.state_dict())
    sgm, left = convert.unet_from_diffusers(diff, layout)
    assert not left
    ckpt = {K.UNET_PREFIX + k: v for k, v in sgm.items()}
    converted = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    assert set(converted) == set(diff)
    for key, tensor in converted.items():
        assert tensor is diff[key], key
    parts = {"unet": sgm, "te2": {}, "vae": {}}
    assert convert.unplaced(parts, layout)["UNet"] == []  # every name we write is one the loader accepts
    parts["unet"] = dict(sgm, **{"input_blocks.99.0.in_layers.0.weight": torch.zeros(1)})
    assert convert.unplaced(parts, layout)["UNet"] == ["input_blocks.99.0.in_layers.0.weight"]


@pytest.mark.parametrize("name", ["sdxl", "vega", "tiny", "ssd1b_like"])
def test_layout_and_config_round_trip_from_shapes(name):
    """Config -> module tree -> original-layout shapes -> inferred config reproduces the architecture."""
    if name == "sdxl":
        cfg = SDXL_UNET
    elif name == "ssd1b_like":  # asymmetric up path, as in SSD-1B-style distillations
        cfg = dict(SDXL_UNET, transformer_layers_per_block=[[1, 1], [2, 2], [4, 4]])
        cfg["reverse_transformer_layers_per_block"] = [[4, 4, 10], [2, 1, 1], [1, 1, 1]]
    else:
        cfg = (vega_configs() if name == "vega" else tiny_configs(600))["unet"]
    unet = meta_unet(cfg)
    layout = K.layout_from_diffusers_config(dict(unet.config))
    assert K.layout_from_diffusers_config(K.diffusers_config_layout_fields(layout)) == layout
    sgm, _ = convert.unet_from_diffusers(dict(unet.state_dict()), layout)
    shapes = {k: tuple(v.shape) for k, v in sgm.items()}
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    inferred, inferred_layout = detect.infer_unet(shapes, pooled)
    assert inferred_layout == layout
    rebuilt = meta_unet(inferred)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}
    if name == "vega":
        assert layout.mid_depth == 0 and [d for lvl in layout.down_depths for d in lvl] == [0, 0, 1, 1, 2, 2]


def test_te2_and_vae_maps_agree_with_diffusers_converters():
    """Our reverse maps (the test checkpoints' writer) round-trip through diffusers' forward converters (the
    loader's) to the very same tensors, and every name they write is one the loader's placement check accepts."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_open_clip_checkpoint

    cfgs = tiny_configs(600)
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["te2"], bos_token_id=0, eos_token_id=2, pad_token_id=1))
    hf = {convert.canonical_te_name(k): v for k, v in te2.state_dict().items() if not k.endswith("position_ids")}
    oc, left = convert.te2_from_hf(hf)
    assert not left
    theirs = convert_open_clip_checkpoint(te2, {K.TE2_PREFIX + k: v for k, v in oc.items()}, prefix=K.TE2_PREFIX)
    theirs = {convert.canonical_te_name(k): v for k, v in theirs.items()}
    assert set(theirs) == set(hf)
    for key, value in hf.items():
        assert torch.equal(theirs[key], value), key

    vae = AutoencoderKL(**cfgs["vae"])
    ldm, left = convert.vae_from_diffusers(dict(vae.state_dict()))
    assert not left
    theirs = convert_ldm_vae_checkpoint({K.VAE_PREFIX + k: v for k, v in ldm.items()}, dict(vae.config))
    assert set(theirs) == set(vae.state_dict())
    for key, value in vae.state_dict().items():
        assert torch.equal(theirs[key], value), key
    layout = tiny_configs(600)["layout"]
    assert convert.unplaced({"unet": {}, "te2": oc, "vae": ldm}, layout) == {"UNet": [], "OpenCLIP bigG": [], "VAE": []}


def test_importing_the_package_stays_light():
    code = (
        "import sys, trainer, trainer.model\n"
        "heavy = [m for m in ('diffusers', 'transformers', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)), check=True)
