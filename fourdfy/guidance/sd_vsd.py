"""Variational score distillation with Stable Diffusion 2.1: the "IMG" update of hybrid SDS (paper Eqs. 4, 5).

Follows the authors' `stable_diffusion_vsd_guidance.py` (4D-fy repo, configured by
configs/fourdfy_stage_*.yaml `guidance`):
- pretrained branch: SD 2.1-base (ε-prediction), CFG 7.5 with view-dependent prompts (front/side/back at
  30°) and the empty negative prompt;
- LoRA branch: SD 2.1 (768, v-prediction, converted to ε) with rank-4 LoRA on every attention projection
  and a camera embedding TimestepEmbedding(16 → time-embedding width, 1280 for SD) used as the UNet's class
  embedding (input: the flattened 4×4 camera-to-world matrix); view-independent prompt; its CFG half uses
  a zero camera, scale 1.0;
- gradient w(t)(ε_pretrained,cfg − ε_lora), w = 1 − ᾱ, one t ~ U{20..500} per image;
- render 256² upsampled bilinearly to 512², VAE latents with gradient (posterior sample × scaling factor).
- LoRA fine-tuning (`finetune_step`, paper Eq. 5): t ~ U{0..999}, the scheduler's own target (v for
  SD 2.1), camera zeroed for the whole batch with probability 0.1, AdamW lr 1e-4 over the LoRA and
  camera-embedding parameters only. (The authors' paper-era config attached these to an optimiser group
  that did not exist in later stages, so the LoRA never trained; here the prior owns its optimiser.)
Paper choices the code does not follow are config values: the ε-objective of Eq. 5
(`lora_epsilon_objective`) and a LoRA on the same model as the pretrained branch (set
`lora_pretrained_model` = `pretrained_model`; one UNet is then shared, the pretrained branch runs with the
adapters and camera embedding switched off, as the authors' `single_model` path).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTokenizer

from fourdfy.clock import Moment
from fourdfy.guidance.base import GuidanceOut, LatentDiffusionPrior, cfg_halves, cfg_mix, check_prompt, sds_loss
from fourdfy.guidance.configs import SDVSDConfig
from fourdfy.guidance.memory import resolve_dtype
from fourdfy.guidance.noise import add_noise, v_target, v_to_eps
from fourdfy.guidance.text import view_direction
from fourdfy.guidance.weights import (
    NoiseSchedule,
    PredictionType,
    load_frozen,
    load_noise_schedule,
    load_text_encoder,
    locate_pretrained,
    resolve_together,
)
from fourdfy.render.cameras import Cameras

# The attention projections that the authors' LoRAAttnProcessor adapted (q, k, v, out) in every attn1/attn2.
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
CAMERA_DIM = 16  # flattened 4x4 c2w (authors' camera_condition_type "extrinsics": c2w.view(B, -1))


@dataclass
class SDVSDModels:
    """The loaded networks of the image prior. `unet_lora` may be the same object as `unet` (shared)."""

    unet: UNet2DConditionModel
    unet_lora: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    schedule: NoiseSchedule
    schedule_lora: NoiseSchedule


class SDVSDGuidance(LatentDiffusionPrior):
    """The image prior: implements `fourdfy.guidance.base.Guidance` with VSD and a camera-conditioned LoRA.

    Random draws come from `self.generator` (CPU): per call posterior noise, t, ε; per fine-tuning step t,
    ε, camera-dropout coin. Its state, the LoRA and camera-embedding weights and the optimiser state are in
    `state_dict()` (exact resume).

    Each call hands its detached latents on in `GuidanceOut.latents`; `finetune_step(..., latents=...)` of
    the same iteration trains on them instead of encoding the renders again (the authors' train_lora reuses
    the VSD call's latents too).
    """

    n_views = 1

    def __init__(
        self,
        cfg: SDVSDConfig,
        models: SDVSDModels,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        if models.schedule.prediction_type != PredictionType.epsilon:
            raise ValueError(
                "guidance.sd_vsd.pretrained_model must be an ε-prediction model (the VSD gradient subtracts ε "
                f"predictions), its scheduler says prediction_type={str(models.schedule.prediction_type)!r}"
            )
        cfg.validate()
        super().__init__(
            vae=models.vae,
            tokenizer=models.tokenizer,
            text_encoder=models.text_encoder,
            native_size=(cfg.render_size, cfg.render_size),
            device=device,
            dtype=dtype,
            offload=cfg.offload,
            vae_gradient_checkpointing=cfg.vae_gradient_checkpointing,
            seed=seed,
        )
        self.cfg = cfg
        self.shared = models.unet_lora is models.unet
        self.unet = self.rest(models.unet)
        self.unet_lora = self.unet if self.shared else self.rest(models.unet_lora)
        self.alphas_cumprod = models.schedule.alphas_cumprod  # float64 [T]
        self.alphas_cumprod_lora = models.schedule_lora.alphas_cumprod
        self.lora_v_prediction = models.schedule_lora.prediction_type == PredictionType.v_prediction
        self.num_timesteps = self.alphas_cumprod.shape[0]
        self._t_min, self._t_max = cfg.t_schedules()

        self.lora_params, self.camera_embedding = self._add_lora_and_camera(seed)
        self.optimizer = torch.optim.AdamW(
            [*self.lora_params.values(), *self.camera_embedding.parameters()],
            lr=cfg.lora_lr,
            betas=cfg.lora_betas,
            eps=cfg.lora_eps,
            weight_decay=cfg.lora_weight_decay,
        )
        # fp16 backward through the frozen UNet underflows: without loss scaling some LoRA tensors got exactly
        # zero gradient on an H100 (lora_B stayed 0). Dynamic loss scaling for fp16 weights; off otherwise.
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def reset_optimizer(self) -> None:
        """Fresh AdamW moments and loss scale for the LoRA (a stage start; the authors' next stage is a new run
        whose optimiser holds the guidance's LoRA group, configs/fourdfy_stage_2.yaml params.guidance_single_view)."""
        self.optimizer.state.clear()
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def timestep_range(self, step: Moment) -> tuple[int, int]:
        """(min, max) timestep, inclusive, at a stage-local step: the authors' int(T · percent)."""
        return int(self.num_timesteps * self._t_min.at(step)), int(self.num_timesteps * self._t_max.at(step))

    def _add_lora_and_camera(self, seed: int) -> tuple[dict[str, torch.nn.Parameter], TimestepEmbedding]:
        """peft LoRA on the LoRA UNet's attention projections + the camera class embedding, in fp32."""
        unet = self.unet_lora
        time_embed_dim = unet.time_embedding.linear_2.out_features  # 1280 for SD 2.1 (authors hard-code it)
        # Initialisation draws from a private RNG seeded by `seed`: reproducible, global RNGs untouched
        # (the CUDA one too: peft may initialise the LoRA on the UNet's device).
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            # "gaussian": A ~ N(0, 1/r), B = 0, as diffusers' LoRALinearLayer that the authors used.
            unet.add_adapter(
                LoraConfig(
                    r=self.cfg.lora_rank,
                    lora_alpha=self.cfg.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(LORA_TARGET_MODULES),
                )
            )
            camera_embedding = TimestepEmbedding(CAMERA_DIM, time_embed_dim)
        params = {name: p for name, p in unet.named_parameters() if "lora_" in name}
        if not params:
            raise ValueError(
                "no attention projections (to_q/to_k/to_v/to_out.0) found for the LoRA in the UNet"
            )
        for p in params.values():
            p.data = p.data.float()  # trainable weights in fp32 beside fp16 frozen ones
            p.requires_grad_(True)
        camera_embedding = camera_embedding.to(next(iter(params.values())).device).requires_grad_(True)
        # diffusers adds class_embedding(class_labels) to the time embedding (class_embed_type None: no
        # projection of the labels first) and casts it to the UNet's dtype.
        unet.class_embedding = camera_embedding
        return params, camera_embedding

    @classmethod
    def from_config(
        cls,
        cfg: SDVSDConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        seed: int = 0,
        config_key: str = "guidance.sd_vsd",
    ) -> SDVSDGuidance:
        """Load the weights named by `cfg` (hub ids or local paths; see weights.py) and build the prior."""
        cfg.validate(config_key)  # before any weights are looked for
        weights_dtype = resolve_dtype(device, dtype)
        key = f"{config_key}.pretrained_model"
        key_lora = f"{config_key}.lora_pretrained_model"
        shared = cfg.lora_pretrained_model == cfg.pretrained_model
        parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        resolvers = [lambda: locate_pretrained(cfg.pretrained_model, key, parts)]
        if not shared:
            lora_parts = ("unet", "scheduler")
            resolvers.append(lambda: locate_pretrained(cfg.lora_pretrained_model, key_lora, lora_parts))
        locations = resolve_together(*resolvers)  # every model checked before anything loads
        loc, loc_lora = locations[0], locations[-1]
        unet = load_frozen(UNet2DConditionModel, loc, "unet", key, weights_dtype)
        tokenizer, text_encoder = load_text_encoder(loc, key, weights_dtype)
        models = SDVSDModels(
            unet=unet,
            unet_lora=unet if shared else load_frozen(UNet2DConditionModel, loc_lora, "unet", key_lora, weights_dtype),
            vae=load_frozen(AutoencoderKL, loc, "vae", key, weights_dtype),
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            schedule=load_noise_schedule(loc, key),
            schedule_lora=load_noise_schedule(loc_lora, key_lora),
        )
        return cls(cfg, models, device=device, dtype=dtype, seed=seed)

    # ---------------------------------------------------------------- inputs

    def _check_inputs(self, renders: torch.Tensor, prompt: str, cameras: Cameras) -> None:
        if renders.ndim != 4 or renders.shape[-1] != 3 or renders.shape[0] == 0:
            raise ValueError(f"renders must be [B, H, W, 3] with B >= 1, got {tuple(renders.shape)}")
        size = self.cfg.render_size
        if tuple(renders.shape[1:3]) != (size, size):
            raise ValueError(
                f"renders: the SD VSD prior takes {size}x{size} renders (render_size), got "
                f"{renders.shape[1]}x{renders.shape[2]}"
            )
        if len(cameras) != renders.shape[0]:
            raise ValueError(f"cameras: need one camera per render ({renders.shape[0]}), got {len(cameras)}")
        check_prompt(prompt)

    def encode(self, renders: torch.Tensor) -> torch.Tensor:
        """renders [B, 256, 256, 3] in [0, 1] -> upsampled 512² -> latents [B, 4, 64, 64] float32."""
        return self.vae_latents(renders, (self.cfg.image_size,) * 2, self.cfg.sample_posterior)

    def _camera(self, cameras: Cameras) -> torch.Tensor:
        return cameras.c2w.to(self.device, torch.float32).reshape(len(cameras), CAMERA_DIM)

    # ---------------------------------------------------------------- VSD loss

    def __call__(
        self, renders: torch.Tensor, prompt: str, cameras: Cameras, times: torch.Tensor, step: Moment
    ) -> GuidanceOut:
        """renders: [B, 256, 256, 3] in [0, 1]; cameras: B cameras; times unused; step gives the t range.

        The result's `latents` [B, 4, 64, 64] (detached) are for this iteration's `finetune_step`.
        """
        self._check_inputs(renders, prompt, cameras)
        latents = self.encode(renders)
        out = self.loss_on_latents(latents, prompt, cameras, step=step)
        out.latents = latents.detach()
        return out

    def loss_on_latents(
        self,
        latents: torch.Tensor,
        prompt: str,
        cameras: Cameras,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        step: Moment | None = None,
    ) -> GuidanceOut:
        """The VSD loss on latents [B, 4, h, w]; `t` [B] / `noise` override the random draws; `step` gives the
        t range they are drawn from (needed when `t` is None)."""
        b = latents.shape[0]
        if len(cameras) != b:
            raise ValueError(f"cameras: need one camera per latent ({b}), got {len(cameras)}")
        if t is None:
            if step is None:
                raise ValueError("loss_on_latents needs `step` (for the t range) or `t`")
            t = self.draw_timesteps(*self.timestep_range(step), b)
        if noise is None:
            noise = self.draw_noise(latents.shape)
        t = t.to(self.device)
        noise = noise.to(latents.device, torch.float32)
        a_bar = self.alphas_cumprod.to(self.device)[t].float().view(b, 1, 1, 1)
        a_bar_lora = self.alphas_cumprod_lora.to(self.device)[t].float().view(b, 1, 1, 1)

        direction = None
        if self.cfg.view_dependent_prompting:
            direction = view_direction(cameras.elevation, cameras.azimuth, self.cfg.view_prompts)
        text_vd = self.text.cfg_pair(prompt, self.cfg.negative_prompt, b, direction)
        text = self.text.cfg_pair(prompt, self.cfg.negative_prompt, b, None)
        camera = self._camera(cameras)
        camera_cfg = torch.cat([camera, torch.zeros_like(camera)])  # uncond half: zero camera

        with torch.no_grad():
            z_t = add_noise(latents.detach(), noise, a_bar)
            z_in, t_in = torch.cat([z_t, z_t]), torch.cat([t, t])
            # Inputs in the weights' dtype: diffusers casts its time embedding to the input's dtype.
            z_unet = z_in.to(self.dtype)
            with self.placement.active(self.unet), self._pretrained_branch():
                eps_pre = self.unet(z_unet, t_in, encoder_hidden_states=text_vd).sample.float()
            with self.placement.active(self.unet_lora):
                out_lora = self.unet_lora(
                    z_unet, t_in, encoder_hidden_states=text, class_labels=camera_cfg
                ).sample.float()
            if self.lora_v_prediction:
                out_lora = v_to_eps(out_lora, z_in, torch.cat([a_bar_lora, a_bar_lora]))
            eps_pretrained = cfg_mix(*cfg_halves(eps_pre), self.cfg.guidance_scale)
            eps_lora = cfg_mix(*cfg_halves(out_lora), self.cfg.guidance_scale_lora)
            grad = torch.nan_to_num((1.0 - a_bar) * (eps_pretrained - eps_lora))  # w(t) = 1 − ᾱ_t

        loss = self.cfg.loss_weight * sds_loss(latents, grad)
        stats = {"t": float(t.float().mean()), "grad_norm": float(grad.norm())}
        return GuidanceOut(loss=loss, stats=stats)

    @contextmanager
    def _pretrained_branch(self) -> Iterator[None]:
        """With a shared UNet, switch its LoRA adapters and camera embedding off inside the block."""
        if not self.shared:
            yield
            return
        self.unet.disable_adapters()
        self.unet.class_embedding = None
        try:
            yield
        finally:
            self.unet.enable_adapters()
            self.unet.class_embedding = self.camera_embedding

    # ---------------------------------------------------------------- LoRA fine-tuning

    def finetune_step(
        self,
        renders: torch.Tensor,
        prompt: str,
        cameras: Cameras,
        step: Moment,
        latents: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One AdamW step of the LoRA + camera embedding on the (detached) renders (paper Eq. 5); nothing with
        guidance.sd_vsd.train_lora=false (the authors' first public commit, where the LoRA never trained).

        latents: [B, 4, 64, 64], the `GuidanceOut.latents` of this iteration's call on `renders` (used as
        they are: no second VAE pass, no posterior draw); None encodes `renders` here.
        """
        self._check_inputs(renders, prompt, cameras)
        if not self.cfg.train_lora:
            return {}
        if latents is None:
            with torch.no_grad():
                latents = self.encode(renders.detach())
        elif latents.shape[0] != renders.shape[0]:
            raise ValueError(
                f"latents: need one latent per render ({renders.shape[0]}), got {tuple(latents.shape)}"
            )
        return self.finetune_on_latents(latents, prompt, cameras)

    def finetune_on_latents(self, latents: torch.Tensor, prompt: str, cameras: Cameras) -> dict[str, float]:
        """The fine-tuning step on latents [B, 4, h, w] (authors' train_lora + one optimiser step)."""
        n = self.cfg.lora_n_timestamp_samples
        b = latents.shape[0]
        x0 = latents.detach().float().repeat(n, 1, 1, 1)
        t = self.draw_timesteps(0, self.num_timesteps - 1, b * n)  # U{0..T-1}
        noise = self.draw_noise(x0.shape).to(x0.device)
        drop_camera = bool(torch.rand((), generator=self.generator) < self.cfg.lora_camera_dropout)
        t = t.to(self.device)
        a_bar = self.alphas_cumprod_lora.to(self.device)[t].float().view(-1, 1, 1, 1)
        z_t = add_noise(x0, noise, a_bar)
        camera = self._camera(cameras)
        if drop_camera:
            camera = torch.zeros_like(camera)
        text = self.text.encode([prompt]).expand(b * n, -1, -1)  # view-independent, conditional only

        with self.placement.active(self.unet_lora), torch.enable_grad():
            pred = self.unet_lora(
                z_t.to(self.dtype), t, encoder_hidden_states=text, class_labels=camera.repeat(n, 1)
            ).sample.float()
            if self.lora_v_prediction and not self.cfg.lora_epsilon_objective:
                target = v_target(x0, noise, a_bar)
            else:
                target = noise
                if self.lora_v_prediction:
                    pred = v_to_eps(pred, z_t, a_bar)
            loss = F.mse_loss(pred, target)
            self.optimizer.zero_grad(set_to_none=True)
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.step(self.optimizer)  # skipped (and the scale lowered) on inf/NaN gradients
            self.grad_scaler.update()
        return {
            "lora_loss": float(loss.detach()),
            "lora_t": float(t.float().mean()),
            "lora_camera_dropped": float(drop_camera),
        }

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """LoRA weights, camera embedding, optimiser and loss-scaler state, generator state (exact resume)."""
        return {
            "lora": {name: p.detach().cpu().clone() for name, p in self.lora_params.items()},
            "camera_embedding": {
                k: v.detach().cpu().clone() for k, v in self.camera_embedding.state_dict().items()
            },
            # A snapshot: optimizer.state_dict() holds references to tensors that later steps update in place.
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "grad_scaler": self.grad_scaler.state_dict(),
            **super().state_dict(),  # the generator
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.lora_params) ^ set(state["lora"])
        if missing:
            raise ValueError(
                f"LoRA state does not match this model's LoRA parameters: {sorted(missing)[:5]} ..."
            )
        with torch.no_grad():
            for name, p in self.lora_params.items():
                p.copy_(state["lora"][name])
        self.camera_embedding.load_state_dict(state["camera_embedding"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("grad_scaler"):  # empty when saved with scaling off (fp32/bf16 weights)
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        super().load_state_dict(state)
