"""Typed configuration of a run, registered in Hydra's ConfigStore.

Hydra fills these dataclasses from conf/ (presets, variants, prompt sets) and the command line; a
misspelt key fails at compose time because the schema is structured. Every default is the paper's
or the authors' number, with its source next to it; presets (conf/preset/) scale them down.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field

from hydra.core.config_store import ConfigStore

from fourdfy.fields.background import BackgroundConfig
from fourdfy.fields.dense import DenseGridConfig
from fourdfy.fields.field4d import HeadsConfig
from fourdfy.fields.hexplane import HexPlaneConfig
from fourdfy.guidance.configs import MVDreamConfig, SDVSDConfig, ZeroscopeConfig
from fourdfy.hybrid import ScheduleConfig
from fourdfy.render.cameras import CameraSamplingConfig
from fourdfy.render.volume import RendererConfig
from fourdfy.synthetic.priors import SyntheticPriorsConfig
from fourdfy.tracking import LoggerConfig
from fourdfy.trainer import TrainerConfig


@dataclass
class HashGridConfig:
    """A multiresolution hash grid (REFERENCE.md §Representation; authors' pos_encoding_config)."""

    n_levels: int = 16  # n_levels: 16
    n_features_per_level: int = 2  # n_features_per_level: 2
    log2_hashmap_size: int = 19  # log2_hashmap_size: 19
    base_resolution: int = 16  # base_resolution: 16
    per_level_scale: float = 1.447269237440378  # per_level_scale: finest level 4096
    backend: str = "torch"  # "torch" (reference, default) or "tcnn" (tiny-cuda-nn, CUDA only)


@dataclass
class FieldConfig:
    """The 4D field: which encodings, the heads, the background."""

    kind: str = "hashgrid"  # "hashgrid" (the paper), "hexplane" (Table-2 ablation), "dense" (CPU fast path)
    static_grid: HashGridConfig = dc_field(default_factory=HashGridConfig)  # 3D grid of x
    dynamic_grid: HashGridConfig = dc_field(default_factory=HashGridConfig)  # 4D grid of (x, t)
    hexplane: HexPlaneConfig = dc_field(default_factory=HexPlaneConfig)  # used when kind = hexplane
    dense: DenseGridConfig = dc_field(default_factory=DenseGridConfig)  # used when kind = dense
    heads: HeadsConfig = dc_field(default_factory=HeadsConfig)
    background: BackgroundConfig = dc_field(default_factory=BackgroundConfig)
    box_radius: float = 1.0  # scene box [-1, 1]^3 (authors' geometry.radius: 1.0)
    checkpoint_chunk: int | None = None  # samples per recomputed-in-backward chunk (keeps only x, t); None = off

    def __post_init__(self) -> None:
        if self.checkpoint_chunk is not None and self.checkpoint_chunk < 1:
            raise ValueError(
                f"field.checkpoint_chunk must be >= 1 (samples per recomputed chunk) or null (off), "
                f"got {self.checkpoint_chunk}"
            )


@dataclass
class GuidanceConfig:
    """Which priors drive the optimisation."""

    backend: str = "synthetic"  # "synthetic" (toy world, CPU) or "real" (MVDream, SD 2.1, Zeroscope)
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
    size: int = 32  # evaluation render size (toy); 256 in the paper (REFERENCE.md §Rendering)
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


def register_configs() -> None:
    """Register the schema so conf/config.yaml can extend it (`- run_schema` in its defaults)."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
