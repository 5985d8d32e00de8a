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

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fourdfy.enums import StrChoice
from fourdfy.fields.field4d import FieldConfig
from fourdfy.guidance.configs import MVDreamConfig, SDVSDConfig, ZeroscopeConfig
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


@dataclass
class GuidanceConfig:
    """Which priors drive the optimisation."""

    backend: GuidanceBackend = GuidanceBackend.synthetic  # synthetic (toy world, CPU) or real (MVDream, SD, Zeroscope)
    synthetic: SyntheticPriorsConfig = dc_field(default_factory=SyntheticPriorsConfig)
    mvdream: MVDreamConfig = dc_field(default_factory=MVDreamConfig)  # 3D prior (real backend)
    sd_vsd: SDVSDConfig = dc_field(default_factory=SDVSDConfig)  # image prior with VSD (real backend)
    zeroscope: ZeroscopeConfig = dc_field(default_factory=ZeroscopeConfig)  # video prior (real backend)


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

    def validate(self) -> None:
        """Raise ValueError naming the key for a value out of range."""
        for key in ("orbit_views", "size", "video_frames", "video_size", "grid_views", "grid_times", "fps",
                    "n_samples"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class RunConfig:
    """One job: one (prompt, variant, seed)."""

    prompt: str = "a red ball bouncing on a blue box"  # text prompt (toy world: one of its scenes)
    seed: int = 0  # seeds every random draw of the run
    device: str = "cpu"  # "cpu" or "cuda"
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
        ranges and the settings that must agree across parts.
        """
        self.field.validate()
        self.renderer.validate()
        self.cameras.validate()
        self.schedule.validate()
        self.trainer.validate()
        self.eval.validate()
        if self.guidance.backend is GuidanceBackend.synthetic:
            self.guidance.synthetic.validate()
        else:
            self.guidance.mvdream.validate()
            self.guidance.sd_vsd.validate()
            self.guidance.zeroscope.validate()


def slug(text: str) -> str:
    """A prompt as a folder name: lower case, words joined by '_' ("a panda dancing" -> "a_panda_dancing")."""
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")[:120] or "prompt"


# The Hydra config tree that run.py composes from (conf/ beside this package in the repository).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


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
