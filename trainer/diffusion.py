"""SDXL's DDPM training objective: the noise schedule, noising, targets, min-SNR weights and loss types.

The schedule is SDXL's: scaled_linear betas from 0.00085 to 0.012 over 1000 steps, computed in float32 the
way diffusers' DDPMScheduler does, so noisy latents match a diffusers-based trainer bit for bit.
"""

import torch


class NoiseSchedule:
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 zero_terminal_snr: bool = False):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        if zero_terminal_snr:
            betas = _rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_alpha = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alpha = (1.0 - alphas_cumprod).sqrt()
        self.snr = alphas_cumprod / (1.0 - alphas_cumprod)  # (alpha / sigma)^2; 0 at t=999 with ZTSNR

    def _at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_alpha, t, latents) * latents + self._at(self.sqrt_one_minus_alpha, t, latents) * noise

    def velocity(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target: alpha_t * noise - sigma_t * x0."""
        return self._at(self.sqrt_alpha, t, latents) * noise - self._at(self.sqrt_one_minus_alpha, t, latents) * latents

    def min_snr_weight(self, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023): min(snr, gamma)/snr for epsilon, min(snr, gamma)/(snr + 1) for v."""
        snr = self.snr.to(t.device)[t]
        clipped = torch.clamp(snr, max=gamma)
        if prediction_type != "v_prediction":
            snr = snr.clamp(min=1e-8)  # zero-terminal-SNR schedules reach snr 0 at the last step
        return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step is pure noise."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    huber_c: float = 0.1) -> torch.Tensor:
    """Elementwise loss averaged over all but the batch dimension, in float32."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        elem = diff.square()
    elif loss_type == "l1":
        elem = diff.abs()
    elif loss_type == "huber":  # pseudo-Huber as kohya's constant schedule: quadratic near 0, linear beyond c
        elem = 2.0 * huber_c * (torch.sqrt(diff.square() + huber_c**2) - huber_c)
    else:
        raise ValueError(f"loss_type must be l2, l1 or huber, got {loss_type!r}")
    return elem.mean(dim=tuple(range(1, elem.ndim)))
