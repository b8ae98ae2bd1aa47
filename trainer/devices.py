"""Which device and precision a run uses. Its own module so that build.py and distributed.py both use it and
neither imports the other."""

import torch

from .config import ConfigError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def pick_precision(mp: str, device: torch.device) -> str:
    if mp != "auto":
        return "fp32" if mp == "no" else mp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"  # bf16 autocast on the CPU is slower than fp32 on most CPUs
