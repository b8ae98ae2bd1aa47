"""Content-keyed caches for VAE latents and text-encoder outputs, in memory or on disk.

A key is a sha256 over everything the cached tensor depends on: the image file's bytes (or the caption
text), the bucket and crop, the model hash and dtype. An edited image or caption therefore gets a new key and is
re-encoded; a stale entry is simply never asked for again.
"""

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write

log = logging.getLogger("emolora.data")

_VERSION = "1"  # bump when the preprocessing changes, so old disk entries stop matching


def latent_key(image_sha256: str, crop, model_hash: str, vae_dtype) -> str:
    """Key of one image's latents: its bytes, its bucket/crop/flip, the VAE it went through."""
    parts = ["latent", _VERSION, image_sha256, f"{crop.bucket}{crop.resized}{crop.left},{crop.top},{crop.flip}",
             model_hash, str(vae_dtype)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def text_key(caption: str, model_hash: str, te_dtype) -> str:
    """Key of one caption's text-encoder outputs."""
    return hashlib.sha256("|".join(["text", _VERSION, model_hash, str(te_dtype), caption]).encode()).hexdigest()


class FeatureCache:
    """Tensors by key. mode 'memory' keeps them in a dict; 'disk' writes one safetensors file per key."""

    def __init__(self, mode: str, directory=None):
        if mode not in ("memory", "disk"):
            raise ValueError(f"cache mode must be 'memory' or 'disk', got {mode!r}")
        if mode == "disk" and directory is None:
            raise ValueError("a disk cache needs a directory")
        self.mode = mode
        self.directory = Path(directory) if directory is not None else None
        self._mem: dict[str, dict[str, torch.Tensor]] = {}
        self.device = torch.device("cpu")  # where memory entries live (the GPU when they fit: move_to)
        self.hits = self.misses = 0

    def nbytes(self) -> int:
        """Bytes held in memory."""
        return sum(v.numel() * v.element_size() for entry in self._mem.values() for v in entry.values())

    def move_to(self, device) -> None:
        """Keep the memory entries (and later ones) on `device`: batches are then stacked there, no copy per
        step. For a memory cache that fits on the accelerator."""
        self.device = torch.device(device)
        self._mem = {k: {n: v.to(self.device) for n, v in entry.items()} for k, entry in self._mem.items()}

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return key in self._mem or (self.mode == "disk" and self._path(key).is_file())

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self._mem:
            self.hits += 1
            return self._mem[key]
        if self.mode == "disk" and (path := self._path(key)).is_file():
            try:
                # Owned, 64-byte-aligned copies: a view of the file's memory map sits wherever the header ends,
                # and CPU kernels given unaligned inputs can round differently from a run that encoded fresh.
                tensors = {k: v.clone() for k, v in load_file(path).items()}
            except Exception as e:  # a half-written or corrupt file: re-encode rather than fail the run
                log.warning("cache file %s is unreadable (%s); it will be re-encoded", path, e)
                path.unlink(missing_ok=True)
            else:
                self.hits += 1
                return tensors
        self.misses += 1
        return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if self.mode == "memory":
            self._mem[key] = {k: v.to(self.device) for k, v in tensors.items()}
            return
        atomic_write(self._path(key), lambda tmp: save_file(tensors, tmp, metadata={"key": key}))
