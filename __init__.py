"""EmoLoRA: train SDXL LoRAs inside ComfyUI with the Emo optimizer family.

ComfyUI entry point (V3 schema). Importing this package is cheap: no torch, diffusers or ComfyUI module is
imported until ComfyUI calls comfy_entrypoint(); a node whose optional dependency is missing is left out with a
log line naming it and the reason, and ComfyUI starts anyway.
"""

WEB_DIRECTORY = "./web/js"


async def comfy_entrypoint():
    from .nodes import make_extension

    return make_extension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
