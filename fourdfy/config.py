"""Typed configuration of a run, registered in Hydra's ConfigStore.

Hydra fills these dataclasses from conf/ (presets, variants, prompt sets) and the command line; a
misspelt key fails at compose time because the schema is structured. Every default is the paper's
or the authors' number, with its source next to it; presets (conf/preset/) scale them down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fourdfy.enums import StrChoice
from fourdfy.errors import ConfigError, UserError, require_extra
from fourdfy.fields.field4d import FieldConfig
from fourdfy.guidance.configs import MVDreamConfig, SDVSDConfig, VideoCrafter2Config, VideoPrior, ZeroscopeConfig
from fourdfy.hybrid import ScheduleConfig
from fourdfy.render.cameras import CameraSamplingConfig
from fourdfy.render.volume import RendererConfig
from fourdfy.rundir import CONFIG_FILE
from fourdfy.synthetic.priors import SyntheticPriorsConfig
from fourdfy.tracking import LoggerConfig
from fourdfy.trainer import TrainerConfig


class GuidanceBackend(StrChoice):
    """Which priors drive the optimisation."""

    synthetic = "synthetic"  # the toy world's closed-form priors (fourdfy/synthetic/priors.py): CPU, ground truth
    real = "real"  # MVDream, Stable Diffusion 2.1 (VSD) and Zeroscope (fourdfy/guidance/)


class WeightsSource(StrChoice):
    """Where the real backend's networks get their weights (fourdfy/guidance/random_weights.py)."""

    pretrained = "pretrained"  # the published checkpoints (hub ids or local paths under guidance.*)
    random = "random"  # every network at full size, random weights, nothing downloaded: checks a GPU/cluster
    random_tiny = "random_tiny"  # tiny random networks (CPU-sized): the same pipeline in seconds, for tests


@dataclass
class GuidanceConfig:
    """Which priors drive the optimisation."""

    backend: GuidanceBackend = GuidanceBackend.synthetic  # synthetic (toy world, CPU) or real (MVDream, SD, Zeroscope)
    synthetic: SyntheticPriorsConfig = dc_field(default_factory=SyntheticPriorsConfig)
    mvdream: MVDreamConfig = dc_field(default_factory=MVDreamConfig)  # 3D prior (real backend)
    sd_vsd: SDVSDConfig = dc_field(default_factory=SDVSDConfig)  # image prior with VSD (real backend)
    zeroscope: ZeroscopeConfig = dc_field(default_factory=ZeroscopeConfig)  # video prior (real backend)
    # Which video prior the VID updates use (real backend): the paper's Zeroscope, or VideoCrafter2 with motion
    # amplification (the authors' newer recipe, configs/fourdfy_stage_3_vc.yaml).
    video_prior: VideoPrior = VideoPrior.zeroscope
    videocrafter2: VideoCrafter2Config = dc_field(default_factory=VideoCrafter2Config)  # when video_prior=videocrafter2
    # Real backend: pretrained weights, or random ones (full size or tiny) to test a machine before downloading.
    weights: WeightsSource = WeightsSource.pretrained


@dataclass
class PresetConfig:
    """The conf/preset/<name>.yaml a run starts from: the first level of its directory (rundir.run_identity).

    A label, not a setting (the preset's values are the settings): it stays out of the fingerprint.
    """

    name: str = "none"  # set by each preset file; "none" when composed with preset=null


@dataclass
class VariantConfig:
    """The Table-2 row this run belongs to; its settings live in conf/variant/<name>.yaml."""

    name: str = "full"  # full, no_image_guidance, no_3d, no_vsd, no_hybrid, hexplane


@dataclass
class EvalConfig:
    """Renders and metrics written at the end of a run."""

    orbit_views: int = 8  # azimuths of the evaluation orbit (toy-world metrics)
    times: list[float] = dc_field(default_factory=lambda: [0.0, 0.5, 1.0])  # times evaluated
    size: int = 32  # evaluation render size (toy); 256 in the paper (authors' data.eval_height/eval_width: 256)
    video_frames: int = 48  # frames of the orbit video (time advancing along the orbit)
    video_size: int = 128  # orbit video resolution
    grid_views: int = 4  # rows of the views×time grid (paper Fig. 1)
    grid_times: int = 5  # columns of the views×time grid
    fps: int = 15  # video frame rate (authors' evaluation video: 15 fps)
    n_samples: int = 64  # samples per ray for evaluation renders
    captions: bool = True  # prompt above people-facing videos and grid (never on orbit.mp4: CLIP reads it)
    gif: bool = True  # also write the captioned orbit as orbit.gif
    extra_videos: bool = True  # also render the static (t = 0) orbit, fixed view over time and depth videos
    fixed_view_azimuth: float = 0.0  # azimuth (degrees) of the fixed-view-over-time video
    extra_video_frames: int = 16  # frames of the static orbit and fixed-view videos (16: the paper's clips)
    depth_colormap: str = "turbo"  # matplotlib colour map of depth.mp4 (near: warm end, far: cold end)
    mesh_resolution: int = 128  # marching-cubes grid points per side (threestudio isosurface_resolution: 128)
    mesh_threshold: float = 25.0  # density iso-level (threestudio ImplicitVolume isosurface_threshold: 25.0)
    mesh_frames: int = 16  # time steps meshed, linspace(0, 1, T) (16 = the paper's video frames)
    mesh_fps: float = 8.0  # frame rate at which mesh.glb plays its T meshes (16 frames: 2 s per loop)
    mesh_formats: list[str] = dc_field(default_factory=lambda: ["ply"])  # per-frame files: "ply" and/or "obj"
    mesh_on_finish: bool = False  # also mesh at the end of a run (off: CPU demo stays fast; `fourdfy export`)
    # Iterations between validation grids during training (renders/validation/, W&B "validation/grid"); null: none.
    validation_every: int | None = 1000  # authors' configs/fourdfy_stage_*.yaml trainer.val_check_interval: 1000

    def validate(self) -> None:
        """Raise ValueError naming the key for a value out of range."""
        for key in ("orbit_views", "size", "video_frames", "video_size", "grid_views", "grid_times", "fps",
                    "n_samples"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        if self.validation_every is not None and self.validation_every < 1:
            raise ValueError(f"eval.validation_every must be >= 1 (iterations between validation grids) or null "
                             f"(none), got {self.validation_every}")


@dataclass
class RunConfig:
    """One job: one (prompt, variant, seed)."""

    prompt: str = "a red ball bouncing on a blue box"  # text prompt (toy world: one of its scenes)
    seed: int = 0  # seeds every random draw of the run
    device: str = "cpu"  # "cpu" or "cuda"
    # Branching (fourdfy/branch.py): start from another run's checkpoint instead of from scratch.
    init_from: str | None = None  # the source run directory; stored absolute (fourdfy.api.generate)
    init_at: str | None = None  # where in the source: "stage1" / "stage2" (that stage's end) or an iteration
    preset: PresetConfig = dc_field(default_factory=PresetConfig)
    variant: VariantConfig = dc_field(default_factory=VariantConfig)
    field: FieldConfig = dc_field(default_factory=FieldConfig)
    renderer: RendererConfig = dc_field(default_factory=RendererConfig)
    cameras: CameraSamplingConfig = dc_field(default_factory=CameraSamplingConfig)
    guidance: GuidanceConfig = dc_field(default_factory=GuidanceConfig)
    schedule: ScheduleConfig = dc_field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = dc_field(default_factory=TrainerConfig)
    logger: LoggerConfig = dc_field(default_factory=LoggerConfig)
    eval: EvalConfig = dc_field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Check every part before any work; each error names its key (``schedule.p_3d``) and the fix.

        Choices (field.kind, guidance.backend, ...) are enums, rejected at compose time already; this checks
        ranges, the settings that must agree across parts, and what this machine must provide for them (a
        CUDA GPU for device=cuda, the optional packages asked for). Raises ConfigError (a ValueError) or
        MissingExtraError, one-line messages that entry points print as they are.
        """
        _check_device(self.device)  # first: preset=paper on a CPU machine fails for this reason above all
        parts = [self.field, self.renderer, self.cameras, self.schedule, self.trainer, self.eval, self.logger]
        if self.guidance.backend is GuidanceBackend.synthetic:
            parts.append(self.guidance.synthetic)
        else:
            video = self.guidance.zeroscope if self.guidance.video_prior is VideoPrior.zeroscope \
                else self.guidance.videocrafter2
            parts += [self.guidance.mvdream, self.guidance.sd_vsd, video]
        for part in parts:
            try:
                part.validate()
            except UserError:
                raise
            except ValueError as err:  # the parts raise plain ValueErrors naming their key: mark them as the user's
                raise ConfigError(str(err)) from err
        if self.eval.mesh_on_finish:  # meshes written at the end of a run: PLY/OBJ by trimesh, mesh.glb by pygltflib
            require_extra("trimesh", "eval.mesh_on_finish=true")
            require_extra("pygltflib", "eval.mesh_on_finish=true")


def _check_device(device: str) -> None:
    """ConfigError naming ``device`` when it is not a torch device, or is CUDA on a machine without one."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device={device!r} is not a torch device ({err}); set device=cpu or device=cuda") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device} but torch.cuda.is_available() is False (no CUDA GPU or driver here); set device=cpu "
            "(only the toy world is practical on a CPU: preset=demo_cpu) or run on a machine with a CUDA GPU"
        )


def slug(text: str) -> str:
    """A prompt as a folder name: lower case, words joined by '_' ("a panda dancing" -> "a_panda_dancing")."""
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")[:120] or "prompt"


# The Hydra config tree fourdfy.main composes from: fourdfy/conf, a link to the repository's conf/ in a checkout
# and a copy of it in an installed wheel (pyproject.toml's package-data).
CONF_DIR = Path(__file__).resolve().parent / "conf"


def register_configs() -> None:
    """Register the schema (conf/config.yaml extends it: `- run_schema` in its defaults) and the `slug`
    resolver its run directories use. Idempotent; run.py and tests call it before composing."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    if not OmegaConf.has_resolver("slug"):
        OmegaConf.register_new_resolver("slug", slug)


def compose_config(overrides: list[str], config_dir: Path = CONF_DIR, with_hydra: bool = False) -> DictConfig:
    """The config ``python run.py <overrides>`` composes, as a DictConfig (``with_hydra``: with the ``hydra``
    node, e.g. to read the launcher or sweeper settings)."""
    from hydra import compose, initialize_config_dir  # Hydra's compose API: only tools and tests need it

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=with_hydra)


def compose_run_config(overrides: list[str], config_dir: Path = CONF_DIR) -> RunConfig:
    """The RunConfig that ``python run.py <overrides>`` would run."""
    return OmegaConf.to_object(compose_config(overrides, config_dir))


def load_run_config(run_dir: Path) -> RunConfig:
    """The RunConfig saved in ``run_dir/config.yaml`` (validated against the current schema)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a fourdfy run directory")
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)
