"""The step's one host read: everything the loop needs from the device after the backward pass, in a single
transfer. It carries the optimizer's loss, the gradient norm, the LoRA's norm as the previous update left it
(trainer/rollback.py) and that update's size, the fp16 scale, for the normalized optimizer loss the step's
per-sample losses and timesteps, and the previous step's device-side optimizer signals (telemetry.LateSignals)."""

from dataclasses import dataclass

import torch

__all__ = ["StepRead", "read_step"]


@dataclass
class StepRead:
    loss: float  # the mean micro-batch loss
    grad_norm: float
    lora_norm: float
    update_norm: float  # the size of the previous update
    scale: list  # [the fp16 loss scale] or []
    losses: list  # per-sample losses of the step (optimizer_loss=normalized), else []
    timesteps: list  # their timesteps
    late: list  # the previous step's device-side signals, in LateSignals' order


def read_step(loss, grad_norm, lora_norm, update_norm, *, scale=None, draws=None, late=None) -> StepRead:
    """loss, grad_norm, lora_norm, update_norm, scale: 0-dim tensors; draws: [(per-sample losses, timesteps)] of
    the step's micro-batches; late: a 1-dim tensor or None. One .tolist() for all of it."""
    dev = loss.device
    head = [loss, grad_norm.float().to(dev), lora_norm.to(dev), update_norm.to(dev)]
    if scale is not None:
        head.append(scale.float().reshape(()).to(dev))
    parts = [torch.stack(head)]
    n = 0
    if draws:
        parts += [torch.cat([d[0] for d in draws]).float().to(dev), torch.cat([d[1] for d in draws]).float().to(dev)]
        n = parts[1].numel()
    if late is not None:
        parts.append(late.to(dev))
    values = torch.cat(parts).tolist()
    k = len(head)
    return StepRead(*values[:4], scale=values[4:k], losses=values[k:k + n], timesteps=values[k + n:k + 2 * n],
                    late=values[k + 2 * n:])
