"""Cameras, rays and the volume renderer."""

from fourdfy.render.cameras import (
    Cameras,
    CameraSamplingConfig,
    cameras_from_spherical,
    look_at_c2w,
    mvdream_camera,
    sample_cameras,
    sample_video_camera,
)
from fourdfy.render.rays import get_rays, ray_sphere_near_far
from fourdfy.render.volume import Renderer, RendererConfig, composite

__all__ = [
    "CameraSamplingConfig",
    "Cameras",
    "Renderer",
    "RendererConfig",
    "cameras_from_spherical",
    "composite",
    "get_rays",
    "look_at_c2w",
    "mvdream_camera",
    "ray_sphere_near_far",
    "sample_cameras",
    "sample_video_camera",
]
