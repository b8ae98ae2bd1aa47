"""Run INSIDE the ComfyUI test harness's venv (cwd = the ComfyUI source): apply a LoRA file with ComfyUI's own code.

    python comfy_lora_apply.py CHECKPOINT TE_BASES LORA OUT [LORA OUT ...]

The UNet is ComfyUI's own SDXL model built from CHECKPOINT (config detected from its shapes) and patched by a
ModelPatcher exactly as LoraLoader does (key map, convert_lora, load_lora, add_patches, patch_model). The text
encoders are not built (ComfyUI's SDXL CLIP has fixed full sizes); their key map comes from ComfyUI's
model_lora_keys_clip over the key names in TE_BASES (ComfyUI's clip_l./clip_g. spelling -> base weight), and each
patch is applied with comfy.lora.calculate_weight as the patcher would. Writes every patched weight to OUT and
prints one JSON line per LORA: {"warnings": [...], "patched": N}.
"""

import json
import logging
import os
import sys


def main(ckpt_path, te_bases_path, *pairs):
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, os.getcwd())  # the ComfyUI source folder
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    import torch
    from safetensors.torch import load_file, save_file

    records = []

    class Capture(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    logging.getLogger().addHandler(Capture())

    sd = comfy.utils.load_torch_file(ckpt_path)
    prefix = "model.diffusion_model."
    te_bases = load_file(te_bases_path)

    class ClipKeys:  # what model_lora_keys_clip reads of a CLIP model: its state dict's key names
        def state_dict(self):
            return te_bases

    unet_config = comfy.model_detection.detect_unet_config(sd, prefix)
    for lora_path, out_path in zip(pairs[::2], pairs[1::2]):
        model_config = comfy.supported_models.SDXL(unet_config)
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model(sd, prefix)
        model.load_model_weights(dict(sd), prefix)  # it pops what it loads
        key_map = comfy.lora.model_lora_keys_unet(model, {})
        key_map = comfy.lora.model_lora_keys_clip(ClipKeys(), key_map)
        records.clear()  # model set-up chatter (missing optional packages) is not about the LoRA
        lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(lora_path))
        loaded = comfy.lora.load_lora(lora, key_map)

        cpu = torch.device("cpu")
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        unet_patches = {k: v for k, v in loaded.items() if k.startswith("diffusion_model.")}
        unet_keys = set(patcher.add_patches(unet_patches, 1.0))
        patcher.patch_model(device_to=cpu, force_patch_weights=True)
        msd = model.state_dict()
        out = {k: msd[k].detach().float().contiguous() for k in unet_keys}
        for key, patch in loaded.items():
            if key.startswith("diffusion_model.") or key not in te_bases:
                continue
            weight = te_bases[key].float().clone()
            out[key] = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight, key).contiguous()
        records.extend(f"NOT LOADED {k}" for k in sorted(set(loaded) - set(out)))
        save_file(out, out_path)
        print(json.dumps({"warnings": list(records), "patched": len(out)}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
