"""The real priors' configs, importable without torch, diffusers, transformers or peft.

Hydra's schema (fourdfy/config.py) needs these dataclasses at import time, while the priors that use them
(mvdream.py, sd_vsd.py, zeroscope.py, videocrafter2.py) pull in the model libraries (~12 s of CPU): keeping the
configs here lets `import fourdfy.config` stay light. Import them from here (the guidance modules do not
re-export them). Where a field comment says "see module docstring", it means the docstring of the guidance
module that uses the config.

Each config's `validate(key)` checks the values that need no weights and raises a ValueError naming the key
(`guidance.<name>.<field>`) and the fix; the priors' constructors call it. Field comments cite the authors'
code (github.com/sherwinbahmani/4dfy: configs/fourdfy_stage_{1,2,3}.yaml and
threestudio/models/guidance/*.py), whose keys are the `system.` ones named there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fourdfy.clock import Moment, StageSchedule, StageSteps
from fourdfy.enums import StrChoice

# Default models: the authors' configs/fourdfy_stage_{1,2,3}.yaml (keys under `system.`).
MVDREAM_REPO = "MVDream/MVDream"  # MVDream's model_zoo: hf_hub_download(repo_id="MVDream/MVDream", ...)
MVDREAM_FILE = "sd-v2.1-base-4view.pt"  # guidance_multi_view.model_name: "sd-v2.1-base-4view"
SD21_BASE = "stabilityai/stable-diffusion-2-1-base"  # guidance.pretrained_model_name_or_path (ε-prediction)
SD21 = "stabilityai/stable-diffusion-2-1"  # guidance.pretrained_model_name_or_path_lora (v-prediction)
ZEROSCOPE = "cerspense/zeroscope_v2_576w"  # guidance_video.pretrained_model_name_or_path
# configs/fourdfy_stage_3_vc.yaml prompt_processor_video.pretrained_model_name_or_path (file model.ckpt).
VIDEOCRAFTER2 = "VideoCrafter/VideoCrafter2"
VIDEOCRAFTER2_FILE = "model.ckpt"
# configs/fourdfy_stage_3_vc.yaml, system.prompt_processor_video.negative_prompt (verbatim).
VIDEOCRAFTER2_NEGATIVE_PROMPT = "low motion, static statue, not moving, no motion"

# 4D-fy configs/fourdfy_stage_*.yaml, system.prompt_processor_multi_view.negative_prompt (verbatim).
MVDREAM_NEGATIVE_PROMPT = (
    "ugly, bad anatomy, blurry, pixelated obscure, unnatural colors, poor lighting, dull, and unclear, "
    "cropped, lowres, low quality, artifacts, duplicate, morbid, mutilated, poorly drawn face, deformed, "
    "dehydrated, bad proportions"
)


@dataclass
class ViewPromptConfig:
    """Azimuth/elevation thresholds that pick a view-dependent prompt (degrees)."""

    # |azimuth| < front_threshold -> front (PromptProcessor.Config.front_threshold; the 4D-fy configs set 30
    # for SD/MVDream; Zeroscope's processor keeps threestudio's default 45).
    front_threshold: float = 45.0
    # |azimuth| > 180 - back_threshold -> back (PromptProcessor.Config.back_threshold, same values).
    back_threshold: float = 45.0
    # elevation > overhead_threshold -> overhead (PromptProcessor.Config.overhead_threshold = 60).
    overhead_threshold: float = 60.0


class Precision(StrChoice):
    """Weights and activations of a frozen network."""

    fp32 = "fp32"  # float32 (the authors' trainer.precision: 32)
    fp16 = "fp16"  # float16 on CUDA (halves memory; CPU falls back to float32)


def _check_t_schedules(key: str, low: StageSchedule, high: StageSchedule) -> None:
    """t ranges as fractions of T: 0 <= min <= max < 1 at every breakpoint of every stage."""
    for stage in (1, 2, 3):
        steps = sorted({0, *low.breakpoints(stage), *high.breakpoints(stage)})
        for step in steps:
            m = Moment(0, stage, step)
            lo, hi = low.at(m), high.at(m)
            if not 0 <= lo <= hi < 1:
                raise ValueError(f"{key}.min_step_percent and {key}.max_step_percent need 0 <= min <= max < 1 at "
                                 f"every step; stage {stage} step {step} gives {lo}, {hi}")


@dataclass
class MVDreamConfig:
    """MVDream 3D-aware SDS (paper Eq. 3; the "3D" update of Algorithm 1); defaults are the authors'
    configs/fourdfy_stage_1.yaml `guidance_multi_view` and threestudio/models/guidance/
    multiview_diffusion_guidance.py."""

    # Hub repo id or local path (the .pt/.safetensors file or a folder holding `checkpoint_file`).
    # guidance_multi_view.ckpt_path (null = MVDream's model_zoo download from MVDream/MVDream).
    checkpoint: str = MVDREAM_REPO
    # File inside the hub repo / folder: model_name "sd-v2.1-base-4view" -> sd-v2.1-base-4view.pt.
    checkpoint_file: str = MVDREAM_FILE
    # Diffusers-layout model providing vae/, text_encoder/, tokenizer/ (SD 2.1-base; see module docstring).
    components_model: str = SD21_BASE
    # MultiViewUNet arguments; None = the official sd-v2.1-base-4view config (MVDream sd-v2-base.yaml).
    unet_config: dict[str, Any] | None = None
    # Allow arbitrary pickled objects when reading a .pt checkpoint (only for files you trust).
    trust_pickle: bool = False
    # Views per object: MultiviewDiffusionGuidance.Config.n_view = 4.
    n_views: int = 4
    # Side the renders are resized to before the VAE: Config.image_size = 256 (latent 32x32).
    image_size: int = 256
    # Render side per phase, per stage (fourdfy/clock.py StageSteps): data.multi_view.width/height [64, 256] in
    # configs/fourdfy_stage_{1,2}.yaml, [256, 256] in configs/fourdfy_stage_3.yaml.
    render_sizes: Any = field(default_factory=lambda: [[64, 256], [64, 256], [256, 256]])
    # Stage-local steps at which the next phase starts: data.multi_view.resolution_milestones [5000] (all stages).
    render_size_milestones: Any = field(default_factory=lambda: [5000])
    # Renders per 3D step per phase, per stage (groups of n_views, each its own random camera): data.multi_view.
    # batch_size [8, 4] in configs/fourdfy_stage_1.yaml, [4, 4] in stages 2 and 3.
    batch_sizes: Any = field(default_factory=lambda: [[8, 4], [4, 4], [4, 4]])
    # CFG scale, ε_u + s(ε_c − ε_u): guidance_multi_view.guidance_scale = 50.
    guidance_scale: float = 50.0
    # Unconditional prompt: prompt_processor_multi_view.negative_prompt.
    negative_prompt: str = MVDREAM_NEGATIVE_PROMPT
    # MultiviewDiffusionGuidance.Config.view_dependent_prompting = False (MVDream sees the camera instead).
    view_dependent_prompting: bool = False
    # Thresholds if view-dependent prompting is on: prompt_processor_multi_view.front/back_threshold = 30.
    view_prompts: ViewPromptConfig = field(default_factory=lambda: ViewPromptConfig(30.0, 30.0))
    # t_min / 1000 per stage (StageSchedule): guidance_multi_view.min_step_percent [0, 0.98, 0.02, 8000] in
    # configs/fourdfy_stage_1.yaml, [0, 0.02, 0.02, 8000] (= 0.02) in stages 2 and 3.
    min_step_percent: Any = field(default_factory=lambda: [[0, 0.98, 0.02, 8000], 0.02, 0.02])
    # t_max / 1000: max_step_percent [0, 0.98, 0.50, 8000] in stage 1, [0, 0.50, 0.50, 8000] (= 0.5) in 2 and 3.
    max_step_percent: Any = field(default_factory=lambda: [[0, 0.98, 0.5, 8000], 0.5, 0.5])
    # x̂0-reconstruction loss (guidance_multi_view.recon_loss = true); False = plain SDS with w = 1 − ᾱ
    # (paper Eq. 3).
    recon_loss: bool = True
    # Blend of the std-rescaled x̂0 (guidance_multi_view.recon_std_rescale = 0.5); 0 disables the rescale.
    recon_std_rescale: float = 0.5
    # Latents = VAE posterior sample (authors' get_first_stage_encoding); False = posterior mean.
    sample_posterior: bool = True
    # Loss multiplier: system.loss.lambda_sds = 1.
    loss_weight: float = 1.0
    # Keep the UNet on the CPU between calls (memory option; the VAE stays on the device).
    offload: bool = False
    # Recompute VAE-encoder activations in backward (memory option).
    vae_gradient_checkpointing: bool = False
    # UNet, VAE and text encoder precision: fp32 as the authors (trainer.precision: 32 in all stage files);
    # fp16 halves their memory, at a rounding error in ε_c − ε_u that CFG 50 multiplies (bench/mvdream_precision.py).
    precision: Precision = Precision.fp32

    def render_size_schedule(self, key: str = "guidance.mvdream") -> StageSteps:
        return StageSteps.parse(self.render_sizes, self.render_size_milestones, f"{key}.render_sizes",
                                f"{key}.render_size_milestones")

    def batch_size_schedule(self, key: str = "guidance.mvdream") -> StageSteps:
        return StageSteps.parse(self.batch_sizes, self.render_size_milestones, f"{key}.batch_sizes",
                                f"{key}.render_size_milestones")

    def t_schedules(self, key: str = "guidance.mvdream") -> tuple[StageSchedule, StageSchedule]:
        return (StageSchedule.parse(self.min_step_percent, f"{key}.min_step_percent"),
                StageSchedule.parse(self.max_step_percent, f"{key}.max_step_percent"))

    def validate(self, key: str = "guidance.mvdream") -> None:
        """Raise ValueError naming `<key>.<field>` and the fix for values no MVDream prior can use."""
        if self.n_views < 1:
            raise ValueError(f"{key}.n_views must be >= 1 (views per object; the authors use 4), got {self.n_views}")
        if not 0.0 <= self.recon_std_rescale <= 1.0:
            raise ValueError(
                f"{key}.recon_std_rescale must be in [0, 1] (0 disables the rescale; the authors use 0.5), "
                f"got {self.recon_std_rescale}"
            )
        self.render_size_schedule(key)
        batches = self.batch_size_schedule(key).all_values()
        if any(not isinstance(b, int) or b < 1 or b % self.n_views for b in batches):
            raise ValueError(f"{key}.batch_sizes must be positive multiples of {key}.n_views={self.n_views} (groups "
                             f"of views), got {self.batch_sizes}")
        _check_t_schedules(key, *self.t_schedules(key))


@dataclass
class SDVSDConfig:
    """VSD with SD 2.1 (paper Eqs. 4-5; the "IMG" update of Algorithm 1); defaults are the authors'
    configs/fourdfy_stage_{1,2,3}.yaml `guidance` and threestudio/models/guidance/
    stable_diffusion_vsd_guidance.py."""

    # Pretrained (ε) branch, also the VAE, text encoder and tokenizer: guidance.pretrained_model_name_or_path.
    pretrained_model: str = SD21_BASE
    # Model the LoRA is added to: guidance.pretrained_model_name_or_path_lora (SD 2.1, v-prediction).
    lora_pretrained_model: str = SD21
    # Render side: data.single_view.width/height = 256 (paper §4 "rendering a 256×256 image").
    render_size: int = 256
    # Side the render is bilinearly upsampled to before the VAE (SD's native 512²; get_latents).
    image_size: int = 512
    # CFG of the pretrained branch, ε_u + s(ε_c − ε_u): guidance.guidance_scale = 7.5.
    guidance_scale: float = 7.5
    # CFG of the LoRA branch (zero-camera uncond half): StableDiffusionVSDGuidance.Config.guidance_scale_lora.
    guidance_scale_lora: float = 1.0
    # Unconditional prompt: the stage configs' prompt_processor sets none -> PromptProcessor default "".
    negative_prompt: str = ""
    # View-dependent prompts on the pretrained branch: Config.view_dependent_prompting = True.
    view_dependent_prompting: bool = True
    # prompt_processor.front_threshold / back_threshold = 30 (degrees).
    view_prompts: ViewPromptConfig = field(default_factory=lambda: ViewPromptConfig(30.0, 30.0))
    # t range / 1000 per stage (StageSchedule): guidance.min_step_percent 0.02 in all stage files;
    # max_step_percent 0.5 in stage 1 (no VSD there), 0.98 in stage 2 until anneal_start_step 5000 and
    # max_step_percent_annealed 0.5 after (stable_diffusion_vsd_guidance.py update_step: `global_step >
    # anneal_start_step`, so 0.5 from stage-local step 5001), and 0.5 in stage 3.
    min_step_percent: Any = 0.02
    max_step_percent: Any = field(default_factory=lambda: [0.5, [5000, 0.98, 0.5, 5001], 0.5])
    # LoRA rank: diffusers LoRAAttnProcessor default rank 4 (alpha = rank, i.e. scale 1).
    lora_rank: int = 4
    # LoRA + camera-embedding optimiser: system.optimizer AdamW, params.guidance.lr 1e-4, betas (0.9, 0.99),
    # eps 1e-15; weight decay = torch AdamW default 0.01 (the configs set none).
    lora_lr: float = 1e-4
    lora_betas: tuple[float, float] = (0.9, 0.99)
    lora_eps: float = 1e-15
    lora_weight_decay: float = 0.01
    # Probability of a zero camera in a fine-tuning step: lora_cfg_training, `random.random() < 0.1`.
    lora_camera_dropout: float = 0.1
    # Noise levels per image per fine-tuning step: Config.lora_n_timestamp_samples = 1.
    lora_n_timestamp_samples: int = 1
    # False: the LoRA model's own target (v for SD 2.1, authors' train_lora); True: paper Eq. 5's
    # ‖ε′ − ε‖² with ε′ converted from the v-prediction.
    lora_epsilon_objective: bool = False
    # Latents = VAE posterior sample (authors' encode_images); False = posterior mean.
    sample_posterior: bool = True
    # Loss multiplier: system.loss.lambda_vsd = 1.
    loss_weight: float = 1.0
    # Keep the UNets on the CPU between calls (memory option; the VAE stays on the device).
    offload: bool = False
    # Recompute VAE-encoder activations in backward (memory option).
    vae_gradient_checkpointing: bool = False
    # False: the LoRA and its camera embedding never train, as in the authors' first public commit (5c6e0cc:
    # the LoRA optimiser group pointed at MVDream; fixed in 7e09c67, Dec 2023). Table 2 may predate the fix:
    # `guidance.sd_vsd.train_lora=false` reproduces that era (the "paper_era" switch, README).
    train_lora: bool = True

    def t_schedules(self, key: str = "guidance.sd_vsd") -> tuple[StageSchedule, StageSchedule]:
        return (StageSchedule.parse(self.min_step_percent, f"{key}.min_step_percent"),
                StageSchedule.parse(self.max_step_percent, f"{key}.max_step_percent"))

    def validate(self, key: str = "guidance.sd_vsd") -> None:
        """Raise ValueError naming `<key>.<field>` and the fix for values no SD VSD prior can use."""
        _check_t_schedules(key, *self.t_schedules(key))


@dataclass
class ZeroscopeConfig:
    """Zeroscope video SDS (paper Eq. 6; the "VID" update of Algorithm 1); defaults are the authors'
    configs/fourdfy_stage_3.yaml `guidance_video` and threestudio/models/guidance/zeroscope_guidance.py."""

    # Hub repo id or local diffusers-layout folder: guidance_video.pretrained_model_name_or_path.
    pretrained_model: str = ZEROSCOPE
    # Frames per video step: data.single_view.num_frames = 16.
    n_frames: int = 16
    # Render size of each frame: data.single_view.height_vid = 160, width_vid = 288 (paper §4).
    render_height: int = 160
    render_width: int = 288
    # Size each frame is bilinearly upsampled to before the VAE: Zeroscope's native 320×576 (latent 40×72).
    image_height: int = 320
    image_width: int = 576
    # CFG, written ε_c + s(ε_c − ε_u): guidance_video.guidance_scale = 100.
    guidance_scale: float = 100.0
    # Unconditional prompt: the Zeroscope prompt processor's default "".
    negative_prompt: str = ""
    # ZeroscopeGuidance.Config.view_dependent_prompting = True.
    view_dependent_prompting: bool = True
    # Zeroscope's prompt processor keeps threestudio's default thresholds, 45° (PromptProcessor.Config).
    view_prompts: ViewPromptConfig = field(default_factory=lambda: ViewPromptConfig(45.0, 45.0))
    # t range / 1000: ZeroscopeGuidance.Config min_step_percent 0.02, max_step_percent 0.98 (no annealing).
    min_step_percent: float = 0.02
    max_step_percent: float = 0.98
    # Loss multiplier λ_video: system.loss.lambda_sds_video = 0.1.
    loss_weight: float = 0.1
    # Frames whose VAE encoding keeps its graph (chosen at random per call); None = all (authors).
    vae_grad_frames: int | None = None
    # Latents = VAE posterior sample (authors' encode_images); False = posterior mean.
    sample_posterior: bool = True
    # Keep the UNet on the CPU between calls (memory option; the VAE stays on the device).
    offload: bool = False
    # Recompute VAE-encoder activations in backward (memory option).
    vae_gradient_checkpointing: bool = False

    def validate(self, key: str = "guidance.zeroscope") -> None:
        """Raise ValueError naming `<key>.<field>` and the fix for values no Zeroscope prior can use."""
        _check_frames(key, self.n_frames, self.vae_grad_frames)
        _check_step_percents(key, self.min_step_percent, self.max_step_percent)


class VideoPrior(StrChoice):
    """The video prior of the VID update: the paper's Zeroscope, or VideoCrafter2 (the authors' *_vc configs)."""

    zeroscope = "zeroscope"  # configs/fourdfy_stage_3.yaml guidance_type_video "zeroscope-guidance"
    videocrafter2 = "videocrafter2"  # configs/fourdfy_stage_3_vc.yaml guidance_type_video "videocrafter-guidance"


@dataclass
class VideoCrafter2Config:
    """VideoCrafter2 video SDS with motion amplification; defaults are the authors' configs/fourdfy_stage_3_vc.yaml
    `guidance_video` / `prompt_processor_video` and threestudio/models/guidance/videocrafter_guidance.py."""

    # Hub repo id, a local model.ckpt or a folder holding `checkpoint_file`:
    # prompt_processor_video.pretrained_model_name_or_path (funcs.py load_model_checkpoint downloads model.ckpt).
    checkpoint: str = VIDEOCRAFTER2
    checkpoint_file: str = VIDEOCRAFTER2_FILE
    # Allow arbitrary pickled objects when reading the .ckpt (only for files you trust).
    trust_pickle: bool = False
    # Part configs; None = the released ones (videocrafter/configs/inference_t2v_512_v2.0.yaml; see
    # fourdfy/guidance/videocrafter_weights.py). Tests pass tiny ones.
    unet_config: dict[str, Any] | None = None
    vae_config: dict[str, Any] | None = None
    text_config: dict[str, Any] | None = None
    # Frames per video step: data.single_view.num_frames = 16 (apply_model(..., temporal_length=16)).
    n_frames: int = 16
    # Render size of each frame: data.single_view.height_vid = 80, width_vid = 128.
    render_height: int = 80
    render_width: int = 128
    # Size each frame is bilinearly resized to before the VAE: VideoCrafterGuidance.__call__ (320, 512)
    # (latents 40 × 64, the yaml's image_size).
    image_height: int = 320
    image_width: int = 512
    # Frame-rate conditioning of the UNet: guidance_video.fps = 8 (the class default is 28).
    fps: int = 8
    # CFG, written ε_c + s(ε_c − ε_u): guidance_video.guidance_scale = 100.
    guidance_scale: float = 100.0
    # Unconditional prompt: prompt_processor_video.negative_prompt.
    negative_prompt: str = VIDEOCRAFTER2_NEGATIVE_PROMPT
    # VideoCrafterGuidance.Config.view_dependent_prompting = True.
    view_dependent_prompting: bool = True
    # prompt_processor_video sets no thresholds: threestudio's PromptProcessor defaults, 45° (overhead 60°).
    view_prompts: ViewPromptConfig = field(default_factory=lambda: ViewPromptConfig(45.0, 45.0))
    # t range / 1000 on the stage-local step (StageSchedule; the video prior runs in stage 3 only):
    # guidance_video.min_step_percent [0, 0.02, 0.02, 5000], max_step_percent [0, 0.98, 0.5, 5000].
    min_step_percent: Any = field(default_factory=lambda: [0, 0.02, 0.02, 5000])
    max_step_percent: Any = field(default_factory=lambda: [0, 0.98, 0.5, 5000])
    # Score s = ε̂ − ε replaced by mean_T(s) + k·(s − mean_T(s)): guidance_video.motion_amp_scale = 30 (1 = off).
    motion_amp_scale: float = 30.0
    # Frames whose VAE encoding keeps its graph, chosen at random per call: guidance_video.low_ram_vae = 2
    # (None = every frame, the authors' -1; configs/fourdfy_stage_3_low_vram_vc.yaml leaves it unset).
    vae_grad_frames: int | None = 2
    # Latents = VAE posterior sample × 0.18215 (encode_first_stage: .sample(None) * scale_factor).
    sample_posterior: bool = True
    # fp16 weights (CUDA only): guidance_video.half_precision_weights = false, i.e. fp32 weights.
    half_precision_weights: bool = False
    # Loss multiplier λ_video: system.loss.lambda_sds_video = 0.1.
    loss_weight: float = 0.1
    # Keep the UNet on the CPU between calls (memory option; the VAE stays on the device).
    offload: bool = False
    # Recompute VAE-encoder activations in backward (memory option).
    vae_gradient_checkpointing: bool = False

    def validate(self, key: str = "guidance.videocrafter2") -> None:
        """Raise ValueError naming `<key>.<field>` and the fix for values no VideoCrafter2 prior can use."""
        _check_frames(key, self.n_frames, self.vae_grad_frames)
        for name in ("render_height", "render_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{key}.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("image_height", "image_width"):
            if getattr(self, name) < 8 or getattr(self, name) % 8:
                raise ValueError(
                    f"{key}.{name} must be a positive multiple of 8 (the VAE downsamples by 8; the authors use "
                    f"320 x 512), got {getattr(self, name)}"
                )
        if self.fps < 1:
            raise ValueError(f"{key}.fps must be >= 1 (frame-rate conditioning; the authors use 8), got {self.fps}")
        if self.motion_amp_scale < 0:
            raise ValueError(
                f"{key}.motion_amp_scale must be >= 0 (1 = no amplification; the authors use 30), "
                f"got {self.motion_amp_scale}"
            )
        _check_t_schedules(key, *self.t_schedules(key))

    def t_schedules(self, key: str = "guidance.videocrafter2") -> tuple[StageSchedule, StageSchedule]:
        return (StageSchedule.parse(self.min_step_percent, f"{key}.min_step_percent"),
                StageSchedule.parse(self.max_step_percent, f"{key}.max_step_percent"))


def _check_frames(key: str, n_frames: int, vae_grad_frames: int | None) -> None:
    """A video prior's frames: n_frames >= 1, vae_grad_frames null or in [1, n_frames]."""
    if n_frames < 1:
        raise ValueError(f"{key}.n_frames must be >= 1 (frames per video; the authors use 16), got {n_frames}")
    if vae_grad_frames is not None and not 1 <= vae_grad_frames <= n_frames:
        raise ValueError(
            f"{key}.vae_grad_frames must be null (every frame) or in [1, n_frames={n_frames}], got {vae_grad_frames}"
        )


def _check_step_percents(key: str, low: float, high: float) -> None:
    """A fixed t range [low·T, high·T] needs 0 <= low <= high < 1."""
    if not 0 <= low <= high < 1:
        raise ValueError(
            f"{key}.min_step_percent and {key}.max_step_percent need 0 <= min <= max < 1, got {low}, {high}"
        )
