"""Image files: decode fully, apply EXIF orientation, convert to 8-bit RGB with one note per conversion."""

import contextlib
import io

import numpy as np
from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class ImageError(ValueError):
    """A file that cannot be used as a training image (the message says why)."""


@contextlib.contextmanager
def _strict_truncation():
    # Some hosts (ComfyUI's image loader among them) flip this global on; a truncated JPEG would then decode
    # silently with a grey bottom half and poison the training set.
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def load_image(data: bytes) -> tuple[Image.Image, str | None]:
    """The file's bytes -> (8-bit RGB image, note describing the conversion or None). Raises ImageError."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with _strict_truncation():
            img = Image.open(io.BytesIO(data))
            rawmodes = [str(t.args) for t in img.tile] if img.tile else []
            frames = getattr(img, "n_frames", 1)
            img.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"unreadable or truncated image ({e})") from None
    notes = []
    if frames > 1:
        notes.append(f"{frames} frames, the first is used")
    if any(";16" in r for r in rawmodes) and img.mode in ("RGB", "RGBA"):
        notes.append("16-bit per channel reduced to 8-bit")
    img = ImageOps.exif_transpose(img)
    rgb, note = _to_rgb(img)
    if note:
        notes.append(note)
    return rgb, "; ".join(notes) or None


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        # 16-bit files decode as I;16 (0..65535); 32-bit int/float ones are scaled by their own maximum.
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F" or (mode == "I" and arr.max(initial=0) > 65535):
            top = max(float(arr.max(initial=0)), 1.0)
        gray = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        note = f"{_mode_name(mode)} grayscale converted to 8-bit RGB"
        return Image.fromarray(gray, "L").convert("RGB"), note
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} transparency composited on white"
    if mode == "CMYK":
        return img.convert("RGB"), "CMYK converted to RGB"
    if mode == "P":
        return img.convert("RGB"), "palette image converted to RGB"
    if mode in ("L", "1"):
        return img.convert("RGB"), "grayscale converted to RGB"
    return img.convert("RGB"), f"{mode} converted to RGB"


def _mode_name(mode: str) -> str:
    return {"F": "32-bit float", "I": "32-bit"}.get(mode, "16-bit")


def to_tensor_array(img: Image.Image) -> np.ndarray:
    """RGB image -> float32 CHW array in [-1, 1], the VAE's input range."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
