"""SDXL's DDPM training objective: the noise schedule, noising, targets, min-SNR weights and loss types.

The schedule is SDXL's: scaled_linear betas from 0.00085 to 0.012 over 1000 steps, computed in float32 the
way diffusers' DDPMScheduler does, so noisy latents match a diffusers-based trainer bit for bit. Its tables are
copied to a device once and kept there (`_on`), and the training noise is drawn on the device (`draw_noise`).
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
        self._device_tables: dict = {}  # device -> {table name: that table on the device}

    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        """Table `name` on `device`, copied there on first use only (not once per micro-batch)."""
        tables = self._device_tables.setdefault(torch.device(device), {})
        if name not in tables:
            tables[name] = getattr(self, name).to(device)
        return tables[name]

    def _at(self, table: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._on(table, like.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_alpha", t, latents) * latents + self._at("sqrt_one_minus_alpha", t, latents) * noise

    def velocity(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target: alpha_t * noise - sigma_t * x0."""
        return self._at("sqrt_alpha", t, latents) * noise - self._at("sqrt_one_minus_alpha", t, latents) * latents

    def min_snr_weight(self, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023): min(snr, gamma)/snr for epsilon, min(snr, gamma)/(snr + 1) for v."""
        snr = self._on("snr", t.device)[t]
        clipped = torch.clamp(snr, max=gamma)
        if prediction_type != "v_prediction":
            snr = snr.clamp(min=1e-8)  # zero-terminal-SNR schedules reach snr 0 at the last step
        return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr


def draw_noise(shape, seeds, device: torch.device, *, noise_offset: float = 0.0, t_min: int = 0,
               t_max: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise of `shape` (B, C, H, W) and B timesteps in [t_min, t_max), drawn on `device`: sample i from a
    generator of that device seeded with seeds[i], so a sample's draw depends only on its seed (its position in
    the run), not on the batch it shares or on what was drawn before. The same seeds give the same values on
    the same device type (a resumed run equals an uninterrupted one); CPU and CUDA streams differ."""
    device = torch.device(device)
    noises, ts = [], []
    for seed in seeds:
        g = torch.Generator(device).manual_seed(seed)
        n = torch.randn(tuple(shape[1:]), generator=g, device=device)
        if noise_offset:
            n = n + noise_offset * torch.randn((shape[1], 1, 1), generator=g, device=device)
        noises.append(n)
        ts.append(torch.randint(t_min, t_max, (1,), generator=g, device=device))
    return torch.stack(noises), torch.cat(ts)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step is pure noise."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    huber_c: float = 0.1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise loss averaged over all but the batch dimension, in float32. mask (B, 1, h, w) weights each
    latent position (masked loss; not renormalised by the masked area, as kohya does)."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        elem = diff.square()
    elif loss_type == "l1":
        elem = diff.abs()
    elif loss_type == "huber":  # pseudo-Huber as kohya's constant schedule: quadratic near 0, linear beyond c
        elem = 2.0 * huber_c * (torch.sqrt(diff.square() + huber_c**2) - huber_c)
    else:
        raise ValueError(f"loss_type must be l2, l1 or huber, got {loss_type!r}")
    if mask is not None:
        elem = elem * mask.to(elem.device, elem.dtype)
    return elem.mean(dim=tuple(range(1, elem.ndim)))
