"""Where EmoLoRA keeps what it can rebuild: tiny test models, demo data, the ComfyUI test install, model hashes."""

import os


def cache_root() -> str:
    """$EMOLORA_CACHE, or ~/.cache/emolora."""
    return os.environ.get("EMOLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "emolora")
