"""The run's losses over its parts: the training loss of a batch, and the fixed-noise losses (evaluation batch,
held-out validation images) that are comparable from step to step and run to run."""

import contextlib
import hashlib

import torch

from .config import TrainConfig
from .diffusion import per_sample_loss
from .parts import LoopState, RunSetup
from .placement import evaluating


def mix_seed(*values) -> int:
    """A 63-bit seed from values; neighbouring steps get unrelated generators."""
    digest = hashlib.blake2b(b"|".join(str(v).encode() for v in values), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def autocast(run: RunSetup):
    rt = run.runtime
    if rt.precision in ("bf16", "fp16"):
        return torch.autocast(rt.device.type, dtype=rt.weight_dtype)
    return contextlib.nullcontext()


def diffusion_loss(cfg: TrainConfig, run: RunSetup, latents, noise, t, embeds, pooled, time_ids, *,
                   snr_weighting: bool, mask: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None, reduce: bool = True) -> torch.Tensor:
    """The mean loss of the UNet's prediction at timesteps t (0-dim, graph attached); reduce=False: per sample.
    weights (B,): each sample's loss factor (prior_loss_weight on regularization images), applied before the mean."""
    loaded = run.loaded
    schedule, prediction_type = loaded.schedule, loaded.prediction_type
    noisy = schedule.add_noise(latents, noise, t)
    target = noise if prediction_type == "epsilon" else schedule.velocity(latents, noise, t)
    wd = run.runtime.weight_dtype
    with autocast(run):
        # time_ids stay float32: sizes such as 1333 are not representable in bf16, and the UNet embeds them
        # sinusoidally in float32 anyway.
        cond = {"text_embeds": pooled.to(wd), "time_ids": time_ids.float()}
        pred = loaded.model.unet(noisy.to(wd), t, encoder_hidden_states=embeds.to(wd), added_cond_kwargs=cond).sample
    loss = per_sample_loss(pred, target, cfg.loss_type, cfg.huber_c, mask)
    if snr_weighting and cfg.min_snr_gamma > 0:
        loss = loss * schedule.min_snr_weight(t, cfg.min_snr_gamma, prediction_type)
    if weights is not None:
        loss = loss * weights.to(loss.device, loss.dtype)
    return loss.mean() if reduce else loss


@torch.no_grad()
def fixed_loss(cfg: TrainConfig, run: RunSetup, batches, tag: str) -> float:
    """Mean loss over `batches` (weighted by their sizes), each sample at 5 timesteps spread over the schedule
    with noise fixed by (seed, tag, batch), LoRA dropout off, no min-SNR weighting."""
    dev = run.device
    ts = torch.linspace(50, 950, 5).round().long()  # spread over the schedule, the same every time
    rep = len(ts)
    total, count = torch.zeros((), device=dev), 0
    with evaluating(run.model.unet, run.network):
        for k, b in enumerate(batches):
            n = b.latents.shape[0]
            latents = b.latents.to(dev, torch.float32).repeat(rep, 1, 1, 1)
            # batch 0's noise is the single eval batch's of earlier versions: eval losses stay comparable
            g = torch.Generator().manual_seed(mix_seed(cfg.seed, tag) if k == 0 else mix_seed(cfg.seed, tag, k))
            noise = torch.randn(latents.shape, generator=g).to(dev)
            mask = b.mask.repeat(rep, 1, 1, 1) if b.mask is not None else None
            loss = diffusion_loss(cfg, run, latents, noise, ts.repeat_interleave(n).to(dev),
                                  b.prompt_embeds.to(dev).repeat(rep, 1, 1), b.pooled.to(dev).repeat(rep, 1),
                                  b.time_ids.to(dev).repeat(rep, 1), snr_weighting=False, mask=mask)
            total, count = total + loss * n, count + n
    return float(total / count)


def note_validation(loop: LoopState, value: float) -> None:
    """Keep the lowest validation loss and count the validations since it (val-plateau stops on that count)."""
    if loop.val_best is None or value < loop.val_best:
        loop.val_best, loop.val_stale = value, 0
    else:
        loop.val_stale += 1
