"""Procedural 4D scenes with known ground truth: the toy world's "real" objects.

Each scene is an analytic field (x [N,3], t [N]) -> (density [N], rgb [N,3]) built from soft signed-distance
primitives, so it renders through the same :class:`fourdfy.render.volume.Renderer` as the learned field and
gives ground-truth rgb and depth for any camera and time. Faces of the boxes are coloured differently on
purpose: a multi-face ("Janus") failure or a rotated object then shows up as a large error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fourdfy.errors import ConfigError

# Density inside a solid and the softness of its surface (world units). Soft edges keep the
# ground truth smooth enough for 32×32 renders without aliasing.
SOLID_DENSITY = 60.0
EDGE_SOFTNESS = 0.015


def _box_sdf(p: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Signed distance to an axis-aligned box centred at 0. p: [N,3]; half: [3] -> [N]."""
    q = p.abs() - half
    outside = q.clamp(min=0).norm(dim=-1)
    inside = q.max(dim=-1).values.clamp(max=0)
    return outside + inside


def _face_colors(p: torch.Tensor, half: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """Colour of the box face nearest each point. colors: [6,3] for +x,-x,+y,-y,+z,-z -> [N,3]."""
    rel = p / half
    axis = rel.abs().argmax(dim=-1)
    sign_neg = (rel.gather(-1, axis[:, None]).squeeze(-1) < 0).long()
    return colors[axis * 2 + sign_neg]


def _rot_z(p: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate points p [N,3] about +z by -angle [N] (i.e. into a frame spinning by +angle)."""
    c, s = torch.cos(angle), torch.sin(angle)
    x, y, z = p.unbind(-1)
    return torch.stack([c * x + s * y, -s * x + c * y, z], dim=-1)


def _combine(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of (sdf [N], rgb [N,3]) parts -> (density [N], rgb [N,3]); colour of the nearest part."""
    sdfs = torch.stack([s for s, _ in parts], dim=-1)
    rgbs = torch.stack([c for _, c in parts], dim=-2)
    nearest = sdfs.argmin(dim=-1)
    sdf = sdfs.gather(-1, nearest[:, None]).squeeze(-1)
    rgb = rgbs.gather(-2, nearest[:, None, None].expand(-1, 1, 3)).squeeze(-2)
    density = SOLID_DENSITY * torch.sigmoid(-sdf / EDGE_SOFTNESS)
    return density, rgb


def _c(*rgb: float) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32)


def bouncing_ball(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A red ball bouncing (and drifting along +y) on a box with six differently blue-ish faces."""
    box_half = _c(0.45, 0.45, 0.2)
    box_center = _c(0.0, 0.0, -0.4)
    face = torch.stack([_c(0.1, 0.2, 0.9), _c(0.1, 0.7, 0.8), _c(0.3, 0.1, 0.6), _c(0.9, 0.9, 0.9),
                        _c(0.2, 0.4, 1.0), _c(0.05, 0.05, 0.3)])
    p_box = x - box_center
    box = (_box_sdf(p_box, box_half), _face_colors(p_box, box_half, face))
    radius = 0.22
    center = torch.stack([torch.zeros_like(t), -0.25 + 0.5 * t,
                          -0.2 + radius + 0.45 * torch.sin(math.pi * t)], dim=-1)
    ball_sdf = (x - center).norm(dim=-1) - radius
    ball_rgb = _c(0.9, 0.15, 0.1).expand_as(x)
    return _combine([box, (ball_sdf, ball_rgb)])


def spinning_cube(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A yellow cube, each face a different shade, spinning a quarter turn about z, on a grey plinth."""
    angle = 0.5 * math.pi * t
    p = _rot_z(x - _c(0.0, 0.0, 0.1), angle)
    half = _c(0.35, 0.35, 0.35)
    face = torch.stack([_c(1.0, 0.9, 0.1), _c(0.9, 0.5, 0.0), _c(0.7, 0.8, 0.1), _c(1.0, 1.0, 0.6),
                        _c(0.95, 0.75, 0.3), _c(0.5, 0.4, 0.0)])
    cube = (_box_sdf(p, half), _face_colors(p, half, face))
    plinth_p = x - _c(0.0, 0.0, -0.4)
    plinth = (_box_sdf(plinth_p, _c(0.25, 0.25, 0.15)), _c(0.5, 0.5, 0.5).expand_as(x))
    return _combine([cube, plinth])


def swinging_pendulum(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A green pendulum (rod + bob) swinging in the x-z plane under a brown gallows frame."""
    pivot = _c(0.0, 0.0, 0.55)
    angle = 0.6 * torch.cos(2.0 * math.pi * t)
    length = 0.7
    direction = torch.stack([torch.sin(angle), torch.zeros_like(angle), -torch.cos(angle)], dim=-1)
    bob_center = pivot + length * direction
    bob = ((x - bob_center).norm(dim=-1) - 0.17, _c(0.1, 0.8, 0.2).expand_as(x))
    # Rod: distance to the segment pivot -> bob centre.
    rel = x - pivot
    proj = (rel * direction).sum(-1).clamp(0.0, length)
    rod_sdf = (rel - proj[:, None] * direction).norm(dim=-1) - 0.04
    rod = (rod_sdf, _c(0.2, 0.5, 0.2).expand_as(x))
    beam = (_box_sdf(x - _c(0.0, 0.0, 0.6), _c(0.5, 0.06, 0.06)), _c(0.55, 0.3, 0.1).expand_as(x))
    post_a = (_box_sdf(x - _c(-0.5, 0.0, 0.0), _c(0.06, 0.06, 0.6)), _c(0.45, 0.25, 0.1).expand_as(x))
    post_b = (_box_sdf(x - _c(0.5, 0.0, 0.0), _c(0.06, 0.06, 0.6)), _c(0.65, 0.4, 0.2).expand_as(x))
    return _combine([bob, rod, beam, post_a, post_b])


@dataclass(frozen=True)
class ToyScene:
    """A prompt and its analytic 4D field."""

    prompt: str
    field: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.field(x, t)


SCENES: tuple[ToyScene, ...] = (
    ToyScene("a red ball bouncing on a blue box", bouncing_ball),
    ToyScene("a yellow cube spinning", spinning_cube),
    ToyScene("a green pendulum swinging", swinging_pendulum),
)


class UnknownToyPromptError(ConfigError):
    """A prompt the toy world has no scene for (the synthetic backend only knows SCENES)."""


def get_scene(prompt: str) -> ToyScene:
    """The toy scene for ``prompt``; an unknown prompt is an UnknownToyPromptError listing the known ones."""
    for scene in SCENES:
        if scene.prompt == prompt:
            return scene
    known = ", ".join(repr(s.prompt) for s in SCENES)
    # One line: run.py prints it as is. Any other prompt is the real priors' business (GPU and model weights).
    raise UnknownToyPromptError(
        f"prompt={prompt!r} is not a toy-world scene (guidance.backend=synthetic); toy prompts: {known}; "
        "real prompts need preset=paper (the real priors: a CUDA GPU and the model weights)"
    )
