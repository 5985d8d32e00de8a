"""The regularisers added to every update's guidance loss (the authors' threestudio/systems/fourdfy.py)."""

from __future__ import annotations

import torch


def sparsity_loss(opacity: torch.Tensor) -> torch.Tensor:
    """mean(√(opacity² + 0.01)) over every pixel: a smooth L1 that pushes empty space to zero opacity.

    opacity: [B,H,W] accumulated opacity of the renders. Authors' ``loss.lambda_sparsity`` term.
    """
    return (opacity**2 + 0.01).sqrt().mean()


def opacity_entropy_loss(opacity: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean binary entropy of the opacity: pushes every pixel to fully empty or fully opaque.

    opacity: [B,H,W], clamped to [eps, 1 − eps] so the logarithms stay finite. Authors' ``loss.lambda_opaque``.
    """
    o = opacity.clamp(eps, 1.0 - eps)
    return -(o * o.log() + (1 - o) * (1 - o).log()).mean()


def regularisers(opacity: torch.Tensor, stage: int, lambda_sparsity: float,
                 lambda_opacity_entropy: float) -> dict[str, torch.Tensor]:
    """The weighted regularisers of one update: {"sparsity", "opacity_entropy" (from stage 2 on)}.

    A term whose weight is 0 is left out (not computed, not logged).
    """
    losses = {}
    if lambda_sparsity > 0:
        losses["sparsity"] = lambda_sparsity * sparsity_loss(opacity)
    if lambda_opacity_entropy > 0 and stage >= 2:
        losses["opacity_entropy"] = lambda_opacity_entropy * opacity_entropy_loss(opacity)
    return losses
