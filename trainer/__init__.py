"""EmoLoRA trainer core: SDXL model loading, LoRA injection/export, data pipeline and training loop.

Kept import-light on purpose: ComfyUI imports this package at start-up, so heavy libraries
(diffusers, transformers) are only imported inside the functions that need them.
"""
