"""SDXL model + LoRA half of the EmoLoRA trainer core.

API (used by the training loop):
    load_sdxl(path, *, dtype=fp32, vae_dtype=fp32, tokenizer_dir=None, device="cpu") -> SDXLModel
        single-file .safetensors (original layout, config inferred from shapes) or diffusers folder; offline.
    SDXLModel: unet, te1, te2, vae, tokenizer1, tokenizer2, prediction_type ("epsilon"|"v_prediction"),
        zero_terminal_snr, scheduler_config (SDXL DDPM training schedule), source, arch ("sdxl", "ssd-1b",
        "vega", "sdxl-custom", "tiny-sdxl"), tokenizer_source, name; model_hash (whole-file SHA-256, lazy,
        = kohya ss_new_sd_model_hash) and legacy_hash (A1111 8-hex, = ss_sd_model_hash).
    encode_prompts(model, captions, *, device=None) -> (prompt_embeds [B,77,ctx], pooled [B,pool])
    encode_latents(model, images, *, generator=None, sample=True) -> latents * scaling_factor (fp32)
    LoRANetwork(model, rank=16, alpha=16.0, dropout=0.0, conv_rank=0, conv_alpha=1.0, train_te=False,
                te_rank=None, *, te_alpha=None, multiplier=1.0, network="lora"|"loha"|"lokr"|"oft"|"boft",
                dora=False, rslora=False, lokr_factor=-1, lokr_full_matrix=False, lokr_decompose_both=False,
                tucker=False, oft_rescale=False, oft_constraint=0.0)
        .trainable_parameters() .param_groups(unet_lr, te_lr=None) .kohya_state_dict(dtype=fp16)
        .load_weights(path_or_state_dict, *, strict=True) -> {"loaded", "missing", "unknown", "steps_before"}
        .set_multiplier(m) .remove() .to(device); .loras: kohya name -> adapter (adapters/)
    load_network_weights(network, path_or_state_dict, *, strict=True): continue from a LoRA/LoHa/LoKr/DoRA/OFT file
    save_lora(path, network, metadata, dtype=fp16): atomic write, adds sshs_model_hash / sshs_legacy_hash
    kohya_metadata(*, network, model, output_name, steps, epoch, learning_rate, ..., extra=None, **ss)
        -> dict[str, str]; any extra keyword k becomes ss_k, `extra` passes through (emolora_* keys)
    tiny_model_path(), build_tiny_sdxl(path), build_vega_layout(path): random-weight test checkpoints
    pretrained_tiny_model_path(), build_pretrained_tiny(path): the tiny model with its UNet fine-tuned on the
        demo photos (a loss that varies with the timestep like a trained model's), cached
    ModelError (unusable base checkpoint / tokenizer), LoRAError (LoRA file does not fit the network)
"""

from .encode import encode_latents, encode_prompts
from .errors import LoRAError, ModelError
from .export import kohya_metadata, save_lora
from .loader import SDXLModel, load_sdxl
from .lora import LoRANetwork
from .lora_file import load_network_weights
from .pretrained import build_pretrained_tiny, pretrained_tiny_model_path
from .tiny import build_tiny_sdxl, build_vega_layout, tiny_model_path

__all__ = [
    "LoRAError",
    "LoRANetwork",
    "ModelError",
    "SDXLModel",
    "build_pretrained_tiny",
    "build_tiny_sdxl",
    "build_vega_layout",
    "encode_latents",
    "encode_prompts",
    "kohya_metadata",
    "load_network_weights",
    "load_sdxl",
    "pretrained_tiny_model_path",
    "save_lora",
    "tiny_model_path",
]
