"""What the training loop needs from a prior, the SDS loss every prior uses, and the real priors' shared core.

The loop (``fourdfy.trainer``) cannot tell a toy closed-form prior from a real diffusion model: both
implement :class:`Guidance`. One call turns a batch of renders into a scalar loss whose gradient
w.r.t. the renders is the score-distillation gradient.

The three real priors (MVDream, SD 2.1 VSD, Zeroscope) derive from :class:`LatentDiffusionPrior`, the one
place for what they share: where the networks live, the random generator and its state, the frozen VAE
and prompt encoder, the render size and the no-op fine-tuning step. :func:`cfg_mix` is the one spelling of
classifier-free guidance; forward noising is ``fourdfy.guidance.noise.add_noise``. This module imports
torch only (no diffusers), so the trainer and the toy priors stay light.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from fourdfy.clock import Moment
from fourdfy.guidance.memory import Placement, encode_latents, frozen, resolve_dtype
from fourdfy.guidance.text import PromptEncoder
from fourdfy.render.cameras import Cameras


@dataclass
class GuidanceOut:
    """Result of one guidance call."""

    loss: torch.Tensor  # scalar; backward() gives the SDS/VSD gradient on the renders
    stats: dict[str, float] = field(default_factory=dict)  # scalars to log (t, grad norm, ...)
    # Detached latents of this call's renders, handed to finetune_step of the same iteration so it need not
    # encode them again; None for priors without a fine-tuning step.
    latents: torch.Tensor | None = None


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
        self, renders: torch.Tensor, prompt: str, cameras: Cameras, times: torch.Tensor, step: Moment
    ) -> GuidanceOut:
        """renders: [B,H,W,3] in [0,1] (differentiable); cameras: B cameras; times: [B]; step: the iteration's
        stage and stage-local step (every schedule of a prior reads the stage-local step, as the authors')."""
        ...

    def render_size(self, step: Moment) -> tuple[int, int]:
        """(height, width) the renders of training step ``step`` must have (MVDream starts at 64²)."""
        ...

    def batch_size(self, step: Moment) -> int:
        """Renders per step: a multiple of n_views (MVDream: 8 = two groups of 4 early in stage 1)."""
        ...

    def reset_optimizer(self) -> None:
        """Forget the prior's own optimiser state (a stage start: schedule.reset_optimizer_at_stage_start)."""
        ...

    def finetune_step(
        self,
        renders: torch.Tensor,
        prompt: str,
        cameras: Cameras,
        step: Moment,
        latents: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Update the prior's own trainable state (VSD's LoRA) on detached renders; {} when it has none.

        latents: the ``GuidanceOut.latents`` of this iteration's call on the same renders, or None (then the
        prior encodes ``renders`` itself).
        """
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


def cfg_halves(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a UNet output on a [cond, uncond] batch [2B, ...] into (cond [B, ...], uncond [B, ...]).

    The order is the one `PromptEncoder.cfg_pair` builds and every authors' guidance reads back
    (threestudio/models/guidance/*_guidance.py: `noise_pred_text, noise_pred_uncond = noise_pred.chunk(2)`).
    """
    cond, uncond = pred.chunk(2)
    return cond, uncond


def cfg_mix(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, *, from_cond: bool = False
) -> torch.Tensor:
    """Classifier-free guidance ε_u + s(ε_c − ε_u); shapes of cond = uncond = result.

    from_cond: the authors' Zeroscope form ε_c + s(ε_c − ε_u) (zeroscope_guidance.py
    `noise_pred_text + guidance_scale * (noise_pred_text - noise_pred_uncond)`, i.e. the usual form with s + 1).
    Kept as its own expression rather than rewritten with s + 1, so the floating-point result is unchanged.
    """
    return (cond if from_cond else uncond) + scale * (cond - uncond)


def check_prompt(prompt: str) -> None:
    """Raise ValueError unless `prompt` is a non-empty string."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")


def check_video_inputs(renders: torch.Tensor, prompt: str, cameras: Cameras, n_frames: int,
                       size: tuple[int, int]) -> None:
    """A video prior's inputs: renders [n_frames, H, W, 3] with (H, W) = size (render_height x render_width),
    one camera per frame, a non-empty prompt. Raises ValueError naming what is wrong."""
    if renders.ndim != 4 or renders.shape[-1] != 3:
        raise ValueError(f"renders must be [F, H, W, 3] (the frames of one video), got {tuple(renders.shape)}")
    if renders.shape[0] != n_frames:
        raise ValueError(f"renders: the video prior takes n_frames={n_frames} frames, got {renders.shape[0]}")
    if tuple(renders.shape[1:3]) != tuple(size):
        raise ValueError(
            f"renders: the video prior takes {size[0]}x{size[1]} frames (render_height x render_width), "
            f"got {renders.shape[1]}x{renders.shape[2]}"
        )
    if len(cameras) != n_frames:
        raise ValueError(f"cameras: need one camera per frame ({n_frames}), got {len(cameras)}")
    check_prompt(prompt)


class LatentDiffusionPrior:
    """The shared core of the real priors: one shallow base class, no further levels.

    - placement: ``device``, the weight ``dtype`` (fp16 on CUDA, fp32 on the CPU unless given) and
      ``placement`` (where offloaded networks rest; a subclass homes its UNet(s) with :meth:`rest`);
    - ``vae``: frozen, always on the device (the SDS loss back-propagates through its encoder after the call
      returns, so it is never offloaded); ``text``: the cached CLIP prompt encoder;
    - ``generator``: the CPU generator every random draw comes from (so draws do not depend on the device);
      its state is :meth:`state_dict`, so a resumed run draws the same numbers;
    - :meth:`render_size` = ``native_size`` at every step, :meth:`finetune_step` a no-op: a prior with a
      schedule of sizes (MVDream) or trainable state (SD VSD's LoRA) overrides them.
    """

    is_video = False
    n_views: int
    native_size: tuple[int, int]

    def __init__(
        self,
        *,
        vae: nn.Module,
        tokenizer: object,
        text_encoder: nn.Module,
        native_size: tuple[int, int],
        device: torch.device | str,
        dtype: torch.dtype | None,
        offload: bool,
        vae_gradient_checkpointing: bool,
        seed: int,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = resolve_dtype(self.device, dtype)
        self.placement = Placement(self.device, offload)
        self.vae = frozen(vae, self.dtype).to(self.device)
        if vae_gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
        self.text = PromptEncoder(tokenizer, text_encoder, self.placement, self.dtype)
        self.native_size = native_size
        self.generator = torch.Generator().manual_seed(seed)

    def rest(self, module: nn.Module) -> nn.Module:
        """A frozen network in the weight dtype, where it rests between calls (the CPU when offloading)."""
        return self.placement.home(frozen(module, self.dtype))

    # ---------------------------------------------------------------- random draws (all from `generator`)

    def draw_timesteps(self, low: int, high: int, n: int) -> torch.Tensor:
        """n timesteps uniform in {low, ..., high} (inclusive), int64 [n] on the CPU."""
        return torch.randint(low, high + 1, (n,), generator=self.generator)

    def draw_noise(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal noise of `shape`, float32 on the CPU."""
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)

    # ---------------------------------------------------------------- renders -> latents

    def vae_latents(
        self,
        renders: torch.Tensor,
        size: tuple[int, int],
        sample_posterior: bool,
        grad_mask: Sequence[bool] | None = None,
    ) -> torch.Tensor:
        """renders [N, H, W, 3] in [0, 1] -> bilinear resize to `size` (h, w) -> latents [N, 4, h/8, w/8] fp32.

        With gradient (except the images whose `grad_mask` entry is False); posterior sample drawn from
        `generator` when `sample_posterior` (the authors' encode_images), else the posterior mean.
        """
        x = renders.permute(0, 3, 1, 2).to(self.device, torch.float32)
        x = F.interpolate(x, size, mode="bilinear", align_corners=False)
        return encode_latents(self.vae, x, self.generator if sample_posterior else None, grad_mask)

    # ---------------------------------------------------------------- Guidance defaults

    def render_size(self, step: Moment) -> tuple[int, int]:
        """(height, width) of the renders: native_size at every step."""
        return self.native_size

    def batch_size(self, step: Moment) -> int:
        """Renders per step: n_views at every step."""
        return self.n_views

    def reset_optimizer(self) -> None:
        """No optimiser: nothing to forget."""

    def finetune_step(
        self,
        renders: torch.Tensor,
        prompt: str,
        cameras: Cameras,
        step: Moment,
        latents: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """No trainable state: nothing to do."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The random generator's state (the only state that changes here)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
