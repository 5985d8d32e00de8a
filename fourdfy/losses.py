"""The regularisers added to every update's guidance loss (the authors' threestudio/systems/fourdfy.py)."""

from __future__ import annotations

import torch


def sparsity_loss(opacity: torch.Tensor) -> torch.Tensor:
    """mean(√(opacity² + 0.01)) over every pixel: a smooth L1 that pushes empty space to zero opacity.

    opacity: [B,H,W] accumulated opacity of the renders. Authors' ``loss.lambda_sparsity`` term.
    """
    return (opacity**2 + 0.01).sqrt().mean()


# threestudio/systems/fourdfy.py, the lambda_opaque term: opacity_clamped = out["opacity"].clamp(1.0e-3, 1.0 - 1.0e-3).
OPACITY_CLAMP = 1e-3


def opacity_entropy_loss(opacity: torch.Tensor, eps: float = OPACITY_CLAMP) -> torch.Tensor:
    """Mean binary entropy of the opacity: pushes every pixel to fully empty or fully opaque.

    opacity: [B,H,W], clamped to [eps, 1 − eps] as the authors do (which also keeps the logarithms finite).
    Authors' ``loss.lambda_opaque``.
    """
    o = opacity.clamp(eps, 1.0 - eps)
    return -(o * o.log() + (1 - o) * (1 - o).log()).mean()


def regularisers(opacity: torch.Tensor, lambda_sparsity: float,
                 lambda_opacity_entropy: float) -> dict[str, torch.Tensor]:
    """The weighted regularisers of one update: {"sparsity", "opacity_entropy"}, with this step's weights
    (the trainer reads them from their stage schedules).

    A term whose weight is 0 is left out (not computed, not logged).
    """
    losses = {}
    if lambda_sparsity > 0:
        losses["sparsity"] = lambda_sparsity * sparsity_loss(opacity)
    if lambda_opacity_entropy > 0:
        losses["opacity_entropy"] = lambda_opacity_entropy * opacity_entropy_loss(opacity)
    return losses
