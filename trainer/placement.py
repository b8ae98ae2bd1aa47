"""Where the model's modules live and which mode they are in (shared by training, evaluation and sampling), and how
batches reach the device."""

import contextlib

import torch


def offload(device: torch.device, *modules) -> None:
    """Move modules back to the CPU (a no-op when the run is on the CPU)."""
    if device.type != "cpu":
        for module in modules:
            module.to("cpu")


def onload(device: torch.device, *modules) -> None:
    for module in modules:
        module.to(device)


def offload_cached_encoders(cfg, device: torch.device, model) -> None:
    """Encoders that the cached features replace leave the accelerator (sampling brings them back)."""
    if cfg.cache_latents != "off":
        offload(device, model.vae)
    if cfg.cache_text != "off" and not cfg.train_text_encoder:
        offload(device, model.te1, model.te2)


@contextlib.contextmanager
def evaluating(unet, network):
    """UNet and every LoRA module (the text encoders' too, created after the encoders went to eval) in eval
    mode, so LoRA dropout is off for evaluation and samples; back to training afterwards."""
    unet.eval()
    network.eval()
    try:
        yield
    finally:
        unet.train()
        network.train()


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on `device`: to CUDA through pinned (page-locked) memory with a non-blocking copy, so the
    transfer overlaps the GPU's work instead of stalling the host; elsewhere a plain .to()."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, dtype, non_blocking=True)
    return t.to(device, dtype)
