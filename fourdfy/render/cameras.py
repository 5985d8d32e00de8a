"""Cameras: the project's one camera convention, random training cameras, MVDream's camera input.

Evaluation cameras and camera paths (orbits) live in fourdfy/render/trajectories.py.

Convention (fixed by the lead, threestudio's): world z-up; a camera at (elevation e, azimuth a, distance d)
sits at d·(cos e cos a, cos e sin a, sin e), looks at the origin with world up +z, and its camera-to-world
matrix c2w [4, 4] has rotation columns [right, up, −forward] (OpenGL camera looking along its local −z)
and the camera centre as translation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# MVDream's normalize_camera divides the translation by (‖t‖ + 1e-8) (bytedance/MVDream
# mvdream/camera_utils.py); the same epsilon keeps a zero translation at zero instead of NaN.
_MVDREAM_NORM_EPS = 1e-8


@dataclass
class Cameras:
    """A batch of B pinhole cameras (square pixels, principal point at the image centre)."""

    c2w: torch.Tensor  # [B, 4, 4] float32 camera-to-world, rotation columns [right, up, -forward]
    fovy: torch.Tensor  # [B] vertical field of view, radians
    elevation: torch.Tensor  # [B] degrees above the xy plane
    azimuth: torch.Tensor  # [B] degrees, from +x towards +y
    distance: torch.Tensor  # [B] distance of the camera centre from the origin

    def __post_init__(self) -> None:
        if self.c2w.ndim != 3 or self.c2w.shape[1:] != (4, 4):
            raise ValueError(f"Cameras.c2w must be [B, 4, 4], got {tuple(self.c2w.shape)}")
        b = self.c2w.shape[0]
        for name in ("fovy", "elevation", "azimuth", "distance"):
            value = getattr(self, name)
            if value.shape != (b,):
                raise ValueError(f"Cameras.{name} must be [B]=[{b}] like c2w, got {tuple(value.shape)}")

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def to(self, device: torch.device | str) -> Cameras:
        """A copy with every tensor on `device`."""
        return Cameras(
            c2w=self.c2w.to(device),
            fovy=self.fovy.to(device),
            elevation=self.elevation.to(device),
            azimuth=self.azimuth.to(device),
            distance=self.distance.to(device),
        )

    def __getitem__(self, index: int | slice | torch.Tensor | Sequence[int]) -> Cameras:
        """Select cameras; an integer index keeps the batch dimension (returns a batch of 1)."""
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"camera index {index} out of range for {len(self)} cameras")
            index = slice(index % len(self), index % len(self) + 1)
        return Cameras(
            c2w=self.c2w[index],
            fovy=self.fovy[index],
            elevation=self.elevation[index],
            azimuth=self.azimuth[index],
            distance=self.distance[index],
        )

    @staticmethod
    def cat(cameras: Sequence[Cameras]) -> Cameras:
        """Concatenate batches of cameras along the batch dimension."""
        if len(cameras) == 0:
            raise ValueError("Cameras.cat needs at least one Cameras batch, got an empty list")
        return Cameras(
            c2w=torch.cat([c.c2w for c in cameras]),
            fovy=torch.cat([c.fovy for c in cameras]),
            elevation=torch.cat([c.elevation for c in cameras]),
            azimuth=torch.cat([c.azimuth for c in cameras]),
            distance=torch.cat([c.distance for c in cameras]),
        )


def _as_1d(value: float | torch.Tensor, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if tensor.ndim > 1:
        raise ValueError(f"{name} must be a number or a 1-D tensor [B], got shape {tuple(tensor.shape)}")
    return tensor.reshape(-1)


def look_at_c2w(
    elevation_deg: float | torch.Tensor, azimuth_deg: float | torch.Tensor, distance: float | torch.Tensor
) -> torch.Tensor:
    """Camera-to-world matrices of cameras on a sphere looking at the origin (z-up world).

    elevation_deg, azimuth_deg, distance: numbers or [B] tensors (broadcast together)
    -> c2w [B, 4, 4] float32.
    Computed in float64 and rounded once, so it matches MVDream's float64 numpy matrices to float32 precision.
    Raises ValueError at elevation ±90° (the view direction is parallel to world up, so "right" is undefined)
    and for a non-positive distance.
    """
    elev, azim, dist = torch.broadcast_tensors(
        _as_1d(elevation_deg, "elevation_deg"),
        _as_1d(azimuth_deg, "azimuth_deg"),
        _as_1d(distance, "distance"),
    )
    if bool((elev.abs() >= 90.0).any()):
        raise ValueError(
            f"elevation_deg must lie strictly inside (-90, 90): at ±90 the camera looks along world up "
            f"and its 'right' axis is undefined; got {elev.tolist()}"
        )
    if bool((dist <= 0).any()):
        raise ValueError(f"distance must be > 0 (the camera looks at the origin), got {dist.tolist()}")
    e, a = torch.deg2rad(elev), torch.deg2rad(azim)
    centre = dist[:, None] * torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], dim=-1)  # [B, 3]
    forward = torch.nn.functional.normalize(-centre, dim=-1)
    world_up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(forward)
    # Same construction as threestudio / MVDream: right = forward × up, up' = right × forward.
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, world_up), dim=-1)
    up = torch.nn.functional.normalize(torch.linalg.cross(right, forward), dim=-1)
    c2w = torch.zeros(centre.shape[0], 4, 4, dtype=torch.float64)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = centre
    c2w[:, 3, 3] = 1.0
    return c2w.float()


def cameras_from_spherical(
    elevation_deg: float | torch.Tensor,
    azimuth_deg: float | torch.Tensor,
    distance: float | torch.Tensor,
    fovy_deg: float | torch.Tensor,
) -> Cameras:
    """Cameras looking at the origin from spherical coordinates (broadcast to [B]); fovy in degrees."""
    elev, azim, dist, fov = torch.broadcast_tensors(
        _as_1d(elevation_deg, "elevation_deg"),
        _as_1d(azimuth_deg, "azimuth_deg"),
        _as_1d(distance, "distance"),
        _as_1d(fovy_deg, "fovy_deg"),
    )
    if bool(((fov <= 0) | (fov >= 180)).any()):
        raise ValueError(f"fovy_deg must lie strictly inside (0, 180), got {fov.tolist()}")
    return Cameras(
        c2w=look_at_c2w(elev, azim, dist),
        fovy=torch.deg2rad(fov).float(),
        elevation=elev.float(),
        azimuth=azim.float(),
        distance=dist.float(),
    )


@dataclass
class CameraSamplingConfig:
    """Random training cameras (authors' configs/fourdfy_stage_*.yaml `data:`)."""

    # data.*.elevation_range: [0, 30] (degrees above the xy plane).
    elevation_range: tuple[float, float] = (0.0, 30.0)
    # threestudio random_multiview.py: with probability 0.5 elevation is uniform in degrees, otherwise
    # "uniformly on sphere" (uniform in sin(elevation)). This is the fraction of sphere-uniform draws.
    sphere_uniform_fraction: float = 0.5
    # How the sphere-uniform branch maps elevation_range to sin(elevation). True (authors' code, threestudio
    # random_multiview.py/uncond.py): sin(e) ~ U[2p0-1, 2p1-1] with p = (e_deg + 90)/180, i.e.
    # U[e0/90, e1/90]; for (0, 30) that is sin(e) in [0, 1/3], e in [0°, 19.47°], not the full range.
    # False: sin(e) ~ U[sin e0, sin e1], exactly the configured range ("uniform on the sphere" literally).
    sphere_range_as_in_code: bool = True
    # data.*.azimuth_range: threestudio default [-180, 180] (degrees, from +x towards +y).
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    # data.*.camera_distance_range: [2.5, 3.0] (relative_radius: false, so these are world units).
    distance_range: tuple[float, float] = (2.5, 3.0)
    # data.*.fovy_range: [15, 60] (vertical field of view, degrees).
    fovy_range: tuple[float, float] = (15.0, 60.0)

    def validate(self) -> None:
        """Raise ValueError naming the key if a range is empty, reversed or outside its domain."""
        for name in ("elevation_range", "azimuth_range", "distance_range", "fovy_range"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(
                    f"cameras.{name} must be (low, high) with low <= high, got {(low, high)}"
                )
        e0, e1 = self.elevation_range
        if not (-90.0 < e0 and e1 < 90.0):
            raise ValueError(
                f"cameras.elevation_range must lie strictly inside (-90, 90) degrees (the "
                f"look-at frame is undefined at the poles), got {(e0, e1)}"
            )
        f0, f1 = self.fovy_range
        if not (0.0 < f0 and f1 < 180.0):
            raise ValueError(
                f"cameras.fovy_range must lie strictly inside (0, 180) degrees, got {(f0, f1)}"
            )
        if not self.distance_range[0] > 0.0:
            raise ValueError(
                f"cameras.distance_range must be positive, got {self.distance_range}"
            )
        if not 0.0 <= self.sphere_uniform_fraction <= 1.0:
            raise ValueError(
                "cameras.sphere_uniform_fraction must be in [0, 1], "
                f"got {self.sphere_uniform_fraction}"
            )


def _uniform(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return bounds[0] + u * (bounds[1] - bounds[0])


def sample_cameras(n_views: int, cfg: CameraSamplingConfig, generator: torch.Generator) -> Cameras:
    """Cameras for one training step: n_views views 360°/n_views apart around one random camera.

    One elevation, distance, fovy and azimuth offset is shared by the step (threestudio random_multiview.py,
    as used by 4D-fy and MVDream): azimuth_k = az0 + (u + k)/n_views·(az1 − az0), k = 0..n_views−1, so
    4 MVDream views are 90° apart and n_views=1 is a single uniform azimuth (an image step).
    Draws exactly 5 numbers, only from `generator` (exact resume depends on it).
    """
    if not isinstance(n_views, int) or n_views < 1:
        raise ValueError(f"n_views must be a positive int, got {n_views!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (for reproducible resume), got {type(generator).__name__}"
        )
    cfg.validate()
    # Fixed draw order: branch coin, elevation, azimuth offset, distance, fovy.
    coin, u_elev, u_azim, u_dist, u_fovy = torch.rand(
        5, generator=generator, dtype=torch.float64, device=generator.device
    ).cpu()
    e0, e1 = cfg.elevation_range
    if coin < cfg.sphere_uniform_fraction:
        if cfg.sphere_range_as_in_code:
            sin_bounds = (2.0 * (e0 + 90.0) / 180.0 - 1.0, 2.0 * (e1 + 90.0) / 180.0 - 1.0)
        else:
            sin_bounds = (math.sin(math.radians(e0)), math.sin(math.radians(e1)))
        elevation = torch.rad2deg(torch.asin(_uniform(u_elev, sin_bounds)))
    else:
        elevation = _uniform(u_elev, cfg.elevation_range)
    a0, a1 = cfg.azimuth_range
    azimuth = a0 + (u_azim + torch.arange(n_views, dtype=torch.float64)) / n_views * (a1 - a0)
    return cameras_from_spherical(
        elevation_deg=elevation.expand(n_views),
        azimuth_deg=azimuth,
        distance=_uniform(u_dist, cfg.distance_range).expand(n_views),
        fovy_deg=_uniform(u_fovy, cfg.fovy_range).expand(n_views),
    )


def sample_video_camera(n_frames: int, cfg: CameraSamplingConfig, generator: torch.Generator) -> Cameras:
    """One random camera repeated for all n_frames frames of a video step (the authors' single-view video
    batches: one camera for all 16 frames). Draws the same 5 numbers as sample_cameras(1, ...)."""
    if not isinstance(n_frames, int) or n_frames < 1:
        raise ValueError(f"n_frames must be a positive int, got {n_frames!r}")
    single = sample_cameras(1, cfg, generator)
    return Cameras.cat([single] * n_frames)


def mvdream_camera(c2w: torch.Tensor) -> torch.Tensor:
    """MVDream's 16-number camera input: c2w with translation scaled to unit length, flattened row-major.

    c2w: [B, 4, 4] -> [B, 16] (same dtype). For our look-at camera at (e, a, d) this equals MVDream's
    get_camera(elevation=e, azimuth=a + 90°) (MVDream's camera_utils.get_camera; checked against
    shared/testdata/mvdream/cameras.json). Unlike MVDream's normalize_camera it does not modify its input.
    """
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4):
        raise ValueError(f"c2w must be [B, 4, 4], got {tuple(c2w.shape)}")
    translation = c2w[:, :3, 3]
    scaled = translation / (translation.norm(dim=-1, keepdim=True) + _MVDREAM_NORM_EPS)
    out = c2w.clone()
    out[:, :3, 3] = scaled
    return out.reshape(c2w.shape[0], 16)
