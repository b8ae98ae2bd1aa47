"""Sample images during training from the model in memory (LoRA active), with diffusers' SDXL pipeline.

The pipeline stops at latents and the VAE decodes them here in its own dtype (float32 by default), outside
any autocast: SDXL's VAE overflows to NaN in fp16, the classic black-sample bug.
"""

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_write
from .parts import RunSetup
from .placement import evaluating, offload_cached_encoders, onload

log = logging.getLogger("emolora.train")


def sample_scheduler(prediction_type: str, zero_terminal_snr: bool):
    """SDXL's Euler sampler as the model was trained: a zero-terminal-SNR model (NoobAI-style v-prediction) needs
    the rescaled betas and "trailing" spacing, so sampling starts from the pure-noise timestep it was trained on."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, prediction_type=prediction_type,
                                  rescale_betas_zero_snr=zero_terminal_snr,
                                  timestep_spacing="trailing" if zero_terminal_snr else "leading",
                                  steps_offset=0 if zero_terminal_snr else 1)


def generate_samples(model, *, prompts, negative: str, steps: int, cfg_scale: float, size: int, seed: int,
                     prediction_type: str, out_dir, step: int) -> list[Path]:
    """One PNG per prompt in out_dir, named step-<step>-<i>.png. The caller puts the modules on one device."""
    from diffusers import StableDiffusionXLPipeline

    scheduler = sample_scheduler(prediction_type, bool(getattr(model, "zero_terminal_snr", False)))
    pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.te1, text_encoder_2=model.te2,
                                     tokenizer=model.tokenizer1, tokenizer_2=model.tokenizer2, unet=model.unet,
                                     scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    vae = model.vae
    out_dir = Path(out_dir)
    paths = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        latents = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps,
                       guidance_scale=cfg_scale, width=size, height=size, generator=generator,
                       output_type="latent").images
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
        arr = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        image = Image.fromarray(np.ascontiguousarray(arr))
        path = out_dir / f"step-{step:06d}-{i}.png"
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        paths.append(path)
    return paths


def sample_during_training(cfg, run: RunSetup, store, step: int) -> list:
    """Samples for cfg.sample_prompts with the LoRA as it is now, under samples/; [] (logged) if it fails."""
    m, dev = run.model, run.device
    devices = [dev] if dev.type == "cuda" else []
    onload(dev, m.vae, m.te1, m.te2)
    try:
        # Forked RNG: sampling must not shift the training run's random stream (resume stays exact).
        with torch.no_grad(), torch.random.fork_rng(devices=devices), evaluating(m.unet, run.network):
            paths = generate_samples(m, prompts=cfg.sample_prompts, negative=cfg.sample_negative,
                                     steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg,
                                     size=cfg.sample_size or cfg.resolution, seed=cfg.sample_seed,
                                     prediction_type=run.loaded.prediction_type, out_dir=store.samples_dir, step=step)
    except Exception as e:  # a failed preview must not end a long run
        log.warning("sampling at step %d failed: %r", step, e)
        store.event(step, "sample_failed", {"error": repr(e)})
        return []
    finally:
        offload_cached_encoders(cfg, dev, m)
    store.event(step, "sample", {"paths": [str(p) for p in paths], "prompts": cfg.sample_prompts})
    return paths
