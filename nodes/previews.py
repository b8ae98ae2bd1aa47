"""Sample previews of a run for the Trainer node: the PNGs the trainer's sample() writes under <run>/samples/
(step-<step:06d>-<i>.png, one per prompt), as one strip image for ComfyUI's progress preview and as an IMAGE batch
for the node's output. Read from the files, so the trainer core needs no hook."""

from __future__ import annotations

import re
from pathlib import Path

PREVIEW_MAX = 768  # longest side of the strip sent to the browser (ComfyUI shrinks it to this)
_INDEX = re.compile(r"-(\d+)\.png$")


def sample_paths(run_dir, step: int) -> list[Path]:
    """The sample images made at `step`, in prompt order ([] if none were made, e.g. sampling failed)."""
    folder = Path(run_dir) / "samples"
    found = [(int(m.group(1)), p) for p in folder.glob(f"step-{int(step):06d}-*.png") if (m := _INDEX.search(p.name))]
    return [p for _, p in sorted(found)]


def load_images(paths) -> list:
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def strip(images):
    """The images side by side (one preview for the whole set)."""
    from PIL import Image

    width, height = sum(im.width for im in images), max(im.height for im in images)
    canvas = Image.new("RGB", (width, height))
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


def to_image_batch(images, fallback_size: int = 64):
    """ComfyUI IMAGE: float [N, H, W, 3] in 0..1. Images of another size than the first are resized to it; no
    images gives one black frame (a run without sample prompts)."""
    import numpy as np
    import torch

    if not images:
        return torch.zeros(1, fallback_size, fallback_size, 3)
    size = images[0].size
    arrays = [np.asarray(im if im.size == size else im.resize(size), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))
