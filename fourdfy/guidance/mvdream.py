"""3D-aware SDS with MVDream (`sd-v2.1-base-4view`): the "3D" update of hybrid SDS (paper Eq. 3).

Follows the authors' guidance (threestudio-mvdream `multiview_diffusion_guidance.py`, configured by
4D-fy's configs/fourdfy_stage_*.yaml `guidance_multi_view`), where it differs from the paper's wording:
- loss: the code's default is MVDream's x̂0-reconstruction loss with CFG std rescale 0.5 (`recon_loss`),
  0.5·‖z − sg(x̂0)‖²/B; without rescale this equals SDS with w(t) = √((1−ᾱ)/ᾱ). The paper's Eq. 3 (plain SDS,
  w(t) = 1 − ᾱ) is `recon_loss=False`, which crashes in the reference (it reads an attribute never set)
  and works here.
- one timestep per call, shared by all views; its range anneals over stage 1 (min 0.98→0.02, max
  0.98→0.50 over 8000 steps) and stays at [0.02, 0.50] afterwards.

Per call: B = k·4 renders (views of k objects, consecutive) -> bilinear resize to 256² -> VAE latents
(with gradient, posterior sample × 0.18215) [B, 4, 32, 32] -> noise at one t -> multi-view UNet on
[cond, uncond] with the camera -> CFG 50 (negative prompt) -> loss on the latents.

Weights: the UNet from MVDream's checkpoint through `fourdfy.models.mvdream_unet`. The VAE and text encoder
are Stable Diffusion 2.1-base's: MVDream trains only the UNet, so its `first_stage_model.*` (SD VAE) and
`cond_stage_model.*` (OpenCLIP ViT-H-14, penultimate layer = SD 2.1's 23-layer CLIPTextModel) are those
networks; any diffusers-layout folder with vae/, text_encoder/, tokenizer/ works, e.g. the port
`ashawkey/mvdream-sd2.1-diffusers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer

from fourdfy.clock import Moment
from fourdfy.guidance.base import GuidanceOut, LatentDiffusionPrior, cfg_halves, cfg_mix, check_prompt, sds_loss
from fourdfy.guidance.configs import MVDreamConfig, Precision
from fourdfy.guidance.memory import resolve_dtype
from fourdfy.guidance.noise import add_noise, scaled_linear_alphas_cumprod
from fourdfy.guidance.text import view_direction
from fourdfy.guidance.weights import (
    load_frozen,
    load_text_encoder,
    locate_pretrained,
    resolve_checkpoint_file,
    resolve_together,
)
from fourdfy.models.mvdream_unet import MultiViewUNet, load_mvdream_unet
from fourdfy.render.cameras import Cameras, mvdream_camera


@dataclass
class MVDreamModels:
    """The loaded networks of the 3D prior."""

    unet: MultiViewUNet
    vae: AutoencoderKL
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel


def _step_index(percent: float, num_timesteps: int) -> int:
    # The authors' int(num_timesteps * percent), with slack so 0.92·1000 = 919.99… gives 920, not 919.
    return int(math.floor(num_timesteps * percent + 1e-6))


class MVDreamGuidance(LatentDiffusionPrior):
    """The 3D prior: implements `fourdfy.guidance.base.Guidance` for MVDream (no trainable state).

    Random draws (posterior noise, t, ε, in that order per call) come from `self.generator` (CPU), whose
    state is in `state_dict()` so a resumed run draws the same numbers.
    """

    def __init__(
        self,
        cfg: MVDreamConfig,
        models: MVDreamModels,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        cfg.validate()
        # guidance.mvdream.precision unless the caller names a dtype (fp16 is CUDA-only: the CPU stays fp32).
        if dtype is None and Precision(cfg.precision) is Precision.fp32:
            dtype = torch.float32
        super().__init__(
            vae=models.vae,
            tokenizer=models.tokenizer,
            text_encoder=models.text_encoder,
            native_size=(cfg.image_size, cfg.image_size),
            device=device,
            dtype=dtype,
            offload=cfg.offload,
            vae_gradient_checkpointing=cfg.vae_gradient_checkpointing,
            seed=seed,
        )
        self.cfg = cfg
        self.unet = self.rest(models.unet)
        # MVDream's own schedule (ldm register_schedule, linear_start 0.00085, linear_end 0.012, 1000 steps).
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        self.num_timesteps = self.alphas_cumprod.shape[0]
        self.n_views = cfg.n_views
        self._sizes = cfg.render_size_schedule()
        self._batches = cfg.batch_size_schedule()
        self._t_min, self._t_max = cfg.t_schedules()

    @classmethod
    def from_config(
        cls,
        cfg: MVDreamConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        seed: int = 0,
        config_key: str = "guidance.mvdream",
    ) -> MVDreamGuidance:
        """Load the weights named by `cfg` (hub ids or local paths; see weights.py) and build the prior."""
        cfg.validate(config_key)  # before any weights are looked for
        if dtype is None and Precision(cfg.precision) is Precision.fp32:
            dtype = torch.float32
        weights_dtype = resolve_dtype(device, dtype)
        # Resolve both sources before loading anything, so missing models fail at once, together.
        key = f"{config_key}.components_model"
        ckpt, loc = resolve_together(
            lambda: resolve_checkpoint_file(cfg.checkpoint, cfg.checkpoint_file, f"{config_key}.checkpoint"),
            lambda: locate_pretrained(cfg.components_model, key, ("vae", "text_encoder", "tokenizer")),
        )
        unet = load_mvdream_unet(
            ckpt, config=cfg.unet_config, dtype=weights_dtype, trust_pickle=cfg.trust_pickle
        )
        tokenizer, text_encoder = load_text_encoder(loc, key, weights_dtype)
        models = MVDreamModels(
            unet, load_frozen(AutoencoderKL, loc, "vae", key, weights_dtype), tokenizer, text_encoder
        )
        return cls(cfg, models, device=device, dtype=dtype, seed=seed)

    def render_size(self, step: Moment) -> tuple[int, int]:
        """Render side at a stage-local step: the stage's render_sizes phase (authors: 64² for the first 5000
        steps of stages 1 and 2, then 256²; 256² in stage 3; the renders are resized to image_size either way)."""
        side = int(self._sizes.at(step))
        return side, side

    def batch_size(self, step: Moment) -> int:
        """Renders per 3D step: the stage's batch_sizes phase (authors: 8 = two groups of 4 views for the first
        5000 steps of stage 1, then 4)."""
        return int(self._batches.at(step))

    def timestep_range(self, step: Moment) -> tuple[int, int]:
        """(t_min, t_max), inclusive, at a stage-local step (authors' update_step with C() ramps)."""
        lo = _step_index(self._t_min.at(step), self.num_timesteps)
        hi = _step_index(self._t_max.at(step), self.num_timesteps)
        if not 0 <= lo <= hi < self.num_timesteps:
            raise ValueError(
                f"MVDream t-range at step {step} is [{lo}, {hi}]; min/max_step_percent must give "
                f"0 <= t_min <= t_max < {self.num_timesteps}"
            )
        return lo, hi

    def _check_inputs(self, renders: torch.Tensor, prompt: str, cameras: Cameras) -> None:
        if renders.ndim != 4 or renders.shape[-1] != 3:
            raise ValueError(f"renders must be [B, H, W, 3], got {tuple(renders.shape)}")
        b, h, w, _ = renders.shape
        if b == 0 or b % self.n_views:
            raise ValueError(
                f"renders: MVDream needs a multiple of n_views={self.n_views} views (the views of each "
                f"object consecutive), got B={b}"
            )
        if h != w or h not in self._sizes.all_values():
            raise ValueError(
                "renders: MVDream takes square renders of a size in "
                f"render_sizes={self.cfg.render_sizes}, got {h}x{w}"
            )
        if len(cameras) != b:
            raise ValueError(f"cameras: need one camera per render ({b}), got {len(cameras)}")
        check_prompt(prompt)

    def encode(self, renders: torch.Tensor) -> torch.Tensor:
        """renders [B, H, W, 3] in [0, 1] -> latents [B, 4, image_size/8, image_size/8] fp32 (with grad)."""
        return self.vae_latents(renders, (self.cfg.image_size,) * 2, self.cfg.sample_posterior)

    def __call__(
        self, renders: torch.Tensor, prompt: str, cameras: Cameras, times: torch.Tensor, step: Moment
    ) -> GuidanceOut:
        """renders: [B, H, W, 3] in [0, 1], B = k·n_views; cameras: B cameras; times unused (static prior)."""
        self._check_inputs(renders, prompt, cameras)
        return self.loss_on_latents(self.encode(renders), prompt, cameras, step)

    def loss_on_latents(
        self,
        latents: torch.Tensor,
        prompt: str,
        cameras: Cameras,
        step: Moment,
        t: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> GuidanceOut:
        """The loss on VAE latents [B, 4, h, w] (B = k·n_views); `t` / `noise` override the random draws."""
        b = latents.shape[0]
        if b % self.n_views or len(cameras) != b:
            raise ValueError(
                f"latents: B={b} must be a multiple of n_views={self.n_views} with one camera each"
            )
        t_min, t_max = self.timestep_range(step)
        if t is None:
            t = int(self.draw_timesteps(t_min, t_max, 1))
        if noise is None:
            noise = self.draw_noise(latents.shape)
        noise = noise.to(latents.device, torch.float32)
        alpha_bar = self.alphas_cumprod[t]  # 0-dim float64, as the Python float below
        a_bar = float(alpha_bar)

        direction = None
        if self.cfg.view_dependent_prompting:
            direction = view_direction(cameras.elevation, cameras.azimuth, self.cfg.view_prompts)
        context = self.text.cfg_pair(prompt, self.cfg.negative_prompt, b, direction)  # [2B, 77, C]
        camera = mvdream_camera(cameras.c2w.to(self.device, torch.float32)).repeat(2, 1)  # [2B, 16]

        with torch.no_grad():
            z = latents.detach()
            z_t = add_noise(z, noise, alpha_bar)
            with self.placement.active(self.unet):
                eps = self.unet(
                    torch.cat([z_t, z_t]),
                    torch.full((2 * b,), t, device=self.device, dtype=torch.long),
                    context,
                    camera,
                    self.n_views,
                ).float()
            eps_cond, eps_uncond = cfg_halves(eps)
            eps_cfg = cfg_mix(eps_cond, eps_uncond, self.cfg.guidance_scale)
            if self.cfg.recon_loss:
                x0 = self._x0(z_t, eps_cfg, a_bar)
                if self.cfg.recon_std_rescale > 0:
                    x0 = self._std_rescale(x0, self._x0(z_t, eps_cond, a_bar))
                # d/dz of 0.5·‖z − sg(x̂0)‖²/B is (z − x̂0)/B: the authors' recon loss as an SDS "grad".
                grad = z - x0
            else:
                grad = (1.0 - a_bar) * (eps_cfg - noise)  # w(t) = 1 − ᾱ_t ("sigma_t^2")
            grad = torch.nan_to_num(grad)

        loss = self.cfg.loss_weight * sds_loss(latents, grad)
        stats = {"t": float(t), "t_min": float(t_min), "t_max": float(t_max), "grad_norm": float(grad.norm())}
        return GuidanceOut(loss=loss, stats=stats)

    @staticmethod
    def _x0(z_t: torch.Tensor, eps: torch.Tensor, a_bar: float) -> torch.Tensor:
        # ldm predict_start_from_noise: x̂0 = z_t/√ᾱ − √(1/ᾱ − 1)·ε.
        return z_t / math.sqrt(a_bar) - math.sqrt(1.0 / a_bar - 1.0) * eps

    def _std_rescale(self, x0_cfg: torch.Tensor, x0_cond: torch.Tensor) -> torch.Tensor:
        """Blend x̂0_cfg with x̂0_cfg·std(x̂0_cond)/std(x̂0_cfg), the std taken per group of n_views views."""
        shape = (-1, self.n_views, *x0_cfg.shape[1:])
        dims = [1, 2, 3, 4]
        factor = (x0_cond.reshape(shape).std(dims, keepdim=True) + 1e-8) / (
            x0_cfg.reshape(shape).std(dims, keepdim=True) + 1e-8
        )
        adjusted = (x0_cfg.reshape(shape) * factor).reshape(x0_cfg.shape)
        r = self.cfg.recon_std_rescale
        return r * adjusted + (1.0 - r) * x0_cfg
