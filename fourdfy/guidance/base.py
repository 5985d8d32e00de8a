"""What the training loop needs from a prior, and the SDS loss every prior uses.

The loop (``fourdfy.trainer``) cannot tell a toy closed-form prior from a real diffusion model: both
implement :class:`Guidance`. One call turns a batch of renders into a scalar loss whose gradient
w.r.t. the renders is the score-distillation gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from fourdfy.render.cameras import Cameras


@dataclass
class GuidanceOut:
    """Result of one guidance call."""

    loss: torch.Tensor  # scalar; backward() gives the SDS/VSD gradient on the renders
    stats: dict[str, float] = field(default_factory=dict)  # scalars to log (t, grad norm, ...)


@runtime_checkable
class Guidance(Protocol):
    """A score-distillation prior.

    Attributes:
        n_views: how many renders one step needs (4 for MVDream, 1 for SD, 16 frames for video).
        native_size: (height, width) of the renders for most of training (what the prior is built for).
        is_video: True when the renders are consecutive frames of one camera (times advance).
    """

    n_views: int
    native_size: tuple[int, int]
    is_video: bool

    def __call__(
        self, renders: torch.Tensor, prompt: str, cameras: Cameras, times: torch.Tensor, step: int
    ) -> GuidanceOut:
        """renders: [B,H,W,3] in [0,1] (differentiable); cameras: B cameras; times: [B]; step: global iteration."""
        ...

    def render_size(self, step: int) -> tuple[int, int]:
        """(height, width) the renders of training step ``step`` must have (MVDream starts at 64²)."""
        ...

    def finetune_step(self, renders: torch.Tensor, prompt: str, cameras: Cameras, step: int) -> dict[str, float]:
        """Update the prior's own trainable state (VSD's LoRA) on detached renders; {} when it has none."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Trainable state that a checkpoint must keep (LoRA weights, optimiser, buffers)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def sds_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The SDS "target trick": a loss whose gradient w.r.t. ``x`` is ``grad / B``.

    loss = 0.5·‖x − sg(x − grad)‖² / B, with B = x.shape[0]. ``grad`` = w(t)(ε̂ − ε) is detached and NaN-free
    (the caller checks). Using a target keeps autograd in charge of the chain rule through the VAE/renderer.
    """
    target = (x - grad).detach()
    return 0.5 * ((x - target) ** 2).sum() / x.shape[0]
