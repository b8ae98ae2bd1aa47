"""The pretrained tiny base: the tiny random SDXL with its UNet fully fine-tuned on the demo photos.

The random tiny model's loss hardly depends on the timestep (per-step coefficient of variation ~0.03-0.07 at
batch 2), so an optimizer that reads the loss sees a flat signal. A trained diffusion model's loss swings
several-fold with the timestep (easy at high noise, hard at low noise). A few hundred full fine-tuning steps of
the UNet on the demo photos give the tiny model that shape (CV ~1 at 64 px), so loss-driven optimizers, the
loss normalisation and the optimizer sweep can be measured on the CPU on a base that behaves like a real one.

Built once into the cache (keyed by PRETRAINED_VERSION), atomically, as an ordinary single-file checkpoint with
the tiny model's tokenizer folder beside it: the trainer, ComfyUI and the nodes load it like any other.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import torch

from ..atomic import atomic_directory, atomic_write
from ..cachedir import cache_root
from . import clip_tokenizers, convert, detect
from . import sdxl_keys as K
from .tiny import TINY_VERSION, tiny_model_path

log = logging.getLogger("emolora.model")

# Bump when the recipe below, the tiny model or the demo photos change: the cache path includes it.
PRETRAINED_VERSION = f"{TINY_VERSION}-pretrained-v1"
STEPS = 300  # per-step loss CV ~1 at 64 px (docs/sweep-surfaces.md); under a minute of CPU time (the build logs it)
LR = 1e-3
RESOLUTION = 64  # the demo's and the tests' training resolution
BATCH_SIZE = 2
SEED = 20261206


def pretrained_tiny_model_path() -> str:
    """Path of the cached pretrained tiny checkpoint under <cache>/models/, built on first use."""
    path = os.path.join(cache_root(), "models", f"{PRETRAINED_VERSION}.safetensors")
    if not (os.path.isfile(path) and os.path.isdir(clip_tokenizers.sidecar_dir(path))):
        build_pretrained_tiny(path)
    return path


def _demo_data(model, seed: int):
    """The demo photos as the trainer batches them at RESOLUTION (buckets, flips, SDXL time ids), encoded once."""
    from ..config import TrainConfig
    from ..data import FeatureCache, TrainingData, scan_dataset
    from ..data.demo import demo_dataset, demo_root
    from .encode import encode_latents, encode_prompts

    folder = demo_dataset(demo_root())
    items, _ = scan_dataset(folder)
    cfg = TrainConfig(model=model.source, data=str(folder), output=os.devnull, resolution=RESOLUTION,
                      bucket_step=32, batch_size=BATCH_SIZE, flip_aug=True, seed=seed)

    def encode_images(pixels, s):
        return encode_latents(model, pixels, generator=torch.Generator().manual_seed(s))

    def encode_text(captions):
        with torch.no_grad():
            return encode_prompts(model, captions)

    data = TrainingData(items, cfg, encode_images=encode_images, encode_text=encode_text, model_hash=model.source,
                        latent_cache=FeatureCache("memory"), text_cache=FeatureCache("memory"))
    data.fill_caches()
    return data


def _fine_tune(unet, data, steps: int, seed: int) -> list[float]:
    """Full fine-tune of every UNet weight with AdamW on the epsilon objective, uniform timesteps."""
    from ..diffusion import NoiseSchedule, per_sample_loss

    schedule = NoiseSchedule()
    unet.requires_grad_(True)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        b = data.batch(step // len(data), step % len(data))
        noise = torch.randn(b.latents.shape, generator=g)
        t = torch.randint(0, schedule.num_train_timesteps, (b.latents.shape[0],), generator=g)
        cond = {"text_embeds": b.pooled, "time_ids": b.time_ids}
        pred = unet(schedule.add_noise(b.latents, noise, t), t, encoder_hidden_states=b.prompt_embeds,
                    added_cond_kwargs=cond).sample
        loss = per_sample_loss(pred, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not torch.isfinite(loss):  # cannot happen at this LR; never cache a broken base
            raise RuntimeError(f"pretraining the tiny base diverged at step {step}")
    unet.requires_grad_(False)
    unet.eval()
    return losses


def build_pretrained_tiny(path, *, steps: int | None = None, seed: int = SEED) -> str:
    """Fine-tune the tiny model's UNet on the demo photos for `steps` (default STEPS) and write the result (fp16,
    single-file layout, the tiny model's text encoders, VAE and tokenizers unchanged) to `path`."""
    from safetensors.torch import load_file, save_file

    from .loader import load_sdxl

    path = os.fspath(path)
    steps = STEPS if steps is None else int(steps)
    base = tiny_model_path()
    t0 = time.perf_counter()
    log.info("building the pretrained tiny base (%d UNet fine-tuning steps, once): %s", steps, path)
    torch.manual_seed(seed)  # nothing below draws from it; pinned anyway so the build is repeatable
    model = load_sdxl(base)
    losses = _fine_tune(model.unet, _demo_data(model, seed), steps, seed)

    layout = detect.infer_configs(detect.read_header(base)).layout
    unet_sd, left = convert.unet_from_diffusers(model.unet.state_dict(), layout)
    if left:
        raise RuntimeError(f"pretrained tiny base: UNet keys with no place in the checkpoint: {left[:5]}")
    sd = load_file(base)
    for key, value in unet_sd.items():
        name = K.UNET_PREFIX + key
        sd[name] = value.detach().to(sd[name].dtype).contiguous()

    def copy_tokenizers(tmp) -> None:
        shutil.copytree(clip_tokenizers.sidecar_dir(base), tmp, dirs_exist_ok=True)

    atomic_directory(clip_tokenizers.sidecar_dir(path), copy_tokenizers)
    n = max(1, min(20, len(losses)))  # mean of the first and last 20 steps' losses
    meta = {"emolora_test_model": f"{PRETRAINED_VERSION} seed={seed} steps={steps} lr={LR} res={RESOLUTION}",
            "emolora_pretrain_loss": f"{sum(losses[:n]) / n:.4f} -> {sum(losses[-n:]) / n:.4f}"}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    log.info("pretrained tiny base built in %.0fs (loss %s)", time.perf_counter() - t0, meta["emolora_pretrain_loss"])
    return path
