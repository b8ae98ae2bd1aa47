"""The loss the optimizer feels (config optimizer_loss): raw, normalized by timestep, or withheld.

A diffusion step's loss swings several-fold with the timesteps it drew (a trained model's loss at t=50 is a
fraction of its loss at t=950), so the raw loss mostly tells the Emo optimizers' emotion which timesteps came
up. "normalized" divides it by what the loss at those timesteps has been lately: per timestep bucket an EMA of
the per-sample losses, kept in LoopState (state.pt), so a resumed run normalizes exactly as an uninterrupted one.
Everything here is host arithmetic on the values the step's one read already brings.
"""

from __future__ import annotations

BUCKETS = 10  # equal slices of [timestep_min, timestep_max)
DECAY = 0.9  # per update of a bucket: about the last 10 samples of that bucket


def bucket_of(t: float, t_min: int, t_max: int) -> int:
    return min(BUCKETS - 1, max(0, int((t - t_min) * BUCKETS // (t_max - t_min))))


def normalized_loss(emas: list, step_loss: float, sample_losses, timesteps, t_min: int, t_max: int) -> float:
    """step_loss / (mean over the step's samples of their bucket's EMA), then the EMAs take the samples in.

    `emas` (LoopState.loss_buckets) is updated in place; a bucket seen for the first time starts at its first
    sample's loss, so the first step's normalized loss is about 1."""
    if len(emas) != BUCKETS:
        emas[:] = [None] * BUCKETS
    buckets = [bucket_of(t, t_min, t_max) for t in timesteps]
    for b, loss in zip(buckets, sample_losses):
        if emas[b] is None:
            emas[b] = float(loss)
    expected = sum(emas[b] for b in buckets) / max(1, len(buckets))
    value = step_loss / expected if expected > 0 else step_loss
    for b, loss in zip(buckets, sample_losses):
        emas[b] = DECAY * emas[b] + (1.0 - DECAY) * float(loss)
    return value
