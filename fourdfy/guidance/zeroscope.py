"""Video SDS with Zeroscope v2 576w: the "VID" update of hybrid SDS (paper Eq. 6).

Follows the authors' `zeroscope_guidance.py` (4D-fy repo, configured by configs/fourdfy_stage_3.yaml
`guidance_video`): 16 frames of one fixed camera rendered 160×288, each bilinearly upsampled to 320×576
and VAE-encoded on its own (posterior sample × scaling factor), stacked to [1, 4, 16, 40, 72]; one
t ~ U{20..980}; the diffusers UNet3DConditionModel on [cond, uncond]; CFG as the authors write it,
ε_c + 100(ε_c − ε_u) (= the usual ε_u + 101(ε_c − ε_u)); view-dependent prompts at 45°; w = 1 − ᾱ;
loss weight λ_video = 0.1 (system.loss.lambda_sds_video; users raise it to 0.3–1.0 for more motion).
Memory option: back-propagate through the VAE encoder for only N random frames (`vae_grad_frames`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet3DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from fourdfy.clock import Moment
from fourdfy.guidance.base import (
    GuidanceOut,
    LatentDiffusionPrior,
    cfg_halves,
    cfg_mix,
    check_video_inputs,
    sds_loss,
)
from fourdfy.guidance.configs import ZeroscopeConfig
from fourdfy.guidance.memory import resolve_dtype
from fourdfy.guidance.noise import add_noise
from fourdfy.guidance.text import view_direction
from fourdfy.guidance.weights import (
    NoiseSchedule,
    PredictionType,
    load_frozen,
    load_noise_schedule,
    load_text_encoder,
    locate_pretrained,
)
from fourdfy.render.cameras import Cameras


@dataclass
class ZeroscopeModels:
    """The loaded networks of the video prior."""

    unet: UNet3DConditionModel
    vae: AutoencoderKL
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    schedule: NoiseSchedule


class ZeroscopeGuidance(LatentDiffusionPrior):
    """The video prior: implements `fourdfy.guidance.base.Guidance` for Zeroscope (no trainable state).

    Random draws come from `self.generator` (CPU): per call the frames that keep a VAE graph (when
    `vae_grad_frames` is set), posterior noise, t, ε. Its state is in `state_dict()`.
    """

    is_video = True  # the renders are F frames of one camera at consecutive times

    def __init__(
        self,
        cfg: ZeroscopeConfig,
        models: ZeroscopeModels,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        if models.schedule.prediction_type != PredictionType.epsilon:
            raise ValueError(
                "guidance.zeroscope.pretrained_model must be an ε-prediction model, its scheduler says "
                f"prediction_type={str(models.schedule.prediction_type)!r}"
            )
        cfg.validate()
        super().__init__(
            vae=models.vae,
            tokenizer=models.tokenizer,
            text_encoder=models.text_encoder,
            native_size=(cfg.render_height, cfg.render_width),
            device=device,
            dtype=dtype,
            offload=cfg.offload,
            vae_gradient_checkpointing=cfg.vae_gradient_checkpointing,
            seed=seed,
        )
        self.cfg = cfg
        self.unet = self.rest(models.unet)
        self.schedule = models.schedule
        self.alphas_cumprod = models.schedule.alphas_cumprod  # float64 [T]
        self.num_timesteps = self.alphas_cumprod.shape[0]
        self.min_step = int(self.num_timesteps * cfg.min_step_percent)  # authors' int(T * percent): 20
        self.max_step = int(self.num_timesteps * cfg.max_step_percent)  # 980
        self.n_frames = cfg.n_frames
        self.n_views = cfg.n_frames

    @classmethod
    def from_config(
        cls,
        cfg: ZeroscopeConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        seed: int = 0,
        config_key: str = "guidance.zeroscope",
    ) -> ZeroscopeGuidance:
        """Load the weights named by `cfg` (hub id or local path; see weights.py) and build the prior."""
        cfg.validate(config_key)  # before any weights are looked for
        weights_dtype = resolve_dtype(device, dtype)
        key = f"{config_key}.pretrained_model"
        loc = locate_pretrained(
            cfg.pretrained_model, key, ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        )
        tokenizer, text_encoder = load_text_encoder(loc, key, weights_dtype)
        models = ZeroscopeModels(
            unet=load_frozen(UNet3DConditionModel, loc, "unet", key, weights_dtype),
            vae=load_frozen(AutoencoderKL, loc, "vae", key, weights_dtype),
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            schedule=load_noise_schedule(loc, key),
        )
        return cls(cfg, models, device=device, dtype=dtype, seed=seed)

    def _check_inputs(self, renders: torch.Tensor, prompt: str, cameras: Cameras) -> None:
        check_video_inputs(renders, prompt, cameras, self.n_frames, (self.cfg.render_height, self.cfg.render_width))

    def encode(self, renders: torch.Tensor) -> torch.Tensor:
        """frames [F, H, W, 3] in [0, 1] -> latents [1, 4, F, h, w] float32, frames encoded one by one."""
        grad_mask = None
        if self.cfg.vae_grad_frames is not None and self.cfg.vae_grad_frames < self.n_frames:
            keep = torch.randperm(self.n_frames, generator=self.generator)[: self.cfg.vae_grad_frames]
            kept = set(keep.tolist())
            grad_mask = [i in kept for i in range(self.n_frames)]
        size = (self.cfg.image_height, self.cfg.image_width)
        latents = self.vae_latents(renders, size, self.cfg.sample_posterior, grad_mask)
        return latents.permute(1, 0, 2, 3).unsqueeze(0)  # [F, 4, h, w] -> [1, 4, F, h, w]

    def __call__(
        self, renders: torch.Tensor, prompt: str, cameras: Cameras, times: torch.Tensor, step: Moment
    ) -> GuidanceOut:
        """renders: [F, H, W, 3] frames of one camera at consecutive times; cameras: F (equal) cameras."""
        self._check_inputs(renders, prompt, cameras)
        return self.loss_on_latents(self.encode(renders), prompt, cameras)

    def loss_on_latents(
        self,
        latents: torch.Tensor,
        prompt: str,
        cameras: Cameras,
        t: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> GuidanceOut:
        """The video SDS loss on latents [1, 4, F, h, w]; `t` / `noise` override the random draws."""
        if latents.ndim != 5 or latents.shape[0] != 1:
            raise ValueError(f"latents must be [1, 4, F, h, w], got {tuple(latents.shape)}")
        if t is None:
            t = int(self.draw_timesteps(self.min_step, self.max_step, 1))
        if noise is None:
            noise = self.draw_noise(latents.shape)
        noise = noise.to(latents.device, torch.float32)
        alpha_bar = self.alphas_cumprod[t]  # 0-dim float64, as the Python float below
        a_bar = float(alpha_bar)

        direction = None
        if self.cfg.view_dependent_prompting:  # one camera per video: the first frame's
            direction = view_direction(cameras.elevation[:1], cameras.azimuth[:1], self.cfg.view_prompts)
        text = self.text.cfg_pair(prompt, self.cfg.negative_prompt, 1, direction)  # [2, 77, C]

        with torch.no_grad():
            z_t = add_noise(latents.detach(), noise, alpha_bar)
            t_in = torch.full((2,), t, device=self.device, dtype=torch.long)
            with self.placement.active(self.unet):
                z_in = torch.cat([z_t, z_t]).to(self.dtype)  # diffusers casts its time embedding to this
                eps = self.unet(z_in, t_in, encoder_hidden_states=text).sample.float()
            # As the authors write it: ε_c + s(ε_c − ε_u).
            eps_cfg = cfg_mix(*cfg_halves(eps), self.cfg.guidance_scale, from_cond=True)
            grad = torch.nan_to_num((1.0 - a_bar) * (eps_cfg - noise))  # w(t) = 1 − ᾱ_t

        loss = self.cfg.loss_weight * sds_loss(latents, grad)
        return GuidanceOut(loss=loss, stats={"t": float(t), "grad_norm": float(grad.norm())})
