"""The demo photos: eight generated images with captions, the data of `trainer demo` and of the pretrained tiny base."""

from pathlib import Path

DEMO_DATA_VERSION = "demo-data-v1"


def demo_dataset(root) -> Path:
    """Eight generated 'photos' with captions, built once (atomically) under root/<version>."""
    import numpy as np
    from PIL import Image

    from ..atomic import atomic_directory

    final = Path(root) / DEMO_DATA_VERSION
    if (final / ".complete").is_file():
        return final

    def build(tmp: Path) -> None:
        colors = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
        sizes = [(128, 96), (96, 128), (112, 112), (128, 80)]
        for i, (name, rgb) in enumerate(list(colors.items()) * 2):
            rng = np.random.default_rng(i)
            w, h = sizes[i % len(sizes)]
            y, x = np.mgrid[0:h, 0:w]
            cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(0.2, 0.3) * min(w, h)
            sky = np.stack([x / w * 60 + 150, y / h * 40 + 170, np.full_like(x, 235.0)], -1)
            disk = ((x - cx) ** 2 + (y - cy) ** 2 < r * r)[..., None]
            img = np.where(disk, np.array(rgb, dtype=float), sky) + rng.normal(0, 6, (h, w, 3))
            shape = "ball" if i < 4 else "disc"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp / f"{i:02d}_{name}.png")
            (tmp / f"{i:02d}_{name}.txt").write_text(f"a {name} {shape} on a pale sky, photo", encoding="utf-8")
        (tmp / ".complete").write_text(DEMO_DATA_VERSION)

    return atomic_directory(final, build)


def demo_root() -> Path:
    """<cache>/demo: where `trainer demo` keeps its data, caches and LoRA."""
    from ..cachedir import cache_root

    return Path(cache_root()) / "demo"
