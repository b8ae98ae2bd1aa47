"""Shared helpers of the data/training tests: small generated photos and bad files."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo(size=(96, 64), seed=0) -> Image.Image:
    """A smooth, photo-like RGB image: gradients, a blob and mild noise, different per seed."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0, 1, (3, 3))
    cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.15, 0.35) * min(w, h)
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    img = np.stack([c[i, 0] * x / w + c[i, 1] * y / h + c[i, 2] * blob for i in range(3)], -1)
    img = img / img.max() * 230 + rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_item(folder, stem, caption, size=(96, 64), seed=0, ext=".png"):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photo(size, seed).save(folder / f"{stem}{ext}")
    if caption is not None:
        (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return folder / f"{stem}{ext}"


def make_dataset(folder, n=4, sizes=((96, 64), (64, 96), (80, 80)), captions=None):
    """n images with captions, sizes cycling through `sizes` (several buckets)."""
    words = ["red", "green", "blue", "golden", "small", "large", "round", "tall"]
    for i in range(n):
        cap = captions[i] if captions else f"a photo of a {words[i % len(words)]} blob, soft light"
        write_item(folder, f"img{i:02d}", cap, size=sizes[i % len(sizes)], seed=i)
    return Path(folder)


def png_rgb16(w=16, h=12) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    arr = (np.arange(w * h * 3, dtype=np.uint32).reshape(h, w, 3) * 997 % 65536).astype(">u2")
    raw = b"".join(b"\x00" + arr[r].tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def make_bad_folder(folder):
    """Good images plus one of each bad kind. Returns (good stems, {bad file name: expected action})."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good = []
    for i in range(3):
        write_item(folder, f"good{i}", f"good photo {i}", seed=10 + i)
        good.append(f"good{i}")
    bad = {}
    buf = io.BytesIO()
    photo((64, 64), 1).save(buf, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "truncated.txt").write_text("half a file")
    bad["truncated.jpg"] = "skipped"
    (folder / "empty.png").write_bytes(b"")
    (folder / "empty.txt").write_text("nothing")
    bad["empty.png"] = "skipped"
    photo((64, 48), 2).convert("CMYK").save(folder / "cmyk.jpg", "JPEG")
    (folder / "cmyk.txt").write_text("a cmyk photo")
    bad["cmyk.jpg"] = "converted"
    gray16 = (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    (folder / "gray16.txt").write_text("a 16-bit grey photo")
    bad["gray16.png"] = "converted"
    (folder / "rgb16.png").write_bytes(png_rgb16())
    (folder / "rgb16.txt").write_text("a 16-bit colour photo")
    bad["rgb16.png"] = "converted"
    rgba = photo((64, 64), 3).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((64, 64)))
    rgba.save(folder / "rgba.png")
    (folder / "rgba.txt").write_text("a transparent photo")
    bad["rgba.png"] = "converted"
    (folder / "orphan.txt").write_text("a caption without its image")
    bad["orphan.txt"] = "skipped"
    photo((64, 64), 4).save(folder / "nocaption.png")
    bad["nocaption.png"] = "skipped"
    (folder / "notes.json").write_text("{}")
    bad["notes.json"] = "ignored"
    return good, bad


# ---- training helpers (import torch lazily: the data tests above do not need it) ------------------------------
def tiny_config(tmp_path, *, n_images=6, sizes=((96, 64), (128, 48), (48, 128)), **overrides):
    """A TrainConfig for the real tiny SDXL checkpoint at 64 px on a fresh generated dataset."""
    from trainer.config import TrainConfig
    from trainer.model import tiny_model_path

    data = make_dataset(tmp_path / "data", n=n_images, sizes=sizes)
    base = dict(model=tiny_model_path(), data=str(data), output=str(tmp_path / "out" / "lora.safetensors"),
                resolution=64, bucket_step=32, rank=4, batch_size=2, steps=6, seed=1, optimizer="EmoNavi",
                lr=1e-3, gradient_checkpointing=False, device="cpu", save_dtype="fp32")
    return TrainConfig(**{**base, **overrides}).validate()


def spy_optimizer_class():
    import torch

    class SpyAdamW(torch.optim.AdamW):
        """AdamW that takes loss= like the Emo optimizers and records every value it was given."""

        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            self.losses = []
            self.should_stop = False
            self.stop_at = None  # step count at which should_stop turns on

        def step(self, closure=None, *, loss=None):
            self.losses.append(loss)
            if self.stop_at is not None and len(self.losses) >= self.stop_at:
                self.should_stop = True
            return super().step(closure)

        @property
        def telemetry(self):
            return {"spy_loss": self.losses[-1], "should_stop": self.should_stop}

    return SpyAdamW


def lora_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def trained_then_resumed(tmp_path, stop_at: int, **options):
    """The same run twice: uninterrupted (tmp_path/a), and stopped by an interrupt after step `stop_at`, then
    resumed from its run folder (tmp_path/b). -> (the uninterrupted TrainResult, the resumed one)."""
    import pytest

    from trainer.config import resume_config
    from trainer.runstore import RunReader
    from trainer.train import train

    ref = train(tiny_config(tmp_path / "a", **options))

    def stop(info):
        if info["step"] == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "b", **options), on_step=stop)
    run_dir = RunReader.list_runs(tmp_path / "b" / "out")[0]["run_dir"]
    return ref, train(resume_config(run_dir))
