"""Video SDS with VideoCrafter2 and motion amplification: the "VID" update of the authors' *_vc configs.

Follows the authors' `videocrafter_guidance.py` (4D-fy repo, configured by configs/fourdfy_stage_3_vc.yaml
`guidance_video` / `prompt_processor_video`): 16 frames of one fixed camera rendered 80×128, each bilinearly
resized to 320×512 and VAE-encoded on its own (posterior sample × 0.18215), only `low_ram_vae` = 2 random
frames keeping a graph; stacked to [1, 4, 16, 40, 64]; one t ~ U{min..max}; the VideoCrafter2 UNet on
[cond, uncond] with fps 8; CFG ε_c + 100(ε_c − ε_u) against the negative prompt "low motion, static statue, not
moving, no motion"; view-dependent prompts at 45° (threestudio's defaults, as Zeroscope's); w = 1 − ᾱ;
motion amplification of the score s = ε̂ − ε along time, s ← mean_T(s) + 30(s − mean_T(s)); loss weight
λ_video = 0.1 (system.loss.lambda_sds_video).

The t range anneals, `min_step_percent` [0, 0.02, 0.02, 5000] and `max_step_percent` [0, 0.98, 0.5, 5000], on
the clock of stage 3: the authors run each stage as a new training run started from the previous one's weights
(README: `system.weights=$ckpt`), so threestudio's `global_step` that `update_step` reads restarts at 0 there.
Our trainer passes each call's Moment (fourdfy/clock.py), whose stage-local step the ramps read.

The noise schedule is the yaml's (1000 steps, linear_start 0.00085, linear_end 0.012). Its `use_scale: true,
scale_b: 0.7` change only LatentDiffusion.q_sample (x0 scaled by a per-t factor); the authors' SDS noises with
its own `add_noise(√ᾱ x0 + √(1−ᾱ) ε)` on `model.alphas_cumprod`, so neither enters here (we do the same).
Weights are fp32 (`half_precision_weights: false`); fp16 is an option on CUDA. The authors' stage-3 trainer
runs `precision: 16-mixed`, so their fp32 UNet computes under fp16 autocast; ours computes in the weight dtype.
"""

from __future__ import annotations

import torch

from fourdfy.clock import Moment
from fourdfy.guidance.base import (
    GuidanceOut,
    LatentDiffusionPrior,
    cfg_halves,
    cfg_mix,
    check_video_inputs,
    sds_loss,
)
from fourdfy.guidance.configs import VideoCrafter2Config
from fourdfy.guidance.noise import add_noise
from fourdfy.guidance.text import view_direction
from fourdfy.guidance.videocrafter_weights import VideoCrafter2Models, load_videocrafter2_models
from fourdfy.guidance.weights import PredictionType
from fourdfy.render.cameras import Cameras

__all__ = ["VideoCrafter2Guidance", "VideoCrafter2Models", "amplify_motion", "weights_dtype"]


def weights_dtype(
    cfg: VideoCrafter2Config, device: torch.device | str, key: str = "guidance.videocrafter2"
) -> torch.dtype:
    """fp16 when `half_precision_weights` (CUDA only), else fp32 on every device (the authors' false)."""
    if not cfg.half_precision_weights:
        return torch.float32
    if torch.device(device).type != "cuda":
        raise ValueError(f"{key}.half_precision_weights=true needs a CUDA device (got {device}); set it to false")
    return torch.float16


def amplify_motion(score: torch.Tensor, scale: float) -> torch.Tensor:
    """score [B, C, T, h, w] -> mean_T(score) + scale·(score − mean_T(score)), same shape.

    videocrafter_guidance.py compute_grad_sds: `score_mean = score.mean(2, keepdim=True); score = score_mean +
    self.cfg.motion_amp_scale*(score - score_mean)`, applied only when the scale is not 1 (so 1 is bitwise off).
    """
    if scale == 1.0:
        return score
    mean = score.mean(2, keepdim=True)
    return mean + scale * (score - mean)


STAGE3_START = Moment(iteration=0, stage=3, stage_step=0)  # the default t range of loss_on_latents


class VideoCrafter2Guidance(LatentDiffusionPrior):
    """The VideoCrafter2 video prior: implements `fourdfy.guidance.base.Guidance` (no trainable state).

    Random draws come from `self.generator` (CPU): per call the frames that keep a VAE graph (when
    `vae_grad_frames` is set), posterior noise, t, ε. Its state is in `state_dict()`.
    """

    is_video = True  # the renders are F frames of one camera at consecutive times

    def __init__(
        self,
        cfg: VideoCrafter2Config,
        models: VideoCrafter2Models,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        seed: int = 0,
        config_key: str = "guidance.videocrafter2",
    ) -> None:
        """dtype: weight dtype; None = `weights_dtype(cfg, device)` (fp32 unless half_precision_weights)."""
        cfg.validate(config_key)
        if models.schedule.prediction_type != PredictionType.epsilon:
            raise ValueError(f"{config_key}: VideoCrafter2 is an ε-prediction model, got a "
                             f"{models.schedule.prediction_type} schedule")
        super().__init__(
            vae=models.vae,
            tokenizer=models.tokenizer,
            text_encoder=models.text_encoder,
            native_size=(cfg.render_height, cfg.render_width),
            device=device,
            dtype=dtype if dtype is not None else weights_dtype(cfg, device, config_key),
            offload=cfg.offload,
            vae_gradient_checkpointing=cfg.vae_gradient_checkpointing,
            seed=seed,
        )
        self.cfg = cfg
        self.unet = self.rest(models.unet)
        self.schedule = models.schedule
        self.alphas_cumprod = models.schedule.alphas_cumprod  # float64 [T] (float32 values, as the authors')
        self.num_timesteps = self.alphas_cumprod.shape[0]
        self._t_min, self._t_max = cfg.t_schedules(config_key)
        self.n_frames = cfg.n_frames
        self.n_views = cfg.n_frames

    @classmethod
    def from_config(
        cls,
        cfg: VideoCrafter2Config,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        seed: int = 0,
        config_key: str = "guidance.videocrafter2",
    ) -> VideoCrafter2Guidance:
        """Load the checkpoint named by `cfg` (hub id or local path; see videocrafter_weights.py) and build."""
        cfg.validate(config_key)  # before any weights are looked for
        dtype = dtype if dtype is not None else weights_dtype(cfg, device, config_key)
        models = load_videocrafter2_models(
            cfg.checkpoint,
            filename=cfg.checkpoint_file,
            config_key=f"{config_key}.checkpoint",
            unet_config=cfg.unet_config,
            vae_config=cfg.vae_config,
            text_config=cfg.text_config,
            dtype=dtype,
            trust_pickle=cfg.trust_pickle,
        )
        return cls(cfg, models, device=device, dtype=dtype, seed=seed, config_key=config_key)

    # ---------------------------------------------------------------- t range

    def step_range(self, step: Moment) -> tuple[int, int]:
        """(min, max) timestep at a stage-local step: int(T · percent(stage_step)), inclusive.

        As threestudio's update_step: `self.min_step = int(self.num_train_timesteps * min_step_percent)` with the
        percentages from `C([start, v0, v1, end], epoch, global_step)` (our StageSchedule, same arithmetic).
        """
        return int(self.num_timesteps * self._t_min.at(step)), int(self.num_timesteps * self._t_max.at(step))

    # ---------------------------------------------------------------- renders -> latents

    def _check_inputs(self, renders: torch.Tensor, prompt: str, cameras: Cameras) -> None:
        check_video_inputs(renders, prompt, cameras, self.n_frames, (self.cfg.render_height, self.cfg.render_width))

    def grad_frames(self) -> list[bool] | None:
        """Which frames keep a VAE graph this call (`vae_grad_frames` random ones), None = all.

        encode_first_stage: `mask_vae = torch.randperm(N) < low_ram_vae`, a random set of that many frames.
        """
        k = self.cfg.vae_grad_frames
        if k is None or k >= self.n_frames:
            return None
        kept = set(torch.randperm(self.n_frames, generator=self.generator)[:k].tolist())
        return [i in kept for i in range(self.n_frames)]

    def encode(self, renders: torch.Tensor) -> torch.Tensor:
        """frames [F, H, W, 3] in [0, 1] -> latents [1, 4, F, h, w] float32 (h, w = image size / 8).

        __call__: F.interpolate(rgb, (320, 512), bilinear, align_corners=False); encode_images: ·2 − 1, each frame
        through the 2D VAE (encoder_type "2d"), posterior sample × scale_factor.
        """
        size = (self.cfg.image_height, self.cfg.image_width)
        latents = self.vae_latents(renders, size, self.cfg.sample_posterior, self.grad_frames())
        return latents.permute(1, 0, 2, 3).unsqueeze(0)  # [F, 4, h, w] -> [1, 4, F, h, w]

    # ---------------------------------------------------------------- Guidance

    def __call__(
        self, renders: torch.Tensor, prompt: str, cameras: Cameras, times: torch.Tensor, step: Moment
    ) -> GuidanceOut:
        """renders: [F, H, W, 3] frames of one camera at consecutive times; cameras: F (equal) cameras;
        step: the iteration's stage-local step gives the t range."""
        self._check_inputs(renders, prompt, cameras)
        low, high = self.step_range(step)
        t = int(self.draw_timesteps(low, high, 1))  # torch.randint(min_step, max_step + 1, [1])
        return self.loss_on_latents(self.encode(renders), prompt, cameras, t=t)

    def unet_eps(self, z_t: torch.Tensor, t: int, text: torch.Tensor) -> torch.Tensor:
        """ε̂ for [cond, uncond]: z_t [1, 4, F, h, w], text [2, S, C] -> [2, 4, F, h, w] float32.

        compute_grad_sds: apply_model(cat([z_t] * 2), cat([t] * 2), {'c_crossattn': [text], 'fps': full((2,),
        fps)}) -> DiffusionWrapper -> UNet(x, t, context=text, fps=fps).
        """
        t_in = torch.full((2,), t, device=self.device, dtype=torch.long)
        fps = torch.full((2,), self.cfg.fps, device=self.device, dtype=torch.long)
        with self.placement.active(self.unet):
            z_in = torch.cat([z_t, z_t]).to(self.dtype)
            return self.unet(z_in, t_in, text, fps=fps).float()

    def loss_on_latents(
        self,
        latents: torch.Tensor,
        prompt: str,
        cameras: Cameras,
        t: int | None = None,
        noise: torch.Tensor | None = None,
        step: Moment | None = None,
    ) -> GuidanceOut:
        """The video SDS loss on latents [1, 4, F, h, w]; `t` / `noise` override the random draws (t drawn
        from the range at `step`, default the stage's first step, when not given)."""
        if latents.ndim != 5 or latents.shape[0] != 1:
            raise ValueError(f"latents must be [1, 4, F, h, w], got {tuple(latents.shape)}")
        if t is None:
            low, high = self.step_range(STAGE3_START if step is None else step)
            t = int(self.draw_timesteps(low, high, 1))
        if noise is None:
            noise = self.draw_noise(latents.shape)
        noise = noise.to(latents.device, torch.float32)
        alpha_bar = self.alphas_cumprod[t]  # 0-dim float64
        a_bar = float(alpha_bar)

        direction = None
        if self.cfg.view_dependent_prompting:  # train_dynamic_camera: elevation[[0]], azimuth[[0]]
            direction = view_direction(cameras.elevation[:1], cameras.azimuth[:1], self.cfg.view_prompts)
        text = self.text.cfg_pair(prompt, self.cfg.negative_prompt, 1, direction)  # [2, 77, C], (cond, uncond)

        with torch.no_grad():
            z_t = add_noise(latents.detach(), noise, alpha_bar)
            # As the authors write it: ε_c + s(ε_c − ε_u).
            eps_cfg = cfg_mix(*cfg_halves(self.unet_eps(z_t, t, text)), self.cfg.guidance_scale, from_cond=True)
            score = amplify_motion(eps_cfg - noise, self.cfg.motion_amp_scale)
            grad = torch.nan_to_num((1.0 - a_bar) * score)  # weighting_strategy "sds": w(t) = 1 − ᾱ_t

        loss = self.cfg.loss_weight * sds_loss(latents, grad)
        return GuidanceOut(loss=loss, stats={"t": float(t), "grad_norm": float(grad.norm())})
