"""Closed-form "diffusion models" over the toy world: the CPU stand-ins for MVDream, SD 2.1 and Zeroscope.

The ideal denoiser of a finite data set {x_i} under z = √ᾱ x0 + √(1−ᾱ) ε is the posterior mean

    x̂0(z) = Σ_i softmax_i( −‖z − √ᾱ x_i‖² / 2(1−ᾱ) + log k_i ) x_i,   ε̂ = (z − √ᾱ x̂0) / √(1−ᾱ),

where k_i is an optional conditioning kernel (camera, clip time). Classifier-free guidance mixes the
prompt's data (conditional) with every toy prompt's data (unconditional). The three priors copy the
real trade-off of the paper's Table 1:

- :class:`ToyMultiViewPrior` (MVDream's role): camera-conditioned, 4 views, correct 3D, blurred data.
- :class:`ToyImagePrior` (SD 2.1 + VSD): no camera conditioning, sharp data (alone it can collapse
  views to one face); VSD's fine-tuned branch ε′ is the same closed form over a buffer of recent
  renders near the camera, and its fine-tuning step adds renders to that buffer.
- :class:`ToyVideoPrior` (Zeroscope): 16-frame clips of the moving scene, low resolution, blurred,
  colour-shifted, weakly camera-conditioned.

All three implement :class:`fourdfy.guidance.base.Guidance`, so the trainer cannot tell them from the
real priors. Images live in pixel space scaled to [-1, 1]; there is no VAE.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fourdfy.atomic import atomic_path
from fourdfy.clock import Moment
from fourdfy.enums import StrChoice
from fourdfy.guidance.base import GuidanceOut, sds_loss
from fourdfy.guidance.noise import scaled_linear_alphas_cumprod
from fourdfy.kinds import UpdateKind
from fourdfy.render.cameras import Cameras, cameras_from_spherical
from fourdfy.render.trajectories import EVAL_CAMERA, orbit_cameras
from fourdfy.render.views import WHITE, render_views
from fourdfy.render.volume import Renderer, RendererConfig
from fourdfy.synthetic.scenes import SCENES, ToyScene, get_scene

# ----------------------------------------------------------------------------------------------
# The closed form


def ideal_denoiser(
    z: torch.Tensor, alpha_bar: float, data: torch.Tensor, log_prior: torch.Tensor | None = None
) -> torch.Tensor:
    """Posterior mean x̂0 of a finite data set.

    z: [B, D] noisy samples; data: [M, D]; log_prior: [B, M] or None (log of a conditioning kernel).
    Returns x̂0: [B, D].
    The logits are written as (2√ᾱ z·x_i − ᾱ‖x_i‖²) / 2(1−ᾱ) (the ‖z‖² term cancels in the softmax) and
    normalised with log-sum-exp: a plain exp overflows in float32 for t ≲ 700.
    """
    if z.ndim != 2 or data.ndim != 2 or z.shape[1] != data.shape[1]:
        raise ValueError(f"z [B,D] and data [M,D] must agree in D, got {tuple(z.shape)} and {tuple(data.shape)}")
    if data.shape[0] == 0:
        raise ValueError("data set is empty")
    sqrt_ab = math.sqrt(alpha_bar)
    logits = (2.0 * sqrt_ab * z @ data.T - alpha_bar * (data * data).sum(-1)[None]) / (2.0 * (1.0 - alpha_bar))
    if log_prior is not None:
        logits = logits + log_prior
    return torch.softmax(logits, dim=-1) @ data


def eps_from_x0(z: torch.Tensor, x0: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """ε̂ = (z − √ᾱ x̂0) / √(1−ᾱ)."""
    return (z - math.sqrt(alpha_bar) * x0) / math.sqrt(1.0 - alpha_bar)


def camera_log_kernel(query_dirs: torch.Tensor, data_dirs: torch.Tensor, tau_deg: float) -> torch.Tensor:
    """log k = −angle² / 2τ² between camera directions. query: [B,3], data: [M,3] (unit) -> [B, M]."""
    cos = (query_dirs @ data_dirs.T).clamp(-1.0, 1.0)
    angle = torch.rad2deg(torch.arccos(cos))
    return -(angle**2) / (2.0 * tau_deg**2)


def camera_directions(cameras: Cameras) -> torch.Tensor:
    """Unit vectors from the origin to each camera centre: [B, 3]."""
    centre = cameras.c2w[:, :3, 3]
    return centre / centre.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ToyDataConfig:
    """How the priors' data sets are rendered from the analytic scenes."""

    elevations_deg: list[float] = field(default_factory=lambda: [0.0, 10.0, 20.0, 30.0])  # data camera rings
    azimuth_step_deg: float = 5.0  # spacing of data cameras in azimuth
    # Data camera distance and field of view: the evaluation camera's, so the ground truth is seen as the data
    # were; training cameras must use the same (demo_cpu: cameras.distance_range [3, 3], fovy_range [40, 40]).
    distance: float = EVAL_CAMERA.distance
    fovy_deg: float = EVAL_CAMERA.fovy_deg
    n_samples: int = 96  # samples per ray for the ground-truth renders
    render_radius: float = 1.0  # bounding-sphere radius of the toy scenes
    # Scene times the 3D and image priors' data show. [0.0]: a still of the first frame (render their steps
    # at t = 0, trainer.static_prior_time); several times: any frame of the motion is a plausible image, as
    # for the real SD/MVDream, which know nothing of time (their steps may then render any frame time).
    image_times: list[float] = field(default_factory=lambda: [0.0])


class ToyWeighting(StrChoice):
    """How a toy prior weights its score by the timestep."""

    recon = "recon"  # x̂0 target: w(t) = √((1−ᾱ)/ᾱ) (a reconstruction loss on the denoised image)
    sds = "sds"  # w(t) = 1 − ᾱ, as the real priors' SDS (our Zeroscope and SD guidance)


@dataclass
class ToyMultiViewConfig:
    """3D-aware prior (MVDream's role)."""

    size: int = 32  # render height = width
    n_views: int = 4  # views per step, 90° apart (as MVDream)
    blur_sigma_px: float = 1.0  # blur of the data: sets the appearance ceiling of 3D-only training
    camera_tau_deg: float = 4.0  # camera kernel width: must dominate or the object comes out rotated
    guidance_scale: float = 1.0  # CFG scale (the ideal conditional needs little)
    t_min: float = 0.02  # timestep range as a fraction of 1000
    t_max: float = 0.98
    weighting: ToyWeighting = ToyWeighting.recon  # recon (x̂0 target, w = √((1−ᾱ)/ᾱ)) or sds (w = 1−ᾱ)


@dataclass
class ToyImageConfig:
    """Image prior with VSD (Stable Diffusion 2.1's role)."""

    size: int = 32
    blur_sigma_px: float = 0.0  # sharp data: the image prior's advantage
    guidance_scale: float = 1.0
    # The real VSD's range late in training (authors' stage-2 guidance: min_step_percent 0.02, max_step_percent
    # 0.98 annealed to max_step_percent_annealed 0.5).
    t_min: float = 0.02
    t_max: float = 0.5
    weighting: ToyWeighting = ToyWeighting.recon  # recon or sds (see ToyWeighting)
    use_vsd: bool = True  # False: plain SDS (ε′ = ε)
    lora_camera_tau_deg: float = 10.0  # ε′'s camera kernel over the buffer
    buffer_size: int = 64  # renders kept by the "LoRA"


@dataclass
class ToyVideoConfig:
    """Video prior (Zeroscope's role)."""

    size: int = 16  # lower resolution than the image priors
    n_frames: int = 16  # frames per clip, 1/16 apart in time (authors' data.single_view.num_frames: 16)
    blur_sigma_px: float = 0.5
    color_gain: list[float] = field(default_factory=lambda: [1.0, 0.92, 0.85])  # colour shift of the data
    camera_tau_deg: float | None = 25.0  # weak in 3D: a wide camera kernel; None: no camera input (as Zeroscope)
    clip_azimuth_step_deg: float = 30.0  # spacing of the clip cameras around the full ring
    clip_azimuths_deg: list[float] | None = None  # None: the full ring; a list: only these azimuths (front-biased data)
    clip_elevations_deg: list[float] = field(default_factory=lambda: [5.0, 25.0])
    clip_starts: list[float] = field(default_factory=lambda: [0.0, 1.0 / 32.0])  # t0 of the data clips
    time_tau: float = 1.0 / 64.0  # kernel width on clip start time
    guidance_scale: float = 1.0
    t_min: float = 0.02
    t_max: float = 0.98
    weighting: ToyWeighting = ToyWeighting.recon  # recon or sds (see ToyWeighting)
    loss_weight: float = 1.0  # λ_video (0.1 with the real Zeroscope)


@dataclass
class SyntheticPriorsConfig:
    """The toy world's three priors."""

    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    multiview: ToyMultiViewConfig = field(default_factory=ToyMultiViewConfig)
    image: ToyImageConfig = field(default_factory=ToyImageConfig)
    video: ToyVideoConfig = field(default_factory=ToyVideoConfig)

    def validate(self) -> None:
        """Raise ValueError naming the key (guidance.synthetic.<prior>.<field>) for a value out of range."""
        for name, prior in (("multiview", self.multiview), ("image", self.image), ("video", self.video)):
            if not 0.0 <= prior.t_min <= prior.t_max <= 1.0:
                raise ValueError(f"guidance.synthetic.{name} needs 0 <= t_min <= t_max <= 1, "
                                 f"got t_min={prior.t_min}, t_max={prior.t_max}")
        if self.multiview.size != self.image.size:
            raise ValueError("guidance.synthetic.multiview.size and guidance.synthetic.image.size must be equal "
                             f"(they share one data render), got {self.multiview.size} and {self.image.size}")


# ----------------------------------------------------------------------------------------------
# Data

# Bump when the scenes or the renderer change what the data sets contain (invalidates the cache).
DATA_VERSION = 1


def _cached(kind: str, key: dict[str, Any], make) -> Any:
    """Rendered data sets are cached on disk (FOURDFY_CACHE, default ~/.cache/fourdfy): every job of a
    sweep renders the same toy data, which costs more than a short run. Written atomically."""
    root = Path(os.environ.get("FOURDFY_CACHE", Path.home() / ".cache" / "fourdfy"))
    digest = hashlib.sha256(json.dumps({"v": DATA_VERSION, **key}, sort_keys=True, default=str).encode())
    path = root / f"toy_{kind}_{digest.hexdigest()[:16]}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    value = make()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(value, tmp)
    except OSError:  # a read-only home is no reason to fail a run
        pass
    return value


def _to_signed(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3] in [0,1] -> [-1,1]."""
    return rgb * 2.0 - 1.0


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """images: [M,H,W,3] -> blurred [M,H,W,3]."""
    if sigma <= 0:
        return images
    # Imported here: torchvision's import costs seconds, and only data rendering needs it.
    from torchvision.transforms.functional import gaussian_blur

    radius = max(1, math.ceil(3 * sigma))
    chw = images.permute(0, 3, 1, 2)
    return gaussian_blur(chw, [2 * radius + 1] * 2, [sigma, sigma]).permute(0, 2, 3, 1)


def render_scene(
    scene: ToyScene, cameras: Cameras, times: torch.Tensor, size: int, cfg: ToyDataConfig, chunk: int = 64
) -> dict[str, torch.Tensor]:
    """Ground truth of an analytic scene on white (cfg.n_samples per ray through cfg.render_radius):
    rgb [B,size,size,3], depth and opacity [B,size,size] (see :func:`fourdfy.render.views.render_views`)."""
    renderer = Renderer(RendererConfig(n_samples=cfg.n_samples, radius=cfg.render_radius))
    return render_views(scene, renderer, cameras, times, size, WHITE, chunk)


def _ring_cameras(elevations: list[float], azimuth_step: float, cfg: ToyDataConfig) -> Cameras:
    n_az = round(360.0 / azimuth_step)
    rings = [orbit_cameras(n_az, elevation=e, distance=cfg.distance, fovy_deg=cfg.fovy_deg) for e in elevations]
    return Cameras.cat(rings)


@dataclass
class ImageBank:
    """Images of every toy prompt from a ring of cameras at each of data.image_times (flattened, in [-1,1])."""

    images: dict[str, torch.Tensor]  # prompt -> [M, H·W·3]
    directions: torch.Tensor  # [M, 3] camera directions (shared by all prompts)

    def __post_init__(self) -> None:
        # The unconditional branch's data, concatenated once rather than at every step.
        self.all_images = torch.cat(list(self.images.values()))  # [P·M, H·W·3]
        self.all_directions = self.directions.repeat(len(self.images), 1)  # [P·M, 3]


def build_image_banks(size: int, cfg: ToyDataConfig, blur_sigmas: list[float]) -> list[ImageBank]:
    """Render every scene once from every ring camera at every cfg.image_times and return one bank per blur
    level (entries camera-major within each time: index = time_index · n_cameras + camera_index)."""
    if not cfg.image_times or any(not 0.0 <= t <= 1.0 for t in cfg.image_times):
        raise ValueError(f"guidance.synthetic.data.image_times must be a non-empty list of times in [0, 1], "
                         f"got {cfg.image_times}")
    ring = _ring_cameras(cfg.elevations_deg, cfg.azimuth_step_deg, cfg)
    cams = Cameras.cat([ring] * len(cfg.image_times))
    times = torch.tensor(cfg.image_times, dtype=torch.float32).repeat_interleave(len(ring))
    sharp = _cached("images", {"size": size, "data": asdict(cfg)},
                    lambda: {s.prompt: render_scene(s, cams, times, size, cfg)["rgb"] for s in SCENES})
    dirs = camera_directions(cams)
    return [
        ImageBank({p: _to_signed(_blur(img, sigma)).reshape(len(cams), -1) for p, img in sharp.items()}, dirs)
        for sigma in blur_sigmas
    ]


# ----------------------------------------------------------------------------------------------
# Shared step


class _ClosedFormPrior:
    """Timestep sampling, CFG and the loss, shared by the three toy priors."""

    n_views: int
    native_size: tuple[int, int]
    is_video: bool = False

    def __init__(self, t_min: float, t_max: float, guidance_scale: float, weighting: ToyWeighting | str, seed: int):
        if not 0.0 <= t_min <= t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = t_min, t_max
        self.guidance_scale = guidance_scale
        self.weighting = ToyWeighting(weighting)
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        self.generator = torch.Generator().manual_seed(seed)

    def _check(self, renders: torch.Tensor) -> None:
        h, w = self.native_size
        if renders.ndim != 4 or renders.shape[1:] != (h, w, 3):
            raise ValueError(f"{type(self).__name__} needs renders [B,{h},{w},3], got {tuple(renders.shape)}")

    def _sample_t(self) -> int:
        lo, hi = int(self.t_min * 1000), int(self.t_max * 1000)
        return int(torch.randint(lo, hi + 1, (1,), generator=self.generator))

    def _step(
        self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, log_c: torch.Tensor | None,
        log_u: torch.Tensor | None, eps_prime_fn=None,
    ) -> GuidanceOut:
        """x: [B,D] in [-1,1] (differentiable). Returns the SDS (or VSD) loss on x."""
        t = self._sample_t()
        ab = float(self.alphas_cumprod[t])
        noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype)
        with torch.no_grad():
            z = math.sqrt(ab) * x.detach() + math.sqrt(1.0 - ab) * noise
            eps_c = eps_from_x0(z, ideal_denoiser(z, ab, cond, log_c), ab)
            if self.guidance_scale != 1.0:
                eps_u = eps_from_x0(z, ideal_denoiser(z, ab, uncond, log_u), ab)
                eps = eps_u + self.guidance_scale * (eps_c - eps_u)
            else:
                eps = eps_c
            eps_ref = noise if eps_prime_fn is None else eps_prime_fn(z, ab, noise)
            # recon: w = √((1−ᾱ)/ᾱ), so the gradient is (x̂0(ε_ref) − x̂0(ε̂)) in image units; sds: w = 1−ᾱ.
            w = math.sqrt((1.0 - ab) / ab) if self.weighting is ToyWeighting.recon else (1.0 - ab)
            grad = w * (eps - eps_ref)
        return GuidanceOut(sds_loss(x, grad), {"t": float(t), "grad_norm": float(grad.norm())})

    def render_size(self, step: Moment) -> tuple[int, int]:
        """(height, width) of the renders: native_size at every step."""
        return self.native_size

    def batch_size(self, step: Moment) -> int:
        """Renders per step: n_views at every step."""
        return self.n_views

    def reset_optimizer(self) -> None:
        """No optimiser (the toy VSD's buffer is its "LoRA weights", which a stage start keeps)."""

    def finetune_step(self, renders: torch.Tensor, prompt: str, cameras: Cameras, step: Moment,
                      latents: torch.Tensor | None = None) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class ToyMultiViewPrior(_ClosedFormPrior):
    """Camera-conditioned 4-view prior over blurred data: right 3D, soft appearance."""

    def __init__(self, cfg: ToyMultiViewConfig, bank: ImageBank, seed: int = 0):
        super().__init__(cfg.t_min, cfg.t_max, cfg.guidance_scale, cfg.weighting, seed)
        self.cfg, self.bank = cfg, bank
        self.n_views = cfg.n_views
        self.native_size = (cfg.size, cfg.size)

    def __call__(self, renders, prompt, cameras, times, step) -> GuidanceOut:
        self._check(renders)
        x = _to_signed(renders).reshape(len(renders), -1)
        dirs = camera_directions(cameras)
        log_c = camera_log_kernel(dirs, self.bank.directions, self.cfg.camera_tau_deg)
        log_u = camera_log_kernel(dirs, self.bank.all_directions, self.cfg.camera_tau_deg)
        return self._step(x, self.bank.images[prompt], self.bank.all_images, log_c, log_u)


class ToyImagePrior(_ClosedFormPrior):
    """Sharp, camera-agnostic prior with VSD's fine-tuned branch as a buffer of recent renders."""

    def __init__(self, cfg: ToyImageConfig, bank: ImageBank, seed: int = 0):
        super().__init__(cfg.t_min, cfg.t_max, cfg.guidance_scale, cfg.weighting, seed)
        self.cfg, self.bank = cfg, bank
        self.n_views = 1
        self.native_size = (cfg.size, cfg.size)
        self.buffer_images = torch.zeros(0, cfg.size * cfg.size * 3)
        self.buffer_dirs = torch.zeros(0, 3)

    def __call__(self, renders, prompt, cameras, times, step) -> GuidanceOut:
        self._check(renders)
        x = _to_signed(renders).reshape(len(renders), -1)
        eps_prime_fn = None
        if self.cfg.use_vsd and len(self.buffer_images):
            log_k = camera_log_kernel(camera_directions(cameras), self.buffer_dirs, self.cfg.lora_camera_tau_deg)

            def eps_prime_fn(z, ab, noise):
                return eps_from_x0(z, ideal_denoiser(z, ab, self.buffer_images, log_k), ab)

        return self._step(x, self.bank.images[prompt], self.bank.all_images, None, None, eps_prime_fn)

    def finetune_step(self, renders, prompt, cameras, step, latents=None) -> dict[str, float]:
        """VSD's LoRA step, in closed form: remember the render and its camera (FIFO of buffer_size)."""
        if not self.cfg.use_vsd:
            return {}
        flat = _to_signed(renders.detach()).reshape(len(renders), -1)
        self.buffer_images = torch.cat([self.buffer_images, flat])[-self.cfg.buffer_size :]
        self.buffer_dirs = torch.cat([self.buffer_dirs, camera_directions(cameras)])[-self.cfg.buffer_size :]
        return {"buffer": float(len(self.buffer_images))}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "buffer_images": self.buffer_images.clone(),
                "buffer_dirs": self.buffer_dirs.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.buffer_images = state["buffer_images"].clone()
        self.buffer_dirs = state["buffer_dirs"].clone()


class ToyVideoPrior(_ClosedFormPrior):
    """16-frame clips of the moving scene: motion, but low-res, blurred, colour-shifted, weak in 3D."""

    is_video = True

    def __init__(self, cfg: ToyVideoConfig, data_cfg: ToyDataConfig, seed: int = 0):
        super().__init__(cfg.t_min, cfg.t_max, cfg.guidance_scale, cfg.weighting, seed)
        self.cfg = cfg
        self.n_views = cfg.n_frames
        self.native_size = (cfg.size, cfg.size)
        cams = self._clip_cameras(data_cfg)
        dirs, starts = [], []
        for t0 in cfg.clip_starts:
            dirs.append(camera_directions(cams))
            starts.append(torch.full((len(cams),), t0))
        self.clip_dirs = torch.cat(dirs)  # [M, 3]
        self.clip_starts = torch.cat(starts)  # [M]
        # Only what changes the rendered clips: a sweep over kernels, timesteps or λ reuses the cache.
        rendering = ("size", "n_frames", "blur_sigma_px", "color_gain", "clip_azimuth_step_deg",
                     "clip_azimuths_deg", "clip_elevations_deg", "clip_starts")
        data = {k: v for k, v in asdict(data_cfg).items() if k != "image_times"}  # the image banks' times only
        key = {"video": {k: getattr(cfg, k) for k in rendering}, "data": data}
        self.clips = _cached("clips", key, lambda: self._render_clips(cams, data_cfg))
        # The unconditional branch's clips and their conditions, concatenated once.
        self.all_clips = torch.cat(list(self.clips.values()))
        self.all_clip_dirs = self.clip_dirs.repeat(len(self.clips), 1)
        self.all_clip_starts = self.clip_starts.repeat(len(self.clips))

    def _clip_cameras(self, data_cfg: ToyDataConfig) -> Cameras:
        """The clips' cameras: every clip elevation × the full ring, or × clip_azimuths_deg."""
        azimuths = self.cfg.clip_azimuths_deg
        if azimuths is None:
            return _ring_cameras(self.cfg.clip_elevations_deg, self.cfg.clip_azimuth_step_deg, data_cfg)
        if not azimuths:
            raise ValueError("guidance.synthetic.video.clip_azimuths_deg is empty: give azimuths or null (full ring)")
        az = torch.tensor(azimuths, dtype=torch.float64)
        return Cameras.cat([cameras_from_spherical(e, az, data_cfg.distance, data_cfg.fovy_deg)
                            for e in self.cfg.clip_elevations_deg])

    def _render_clips(self, cams: Cameras, data_cfg: ToyDataConfig) -> dict[str, torch.Tensor]:
        """Every scene × clip start × camera: a [M, F·H·W·3] clip bank per prompt, start-major."""
        cfg = self.cfg
        gain = torch.tensor(cfg.color_gain)
        frames = torch.arange(cfg.n_frames) / cfg.n_frames
        clips = {}
        for scene in SCENES:
            per_start = []
            for t0 in cfg.clip_starts:
                # every camera × every frame: [C·F] renders, grouped by camera
                cam_idx = torch.arange(len(cams)).repeat_interleave(cfg.n_frames)
                times = (t0 + frames).repeat(len(cams))
                rgb = render_scene(scene, cams[cam_idx], times, cfg.size, data_cfg)["rgb"]
                rgb = (_blur(rgb, cfg.blur_sigma_px) * gain).clamp(0.0, 1.0)
                per_start.append(_to_signed(rgb).reshape(len(cams), -1))
            clips[scene.prompt] = torch.cat(per_start)
        return clips

    def _log_kernel(
        self, cameras: Cameras, times: torch.Tensor, dirs: torch.Tensor, starts: torch.Tensor
    ) -> torch.Tensor:
        """log k over clips [1, M]: camera kernel of the (fixed) video camera + kernel on the clip start.
        Without camera_tau_deg the prior ignores the camera, as Zeroscope does: only the start time conditions."""
        dt = times[:1, None] - starts[None]
        log_k = -(dt**2) / (2.0 * self.cfg.time_tau**2)
        if self.cfg.camera_tau_deg is not None:
            log_k = log_k + camera_log_kernel(camera_directions(cameras[:1]), dirs, self.cfg.camera_tau_deg)
        return log_k

    def __call__(self, renders, prompt, cameras, times, step) -> GuidanceOut:
        self._check(renders)
        if len(renders) != self.cfg.n_frames:
            raise ValueError(f"video prior needs {self.cfg.n_frames} frames, got {len(renders)}")
        x = _to_signed(renders).reshape(1, -1)
        log_c = self._log_kernel(cameras, times, self.clip_dirs, self.clip_starts)
        log_u = self._log_kernel(cameras, times, self.all_clip_dirs, self.all_clip_starts)
        out = self._step(x, self.clips[prompt], self.all_clips, log_c, log_u)
        return GuidanceOut(self.cfg.loss_weight * out.loss, out.stats)


def build_synthetic_priors(
    cfg: SyntheticPriorsConfig, prompt: str, seed: int = 0
) -> dict[UpdateKind, _ClosedFormPrior]:
    """The three toy priors for a toy prompt, one per update kind. Renders the data sets once."""
    get_scene(prompt)  # unknown prompt -> error listing the known ones, before any rendering
    cfg.validate()
    blurred, sharp = build_image_banks(cfg.multiview.size, cfg.data,
                                       [cfg.multiview.blur_sigma_px, cfg.image.blur_sigma_px])
    return {
        UpdateKind.MULTIVIEW: ToyMultiViewPrior(cfg.multiview, blurred, seed=seed + 1),
        UpdateKind.IMAGE: ToyImagePrior(cfg.image, sharp, seed=seed + 2),
        UpdateKind.VIDEO: ToyVideoPrior(cfg.video, cfg.data, seed=seed + 3),
    }
