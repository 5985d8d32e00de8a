"""Videos and image grids of a field: the orbit video and the paper's Fig. 1 views×time grid.

Every file is written to a temporary name and renamed, so an interrupted export never leaves a
truncated file under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from torch import nn

from fourdfy.render.cameras import orbit_cameras
from fourdfy.render.volume import Renderer


def _to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """[..., 3] in [0,1] -> uint8 numpy."""
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@torch.no_grad()
def render_orbit(
    field: nn.Module, renderer: Renderer, n_frames: int, size: int, background: torch.Tensor | nn.Module | None,
    elevation: float = 15.0, distance: float = 3.0, fovy_deg: float = 40.0, time_advances: bool = True,
    chunk: int = 8,
) -> torch.Tensor:
    """An azimuth orbit with time advancing from 0 to 1 along it (MAV3D/4D-fy evaluation protocol).

    Returns frames [n_frames, size, size, 3] in [0,1].
    """
    cams = orbit_cameras(n_frames, elevation=elevation, distance=distance, fovy_deg=fovy_deg)
    times = torch.linspace(0.0, 1.0, n_frames) if time_advances else torch.zeros(n_frames)
    frames = []
    for i in range(0, n_frames, chunk):
        out = renderer.render(field, cams[i : i + chunk], times[i : i + chunk], size, size,
                              background=background, train=False)
        frames.append(out["rgb"])
    return torch.cat(frames)


def write_video(frames: torch.Tensor, path: Path, fps: int = 15) -> Path:
    """Write frames [T,H,W,3] in [0,1] as mp4 (libx264 via imageio-ffmpeg) or gif, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_path(path)
    array = _to_uint8(frames)
    if path.suffix == ".gif":
        iio.imwrite(tmp, array, duration=1000 / fps, loop=0)
    else:
        # macro_block_size=1 keeps small toy frames at their size instead of padding to 16.
        iio.imwrite(tmp, array, fps=fps, codec="libx264", macro_block_size=1)
    os.replace(tmp, path)
    return path


@torch.no_grad()
def render_views_by_time(
    field: nn.Module, renderer: Renderer, n_views: int, n_times: int, size: int,
    background: torch.Tensor | nn.Module | None,
) -> torch.Tensor:
    """Rows: viewpoints around the object; columns: time steps in [0,1]. Returns [V, T, H, W, 3]."""
    cams = orbit_cameras(n_views)
    rows = []
    for v in range(n_views):
        times = torch.linspace(0.0, 1.0, n_times)
        out = renderer.render(field, cams[[v] * n_times], times, size, size, background=background, train=False)
        rows.append(out["rgb"])
    return torch.stack(rows)


def write_grid(grid: torch.Tensor, path: Path, pad: int = 2) -> Path:
    """Tile a [V,T,H,W,3] grid into one PNG (white gutters), atomically."""
    v, t, h, w, _ = grid.shape
    canvas = torch.ones(v * (h + pad) + pad, t * (w + pad) + pad, 3)
    for i in range(v):
        for j in range(t):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = grid[i, j]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_path(path)
    iio.imwrite(tmp, _to_uint8(canvas))
    os.replace(tmp, path)
    return path
