"""Loss masks: a same-stem `<stem>_mask.png` beside the image, or the image's own alpha channel.

White trains, black is ignored, grey weights in between. The mask follows the image's crop and flip and is
averaged down to the latent grid (8 px a cell), where it multiplies the elementwise loss (as kohya's masked
loss does: the loss is not renormalised by the masked area).
"""

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import Crop, apply_crop
from .images import IMAGE_EXTENSIONS, ImageError

MASK_SUFFIX = "_mask"
LATENT_CELL = 8  # SDXL's VAE: one latent per 8x8 pixels


def is_mask_stem(stem: str, stems_with_images) -> bool:
    """`photo_mask` is the mask of `photo` when an image named `photo` sits in the same folder."""
    return stem.endswith(MASK_SUFFIX) and stem[: -len(MASK_SUFFIX)] in stems_with_images


def mask_file_for(image: Path, files_by_stem: dict) -> Path | None:
    """The image's `<stem>_mask.<image ext>` among its folder's files (by stem), if there is one."""
    for path in files_by_stem.get(image.stem + MASK_SUFFIX, ()):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return path
    return None


def read_mask(path: Path, channel: str, size: tuple[int, int]) -> Image.Image:
    """The mask as an 8-bit grey image of `size` (the image's size after EXIF orientation). channel "L": the
    file's luminance; "A": its alpha channel. Raises ImageError naming what is wrong."""
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as src:
            src.load()
            img = ImageOps.exif_transpose(src)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"unreadable mask {path.name} ({e})") from None
    if channel == "A":
        if "A" not in img.getbands() and not (img.mode == "P" and "transparency" in img.info):
            raise ImageError("alpha masks were asked for but the image has no alpha channel")
        grey = img.convert("RGBA").getchannel("A")
    else:
        grey = img.convert("L")
    if grey.size != tuple(size):
        raise ImageError(f"mask {path.name} is {grey.size[0]}x{grey.size[1]} but the image is {size[0]}x{size[1]}")
    return grey


def latent_mask(mask: Image.Image, crop: Crop) -> torch.Tensor:
    """(1, h/8, w/8) float32 weights in [0, 1] for the crop's latents: crop and flip as the image, then the mean
    of each 8x8 cell."""
    cropped = apply_crop(mask, crop)
    bw, bh = crop.bucket
    cells = cropped.resize((bw // LATENT_CELL, bh // LATENT_CELL), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(cells, dtype=np.float32) / 255.0)[None]
