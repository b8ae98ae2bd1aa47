"""Name mapping between diffusers modules and the ORIGINAL (SGM/LDM) SDXL layout.

kohya LoRA keys, ComfyUI's loader and single-file checkpoints all use the original names
(`input_blocks.4.1...`), while we train on diffusers modules (`down_blocks.1.attentions.0...`).
The UNet map is derived from the block layout (levels, resnets per level, transformer depth per
layer), so SDXL base, SSD-1B, Vega and tiny variants share one code path. Pure name logic: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# Checkpoint prefixes of a single-file SDXL checkpoint (ComfyUI models/checkpoints layout).
UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."

# diffusers ResnetBlock2D child -> SGM ResBlock child.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers top-level UNet modules -> SGM names.
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


@dataclass(frozen=True)
class UNetLayout:
    """Block structure shared by the SGM and diffusers SDXL UNets.

    down_depths[level][layer]: transformer depth after each down resnet (0 = no attention).
    up_depths[block][layer]: same for the up path, in diffusers order (deepest level first),
    with layers_per_block[level] + 1 entries per block.
    mid_depth: >= 1 resnet/transformer/resnet; 0 a single resnet (Segmind Vega); None no mid block.
    """

    down_depths: tuple[tuple[int, ...], ...]
    up_depths: tuple[tuple[int, ...], ...]
    mid_depth: int | None

    @property
    def num_levels(self) -> int:
        return len(self.down_depths)

    @property
    def layers_per_block(self) -> tuple[int, ...]:
        return tuple(len(d) for d in self.down_depths)

    def validate(self) -> None:
        n = self.num_levels
        if n < 1 or len(self.up_depths) != n:
            raise ValueError(f"UNet layout needs as many up as down blocks: {self}")
        for i, up in enumerate(self.up_depths):
            if len(up) != self.layers_per_block[n - 1 - i] + 1:
                raise ValueError(f"up block {i} has {len(up)} layers, expected {self.layers_per_block[n - 1 - i] + 1}")
        for depths in (*self.down_depths, *self.up_depths):
            if any(d > 0 for d in depths) and not all(d > 0 for d in depths):
                # diffusers builds a whole block either with or without attention.
                raise ValueError(f"mixed attention/no-attention layers in one block are unsupported: {depths}")


def layout_from_diffusers_config(cfg: dict) -> UNetLayout:
    """Block layout of a diffusers UNet2DConditionModel config (mirrors diffusers' own defaults)."""
    down_types = list(cfg["down_block_types"])
    up_types = list(cfg["up_block_types"])
    n = len(down_types)
    lpb = cfg.get("layers_per_block", 2)
    lpb = [lpb] * n if isinstance(lpb, int) else list(lpb)
    tl = cfg.get("transformer_layers_per_block", 1)
    tl = [tl] * n if isinstance(tl, int) else list(tl)
    rev = cfg.get("reverse_transformer_layers_per_block")
    rev = list(reversed(tl)) if rev is None else list(rev)

    def per_layer(value, count: int) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * count

    down = tuple(per_layer(tl[i], lpb[i]) if "CrossAttn" in down_types[i] else (0,) * lpb[i] for i in range(n))
    up = tuple(
        per_layer(rev[i], lpb[n - 1 - i] + 1) if "CrossAttn" in up_types[i] else (0,) * (lpb[n - 1 - i] + 1)
        for i in range(n)
    )
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type == "UNetMidBlock2DCrossAttn":
        mid = per_layer(tl[-1], 1)[0]
    elif mid_type == "UNetMidBlock2D":
        mid = 0
    elif mid_type is None:
        mid = None
    else:
        raise ValueError(f"unsupported mid_block_type {mid_type!r}")
    layout = UNetLayout(down, up, mid)
    layout.validate()
    return layout


def diffusers_config_layout_fields(layout: UNetLayout) -> dict:
    """The layout-dependent fields of a diffusers UNet config (inverse of layout_from_diffusers_config)."""
    layout.validate()
    down_types = ["CrossAttnDownBlock2D" if d[0] else "DownBlock2D" for d in layout.down_depths]
    up_types = ["CrossAttnUpBlock2D" if d[0] else "UpBlock2D" for d in layout.up_depths]
    lpb = layout.layers_per_block
    # Levels without attention get depth 1 like the official SDXL config (the value is unused there).
    down = [list(d) if d[0] else [1] * len(d) for d in layout.down_depths]
    up = [list(d) if d[0] else [1] * len(d) for d in layout.up_depths]
    uniform = all(len(set(d)) == 1 for d in down + up)
    mid = layout.mid_depth
    simple = uniform and [u[0] for u in up] == [d[0] for d in reversed(down)] and (mid in (None, 0, down[-1][0]))
    fields = {
        "down_block_types": down_types,
        "up_block_types": up_types,
        "layers_per_block": lpb[0] if len(set(lpb)) == 1 else list(lpb),
        "mid_block_type": {None: None, 0: "UNetMidBlock2D"}.get(mid, "UNetMidBlock2DCrossAttn"),
    }
    if simple:
        fields["transformer_layers_per_block"] = [d[0] for d in down]
        fields["reverse_transformer_layers_per_block"] = None
    else:
        if mid not in (None, 0) and mid != down[-1][0]:
            # diffusers takes the mid depth from the first layer of the deepest down block.
            raise ValueError(f"mid depth {mid} != first depth of the deepest down block {down[-1][0]}")
        fields["transformer_layers_per_block"] = down
        fields["reverse_transformer_layers_per_block"] = up
    return fields


def _attention_children(depth: int) -> list[str]:
    """Leaf modules of a Transformer2DModel / SpatialTransformer (identical names in both layouts)."""
    names = ["norm", "proj_in", "proj_out"]
    for k in range(depth):
        b = f"transformer_blocks.{k}"
        names += [f"{b}.norm1", f"{b}.norm2", f"{b}.norm3", f"{b}.ff.net.0.proj", f"{b}.ff.net.2"]
        for a in ("attn1", "attn2"):
            names += [f"{b}.{a}.to_q", f"{b}.{a}.to_k", f"{b}.{a}.to_v", f"{b}.{a}.to_out.0"]
    return names


def _add_resnet(out: dict, diff: str, sgm: str) -> None:
    for d, s in _RESNET.items():
        out[f"{diff}.{d}"] = f"{sgm}.{s}"


def _add_attention(out: dict, diff: str, sgm: str, depth: int) -> None:
    for c in _attention_children(depth):
        out[f"{diff}.{c}"] = f"{sgm}.{c}"


def unet_module_map(layout: UNetLayout) -> dict[str, str]:
    """diffusers leaf-module name -> SGM module name for every weight-carrying UNet module.

    Resnet shortcuts (conv_shortcut/skip_connection) are listed for every resnet; callers keep only
    the names that exist in their model or checkpoint.
    """
    layout.validate()
    out = dict(_UNET_TOP)
    n = layout.num_levels
    idx = 0
    for lvl, depths in enumerate(layout.down_depths):
        for j, depth in enumerate(depths):
            idx += 1
            _add_resnet(out, f"down_blocks.{lvl}.resnets.{j}", f"input_blocks.{idx}.0")
            if depth:
                _add_attention(out, f"down_blocks.{lvl}.attentions.{j}", f"input_blocks.{idx}.1", depth)
        if lvl != n - 1:
            idx += 1
            out[f"down_blocks.{lvl}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
    if layout.mid_depth is not None:
        _add_resnet(out, "mid_block.resnets.0", "middle_block.0")
        if layout.mid_depth > 0:
            _add_attention(out, "mid_block.attentions.0", "middle_block.1", layout.mid_depth)
            _add_resnet(out, "mid_block.resnets.1", "middle_block.2")
    idx = 0
    for i, depths in enumerate(layout.up_depths):
        for j, depth in enumerate(depths):
            _add_resnet(out, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0")
            if depth:
                _add_attention(out, f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", depth)
            if j == len(depths) - 1 and i != n - 1:
                out[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{idx}.{2 if depth else 1}.conv"
            idx += 1
    return out


def kohya_unet_name(sgm_module: str) -> str:
    return "lora_unet_" + sgm_module.replace(".", "_")


def kohya_te_name(index: int, hf_module: str) -> str:
    """kohya name of a text-encoder module; index 1 = CLIP-L (te1), 2 = OpenCLIP bigG (te2)."""
    return f"lora_te{index}_" + hf_module.replace(".", "_")


# ---------------------------------------------------------------- text encoders
def te2_param_map(num_layers: int) -> dict[str, str]:
    """HF CLIPTextModelWithProjection param -> OpenCLIP param, for everything except the fused
    attention in-projection (split q/k/v, see te2_qkv_names) and text_projection (transposed)."""
    m = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for i in range(num_layers):
        hf, oc = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        for h, o in (
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("self_attn.out_proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ):
            for p in ("weight", "bias"):
                m[f"{hf}.{h}.{p}"] = f"{oc}.{o}.{p}"
    return m


def te2_qkv_names(layer: int) -> tuple[str, str, list[str]]:
    """(openclip in_proj_weight, in_proj_bias, [hf q, k, v projection prefixes]) of one layer."""
    oc = f"transformer.resblocks.{layer}.attn"
    hf = f"text_model.encoder.layers.{layer}.self_attn"
    return f"{oc}.in_proj_weight", f"{oc}.in_proj_bias", [f"{hf}.{x}_proj" for x in ("q", "k", "v")]


TE2_TEXT_PROJECTION = ("text_projection.weight", "text_projection")  # (HF, OpenCLIP): transposed
TE2_IGNORED = ("logit_scale", "attn_mask")  # OpenCLIP-only entries with no HF counterpart


# ---------------------------------------------------------------- VAE
def vae_module_map(num_levels: int, layers_per_block: int, mid_attention: bool = True) -> dict[str, str]:
    """diffusers AutoencoderKL leaf module -> LDM first_stage_model module (mid attention excluded:
    its q/k/v/proj_out are 1x1 convs in LDM and Linear in diffusers, see vae_attention_map)."""
    out = {
        "quant_conv": "quant_conv",
        "post_quant_conv": "post_quant_conv",
    }
    resnet = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    for side in ("encoder", "decoder"):
        out[f"{side}.conv_in"] = f"{side}.conv_in"
        out[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        out[f"{side}.conv_out"] = f"{side}.conv_out"
        for r, ldm in ((0, "block_1"), (1, "block_2")):
            for d, s in resnet.items():
                out[f"{side}.mid_block.resnets.{r}.{d}"] = f"{side}.mid.{ldm}.{s}"
        if mid_attention:
            out[f"{side}.mid_block.attentions.0.group_norm"] = f"{side}.mid.attn_1.norm"
    for i in range(num_levels):
        for j in range(layers_per_block):
            for d, s in resnet.items():
                out[f"encoder.down_blocks.{i}.resnets.{j}.{d}"] = f"encoder.down.{i}.block.{j}.{s}"
        if i != num_levels - 1:
            out[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        ldm_level = num_levels - 1 - i  # the LDM decoder indexes levels from the bottom
        for j in range(layers_per_block + 1):
            for d, s in resnet.items():
                out[f"decoder.up_blocks.{i}.resnets.{j}.{d}"] = f"decoder.up.{ldm_level}.block.{j}.{s}"
        if i != num_levels - 1:
            out[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{ldm_level}.upsample.conv"
    return out


def vae_attention_map() -> dict[str, str]:
    """diffusers VAE mid-attention projections (Linear) -> LDM (1x1 Conv2d)."""
    out = {}
    for side in ("encoder", "decoder"):
        a, b = f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1"
        out.update(
            {f"{a}.to_q": f"{b}.q", f"{a}.to_k": f"{b}.k", f"{a}.to_v": f"{b}.v", f"{a}.to_out.0": f"{b}.proj_out"}
        )
    return out
