"""Render a run's checkpoint along the paper's evaluation cameras.

Two trajectories, both at the evaluation camera (elevation 15°, distance 3.0, FoV 40°, 256²;
REFERENCE.md §Rendering, authors' `eval_camera_distance: 3.0`, `eval_fovy_deg: 40.`, `eval_height: 256`):

- ``orbit`` (paper §4.1, "the same camera trajectory as MAV3D, i.e. moving around the scene in azimuth
  with a fixed elevation angle"): ``n_frames`` azimuths 360°/n apart; time advances from 0 to 1 along it.
- ``authors``: the official evaluation video (sherwinbahmani/4dfy, threestudio/data/uncond.py with
  ``test_traj: motion_smooth``, ``num_frames: 16``, ``num_frames_factor: 4``): with T = 64 time steps,
  four loops, each holding one azimuth for T/4 = 16 views and then rotating 90° over T/4 − 1 = 15 views
  (azimuth 360° → 270° → 180° → 90° → 0°), 2T − 4 = 124 views in all; view k is rendered at time
  ``linspace(0, 1, T)[:T − 2][k mod (T − 2)]``.

    python -m eval.orbit RUN_DIR [--trajectory orbit|authors] [--frames N] [--size S] [--out FILE]

writes ``RUN_DIR/renders/eval_<trajectory>.mp4`` (and ``..._depth.mp4``) atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from fourdfy.api import load_run
from fourdfy.config import RunConfig
from fourdfy.export.video import write_video
from fourdfy.render.cameras import Cameras, cameras_from_spherical, orbit_cameras
from fourdfy.render.volume import Renderer, RendererConfig

# The authors' test trajectory has 4 loops (uncond.py `num_test_loop_static: 4`); its view count 2T − 4
# and hold length T/4 follow from `n_views = num_frames * 2`, `n_views_azimuth = n_views // 8`.
AUTHORS_LOOPS = 4


@dataclass
class OrbitConfig:
    """Which trajectory, how many frames, how large."""

    trajectory: str = "orbit"  # "orbit" (paper/MAV3D azimuth orbit) or "authors" (official 124-view video)
    n_frames: int = 120  # frames of the "orbit" trajectory (threestudio's n_test_views default: 120)
    authors_time_steps: int = 64  # T of the "authors" trajectory: num_frames 16 × num_frames_factor 4
    size: int = 256  # render height = width (authors' eval_height/eval_width: 256; paper 256²)
    elevation_deg: float = 15.0  # eval_elevation_deg: 15 (threestudio default, kept by the authors)
    distance: float = 3.0  # eval_camera_distance: 3.0 (authors' stage configs)
    fovy_deg: float = 40.0  # eval_fovy_deg: 40 (authors' stage configs)
    n_samples: int | None = None  # samples per ray; None: the run's eval.n_samples
    learned_background: bool = False  # False: white, as renders/ and the toy ground truth; True: the run's
    chunk: int = 4  # views per render call (bounds memory: chunk·size² rays)
    fps: int = 15  # video frame rate (authors' evaluation video: 15 fps)

    def validate(self) -> None:
        """Raise ValueError naming the field for a value out of range."""
        if self.trajectory not in TRAJECTORIES:
            raise ValueError(f"OrbitConfig.trajectory must be one of {sorted(TRAJECTORIES)}, got {self.trajectory!r}")
        if self.n_frames < 1:
            raise ValueError(f"OrbitConfig.n_frames must be >= 1, got {self.n_frames}")
        if self.authors_time_steps < 8 or self.authors_time_steps % 4:
            raise ValueError("OrbitConfig.authors_time_steps must be a multiple of 4 and >= 8 (hold T/4 views, "
                             f"rotate over T/4 - 1), got {self.authors_time_steps}")
        if self.size < 1:
            raise ValueError(f"OrbitConfig.size must be >= 1, got {self.size}")
        if self.n_samples is not None and self.n_samples < 1:
            raise ValueError(f"OrbitConfig.n_samples must be >= 1 or None, got {self.n_samples}")
        if self.chunk < 1:
            raise ValueError(f"OrbitConfig.chunk must be >= 1, got {self.chunk}")
        if self.fps < 1:
            raise ValueError(f"OrbitConfig.fps must be >= 1, got {self.fps}")


@dataclass
class OrbitRender:
    """Frames of one trajectory."""

    rgb: torch.Tensor  # [N, H, W, 3] in [0, 1]
    depth: torch.Tensor  # [N, H, W] expected surface distance (depth / opacity; 0 where empty)
    opacity: torch.Tensor  # [N, H, W]
    cameras: Cameras  # N cameras
    times: torch.Tensor  # [N] in [0, 1]
    iteration: int  # training iteration of the checkpoint rendered


def orbit_trajectory(n_frames: int, elevation_deg: float = 15.0, distance: float = 3.0,
                     fovy_deg: float = 40.0) -> tuple[Cameras, torch.Tensor]:
    """MAV3D's orbit: azimuth k·360°/n, time k/(n − 1) (0 → 1 along the orbit). Returns (cameras, times [n])."""
    cameras = orbit_cameras(n_frames, elevation=elevation_deg, distance=distance, fovy_deg=fovy_deg)
    return cameras, torch.linspace(0.0, 1.0, n_frames)


def authors_trajectory(time_steps: int = 64, elevation_deg: float = 15.0, distance: float = 3.0,
                       fovy_deg: float = 40.0) -> tuple[Cameras, torch.Tensor]:
    """The official evaluation video (uncond.py, test_traj 'motion_smooth'). Returns (cameras, times [2T − 4]).

    Loop i (0..3) starts at azimuth (4 − i)·90°, holds it for T/4 views, then rotates to (3 − i)·90° over
    linspace(start, end, T/4)[1:] (T/4 − 1 views). Times: linspace(0, 1, T)[:T − 2], repeated twice.
    """
    if time_steps < 8 or time_steps % 4:
        raise ValueError(f"time_steps must be a multiple of 4 and >= 8, got {time_steps}")
    hold = time_steps // 4
    azimuths = []
    for i in range(AUTHORS_LOOPS):
        start, end = (AUTHORS_LOOPS - i) * 90.0, (AUTHORS_LOOPS - i - 1) * 90.0
        azimuths.append(torch.full((hold,), start, dtype=torch.float64))
        azimuths.append(torch.linspace(start, end, hold, dtype=torch.float64)[1:])
    azimuth = torch.cat(azimuths)
    n_views = azimuth.shape[0]  # 2T − 4
    times = torch.linspace(0.0, 1.0, time_steps)[: time_steps - 2].repeat(2)[:n_views]
    return cameras_from_spherical(elevation_deg, azimuth, distance, fovy_deg), times


TRAJECTORIES: dict[str, Callable[[OrbitConfig], tuple[Cameras, torch.Tensor]]] = {
    "orbit": lambda c: orbit_trajectory(c.n_frames, c.elevation_deg, c.distance, c.fovy_deg),
    "authors": lambda c: authors_trajectory(c.authors_time_steps, c.elevation_deg, c.distance, c.fovy_deg),
}


def trajectory(cfg: OrbitConfig) -> tuple[Cameras, torch.Tensor]:
    """Cameras and times [N] of ``cfg.trajectory``."""
    cfg.validate()
    return TRAJECTORIES[cfg.trajectory](cfg)


@torch.no_grad()
def render_trajectory(
    field: nn.Module, renderer: Renderer, cameras: Cameras, times: torch.Tensor, size: int,
    background: torch.Tensor | nn.Module, chunk: int = 4,
) -> dict[str, torch.Tensor]:
    """Render view k at times[k], deterministically (no jitter).

    Returns dict(rgb [N, size, size, 3], depth [N, size, size] = expected surface distance, opacity [N, size, size]).
    """
    if times.shape != (len(cameras),):
        raise ValueError(f"times must be [N]=[{len(cameras)}] (one per camera), got {tuple(times.shape)}")
    parts: dict[str, list[torch.Tensor]] = {"rgb": [], "depth": [], "opacity": []}
    for i in range(0, len(cameras), chunk):
        out = renderer.render(field, cameras[i : i + chunk], times[i : i + chunk], size, size,
                              background=background, train=False)
        parts["rgb"].append(out["rgb"])
        parts["depth"].append(out["depth_normalized"])
        parts["opacity"].append(out["opacity"])
    return {k: torch.cat(v) for k, v in parts.items()}


def load_run_checked(run_dir: Path) -> tuple[RunConfig, nn.Module, nn.Module, int]:
    """``fourdfy.api.load_run`` with errors that name the path: missing run, other schema, no checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'} does not exist: {run_dir} is not a fourdfy run "
                                "directory (run.py writes config.yaml when a run starts)")
    try:
        run_cfg, field, background, iteration = load_run(run_dir)
    except OmegaConfBaseException as err:
        raise ValueError(f"{run_dir / 'config.yaml'} does not match the current run schema (fourdfy/config.py "
                         f"RunConfig): {err}. Render it with the code version that wrote it.") from err
    except RuntimeError as err:  # load_state_dict: the checkpoint's tensors do not fit config.yaml's field
        raise ValueError(f"the checkpoint in {run_dir / 'checkpoints'} does not fit the field described by "
                         f"{run_dir / 'config.yaml'}: {err}") from err
    return run_cfg, field, background, iteration


def render_run(run_dir: Path, cfg: OrbitConfig | None = None) -> OrbitRender:
    """Render the newest valid checkpoint of ``run_dir`` along ``cfg``'s trajectory."""
    cfg = cfg or OrbitConfig()
    cameras, times = trajectory(cfg)  # validates cfg before the (slow) load
    run_cfg, field, background, iteration = load_run_checked(run_dir)
    n_samples = cfg.n_samples if cfg.n_samples is not None else run_cfg.eval.n_samples
    renderer = Renderer(RendererConfig(n_samples=n_samples, radius=run_cfg.renderer.radius))
    bg: torch.Tensor | nn.Module = background.eval() if cfg.learned_background else torch.ones(3)
    out = render_trajectory(field, renderer, cameras, times, cfg.size, bg, cfg.chunk)
    return OrbitRender(out["rgb"], out["depth"], out["opacity"], cameras, times, iteration)


def depth_to_gray(depth: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """Depth [N, H, W] -> [N, H, W, 3] for viewing: near white, far black, empty pixels black.

    Normalised by the min/max over the visible pixels of all frames, so frames stay comparable.
    """
    visible = opacity > 0.5
    if not bool(visible.any()):
        return torch.zeros(*depth.shape, 3)
    lo, hi = depth[visible].min(), depth[visible].max()
    gray = torch.where(visible, 1.0 - (depth - lo) / (hi - lo).clamp(min=1e-6), torch.zeros_like(depth))
    return gray[..., None].expand(*depth.shape, 3)


def write_orbit(render: OrbitRender, path: Path, fps: int = 15) -> tuple[Path, Path]:
    """Write the rgb video to ``path`` and the depth video beside it (``<stem>_depth<suffix>``), atomically."""
    path = Path(path)
    rgb_path = write_video(render.rgb, path, fps=fps)
    depth_path = write_video(depth_to_gray(render.depth, render.opacity),
                             path.with_name(f"{path.stem}_depth{path.suffix}"), fps=fps)
    return rgb_path, depth_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.orbit", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory (config.yaml + checkpoints/)")
    parser.add_argument("--trajectory", default="orbit", choices=sorted(TRAJECTORIES))
    parser.add_argument("--frames", type=int, default=OrbitConfig.n_frames, help="frames of the orbit trajectory")
    parser.add_argument("--time-steps", type=int, default=OrbitConfig.authors_time_steps,
                        help="T of the authors' trajectory (2T - 4 views)")
    parser.add_argument("--size", type=int, default=OrbitConfig.size, help="render height = width")
    parser.add_argument("--n-samples", type=int, default=None, help="samples per ray (default: the run's)")
    parser.add_argument("--learned-background", action="store_true", help="the run's background, not white")
    parser.add_argument("--out", type=Path, default=None,
                        help="video path (default RUN_DIR/renders/eval_<trajectory>.mp4)")
    args = parser.parse_args(argv)
    cfg = OrbitConfig(trajectory=args.trajectory, n_frames=args.frames, authors_time_steps=args.time_steps,
                      size=args.size, n_samples=args.n_samples, learned_background=args.learned_background)
    try:
        render = render_run(args.run_dir, cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / "renders" / f"eval_{args.trajectory}.mp4"
    rgb_path, depth_path = write_orbit(render, out, fps=cfg.fps)
    print(f"{len(render.times)} frames of checkpoint iteration {render.iteration}: {rgb_path}, {depth_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
