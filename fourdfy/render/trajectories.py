"""The evaluation camera and the camera paths rendered from it (exports, eval.orbit, ground-truth metrics).

Every path returns (cameras, times [N]): frame k shows cameras[k] at scene time times[k].

- :func:`orbit_path`: MAV3D's evaluation orbit (paper §4.1, "the same camera trajectory as MAV3D, i.e.
  moving around the scene in azimuth with a fixed elevation angle"), time advancing 0 → 1 along it, or
  frozen at t = 0 (the 3D shape alone);
- :func:`fixed_view_path`: one camera while time runs 0 → 1 (the motion alone);
- :func:`authors_path`: the authors' official 124-view evaluation video.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fourdfy.render.cameras import Cameras, cameras_from_spherical

# The authors' test trajectory has 4 loops (threestudio/data/uncond.py `num_test_loop_static: 4`); its view
# count 2T − 4 and hold length T/4 follow from `n_views = num_frames * 2`, `n_views_azimuth = n_views // 8`.
AUTHORS_LOOPS = 4


@dataclass(frozen=True)
class EvalCamera:
    """A camera on a sphere around the origin, looking at it: where evaluation renders are seen from."""

    elevation_deg: float = 15.0  # threestudio's default data.eval_elevation_deg: 15 (the authors keep it)
    distance: float = 3.0  # data.eval_camera_distance: 3.0 (sherwinbahmani/4dfy configs/fourdfy_stage_*.yaml)
    fovy_deg: float = 40.0  # data.eval_fovy_deg: 40 (same configs)

    def at(self, azimuth_deg: float | torch.Tensor) -> Cameras:
        """Cameras at these azimuths (a number or [B] degrees), this elevation, distance and FoV."""
        return cameras_from_spherical(self.elevation_deg, azimuth_deg, self.distance, self.fovy_deg)


EVAL_CAMERA = EvalCamera()


def orbit_cameras(
    n: int,
    elevation: float = EVAL_CAMERA.elevation_deg,
    distance: float = EVAL_CAMERA.distance,
    fovy_deg: float = EVAL_CAMERA.fovy_deg,
    azimuth_start: float = 0.0,
    azimuth_span: float = 360.0,
) -> Cameras:
    """n cameras evenly spaced in azimuth: azimuth_start + k·azimuth_span/n, k = 0..n−1 (end excluded).

    Defaults are the evaluation camera (:data:`EVAL_CAMERA`).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    azimuth = azimuth_start + torch.arange(n, dtype=torch.float64) * (azimuth_span / n)
    return cameras_from_spherical(elevation, azimuth, distance, fovy_deg)


def orbit_path(
    n_frames: int, time_advances: bool = True, camera: EvalCamera = EVAL_CAMERA
) -> tuple[Cameras, torch.Tensor]:
    """An azimuth orbit of n_frames cameras (0°, 360°/n, ...) and times [n_frames]: linspace(0, 1) when
    time_advances (MAV3D / 4D-fy evaluation protocol), else all 0 (the static orbit)."""
    cams = orbit_cameras(n_frames, elevation=camera.elevation_deg, distance=camera.distance,
                         fovy_deg=camera.fovy_deg)
    times = torch.linspace(0.0, 1.0, n_frames) if time_advances else torch.zeros(n_frames)
    return cams, times


def fixed_view_path(
    n_frames: int, azimuth: float = 0.0, camera: EvalCamera = EVAL_CAMERA
) -> tuple[Cameras, torch.Tensor]:
    """One camera repeated n_frames times, with times linspace(0, 1, n_frames): the motion alone."""
    if not isinstance(n_frames, int) or n_frames < 1:
        raise ValueError(f"n_frames must be a positive int, got {n_frames!r}")
    return camera.at(torch.full((n_frames,), float(azimuth))), torch.linspace(0.0, 1.0, n_frames)


def authors_path(time_steps: int = 64, camera: EvalCamera = EVAL_CAMERA) -> tuple[Cameras, torch.Tensor]:
    """The official evaluation video: (cameras, times [2T − 4]).

    sherwinbahmani/4dfy threestudio/data/uncond.py with ``test_traj: motion_smooth``, ``num_frames: 16``,
    ``num_frames_factor: 4`` gives T = 64 time steps. Loop i (0..3) starts at azimuth (4 − i)·90°, holds it
    for T/4 views, then rotates to (3 − i)·90° over linspace(start, end, T/4)[1:] (T/4 − 1 views), so the
    azimuth runs 360° → 270° → 180° → 90° → 0° over 2T − 4 views (124 for T = 64). View k is rendered at
    time linspace(0, 1, T)[:T − 2][k mod (T − 2)].
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
    return camera.at(azimuth), times
