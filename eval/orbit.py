"""Render a run's checkpoint along the paper's evaluation cameras.

Two trajectories (fourdfy/render/trajectories.py), both at the evaluation camera ``EVAL_CAMERA``, 256²
(the authors' `eval_height: 256`, `eval_width: 256`):

- ``orbit`` (:func:`orbit_path`, paper §4.1, MAV3D's orbit): ``n_frames`` azimuths 360°/n apart; time
  advances from 0 to 1 along it.
- ``authors`` (:func:`authors_path`): the official 124-view evaluation video (sherwinbahmani/4dfy,
  threestudio/data/uncond.py, ``test_traj: motion_smooth``).

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

from fourdfy.build import load_run
from fourdfy.config import RunConfig
from fourdfy.export.video import write_video
from fourdfy.render.cameras import Cameras
from fourdfy.render.trajectories import EVAL_CAMERA, EvalCamera, authors_path, orbit_path
from fourdfy.render.views import WHITE, render_views
from fourdfy.render.volume import Renderer, RendererConfig


@dataclass
class OrbitConfig:
    """Which trajectory, how many frames, how large."""

    trajectory: str = "orbit"  # "orbit" (paper/MAV3D azimuth orbit) or "authors" (official 124-view video)
    n_frames: int = 120  # frames of the "orbit" trajectory (threestudio's n_test_views default: 120)
    authors_time_steps: int = 64  # T of the "authors" trajectory: num_frames 16 × num_frames_factor 4
    size: int = 256  # render height = width (authors' eval_height/eval_width: 256; paper 256²)
    elevation_deg: float = EVAL_CAMERA.elevation_deg  # the evaluation camera (render/trajectories.py)
    distance: float = EVAL_CAMERA.distance
    fovy_deg: float = EVAL_CAMERA.fovy_deg
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

    @property
    def camera(self) -> EvalCamera:
        return EvalCamera(self.elevation_deg, self.distance, self.fovy_deg)


@dataclass
class OrbitRender:
    """Frames of one trajectory."""

    rgb: torch.Tensor  # [N, H, W, 3] in [0, 1]
    depth: torch.Tensor  # [N, H, W] expected surface distance (depth / opacity; 0 where empty)
    opacity: torch.Tensor  # [N, H, W]
    cameras: Cameras  # N cameras
    times: torch.Tensor  # [N] in [0, 1]
    iteration: int  # training iteration of the checkpoint rendered


TRAJECTORIES: dict[str, Callable[[OrbitConfig], tuple[Cameras, torch.Tensor]]] = {
    "orbit": lambda c: orbit_path(c.n_frames, camera=c.camera),
    "authors": lambda c: authors_path(c.authors_time_steps, camera=c.camera),
}


def trajectory(cfg: OrbitConfig) -> tuple[Cameras, torch.Tensor]:
    """Cameras and times [N] of ``cfg.trajectory``."""
    cfg.validate()
    return TRAJECTORIES[cfg.trajectory](cfg)


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
    bg: torch.Tensor | nn.Module = background.eval() if cfg.learned_background else WHITE
    out = render_views(field, renderer, cameras, times, cfg.size, bg, cfg.chunk)
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
