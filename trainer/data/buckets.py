"""Aspect-ratio buckets (kohya-like) and the resize/crop that fills one, with SDXL's size conditioning.

A bucket is (width, height), both multiples of `step`, with about resolution² pixels. Each image goes to the
bucket whose aspect ratio is closest, is resized to cover it and cropped. SDXL is conditioned on
add_time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w); as in kohya, the target is the
bucket.
"""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

Bucket = tuple[int, int]


def default_side_limits(resolution: int, step: int) -> tuple[int, int]:
    """Sides from resolution/2 to 2·resolution: aspect ratios up to 4:1 at the same area."""
    lo = max(step, math.ceil(resolution / 2 / step) * step)
    return lo, max(resolution * 2, lo)


def make_buckets(resolution: int, *, step: int = 64, min_side: int | None = None,
                 max_side: int | None = None) -> list[Bucket]:
    """All (w, h) with w·h <= resolution², sides multiples of `step` within [min_side, max_side]; sorted."""
    d_lo, d_hi = default_side_limits(resolution, step)
    min_side = min_side or d_lo
    max_side = max_side or d_hi
    if resolution % step or min_side % step or max_side % step:
        raise ValueError(f"resolution {resolution}, min side {min_side} and max side {max_side} must be "
                         f"multiples of the bucket step {step}")
    if not min_side <= resolution <= max_side:
        raise ValueError(f"resolution {resolution} must lie between the bucket sides {min_side} and "
                         f"{max_side}")
    area = resolution * resolution
    buckets = set()
    for w in range(min_side, resolution + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            buckets.update({(w, h), (h, w)})  # explicit mirror: flooring alone is not symmetric
    return sorted(buckets)


def assign_bucket(size: tuple[int, int], buckets: list[Bucket]) -> Bucket:
    """The bucket closest in log aspect ratio to an image of `size` (w, h); ties go to the first listed."""
    target = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


@dataclass(frozen=True)
class Crop:
    """How one image fills its bucket: resize to `resized`, crop at (left, top), maybe mirror."""

    bucket: Bucket
    resized: tuple[int, int]
    left: int
    top: int
    flip: bool
    time_ids: tuple[int, int, int, int, int, int]  # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)


def plan_crop(size: tuple[int, int], bucket: Bucket, *, flip: bool = False,
              rng: np.random.Generator | None = None) -> Crop:
    """Cover the bucket, crop (random with an rng, else centred). Needs only the image size, not its pixels.

    The crop's left edge is measured on the mirrored image when flipped, so the conditioning describes what
    the model sees (as kohya does).
    """
    bw, bh = bucket
    w, h = size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if rng is None:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    else:
        left, top = int(rng.integers(0, rw - bw + 1)), int(rng.integers(0, rh - bh + 1))
    cond_left = rw - (left + bw) if flip else left
    return Crop(bucket, (rw, rh), left, top, flip, (h, w, top, cond_left, bh, bw))


def apply_crop(img: Image.Image, crop: Crop) -> Image.Image:
    """The image exactly bucket-sized, as planned."""
    if img.size != crop.resized:
        img = img.resize(crop.resized, Image.Resampling.LANCZOS)
    bw, bh = crop.bucket
    img = img.crop((crop.left, crop.top, crop.left + bw, crop.top + bh))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if crop.flip else img
