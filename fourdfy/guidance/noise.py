"""The diffusion noise schedule shared by every prior (real and synthetic).

Stable Diffusion 2.1, MVDream and Zeroscope all use the same "scaled linear" schedule:
betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 (the models' scheduler/scheduler_config.json:
beta_schedule "scaled_linear", beta_start 0.00085, beta_end 0.012; MVDream's ldm register_schedule with
linear_start/linear_end the same), ε-prediction except SD 2.1 768-v. Keeping it in one place means the toy
priors see exactly the ᾱ table the real ones see. `add_noise` is the one forward-noising expression of
every prior (the authors' `scheduler.add_noise` / ldm `q_sample`).
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000  # SD 2.1 / MVDream / Zeroscope scheduler config
BETA_START = 0.00085  # scheduler_config.json beta_start
BETA_END = 0.012  # scheduler_config.json beta_end


def scaled_linear_alphas_cumprod(
    num_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> torch.Tensor:
    """ᾱ_t for t = 0..num_timesteps-1, float64 for accuracy. Shape [num_timesteps]."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """z_t = √ᾱ x0 + √(1−ᾱ) ε. ``alpha_bar`` is a tensor that broadcasts against x0 (shape [B,1,1,1], or 0-dim).

    A 0-dim float64 ᾱ gives, bit for bit, ``math.sqrt(a) * x0 + math.sqrt(1 - a) * noise`` with a = float(ᾱ):
    the square roots are taken in float64 and rounded once to x0's dtype, as a Python scalar would be.
    """
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def v_to_eps(v: torch.Tensor, z: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Convert a v-prediction to ε: ε = √ᾱ v + √(1−ᾱ) z (SD 2.1 768-v is v-parameterised)."""
    return alpha_bar.sqrt() * v + (1.0 - alpha_bar).sqrt() * z


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The v-prediction training target v = √ᾱ ε − √(1−ᾱ) x0."""
    return alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * x0
