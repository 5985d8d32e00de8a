"""Camera rays: one per pixel centre, and where they enter and leave the scene's bounding sphere or box."""

from __future__ import annotations

import torch

from fourdfy.render.cameras import Cameras


def get_rays(cameras: Cameras, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space rays through the pixel centres of every camera.

    Pinhole from the vertical FoV: focal = 0.5·height / tan(fovy/2) pixels (square pixels). Pixel (row i,
    column j) has its centre at (j + 0.5, i + 0.5); row 0 is the top of the image. In camera space the
    camera looks along −z with +x right and +y up, so the direction is
    ((j + 0.5 − W/2)/focal, −(i + 0.5 − H/2)/focal, −1), rotated to world by c2w.

    Returns origins [B, H, W, 3] (the camera centres) and unit directions [B, H, W, 3], in c2w's dtype.
    """
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise ValueError(f"height and width must be positive ints, got height={height!r}, width={width!r}")
    c2w = cameras.c2w
    device, dtype = c2w.device, c2w.dtype
    focal = 0.5 * height / torch.tan(0.5 * cameras.fovy.to(device=device, dtype=dtype))  # [B]
    cols = torch.arange(width, device=device, dtype=dtype) + 0.5 - 0.5 * width  # [W]
    rows = torch.arange(height, device=device, dtype=dtype) + 0.5 - 0.5 * height  # [H]
    x = cols[None, None, :] / focal[:, None, None]  # [B, 1, W]
    y = -rows[None, :, None] / focal[:, None, None]  # [B, H, 1]
    b = len(cameras)
    minus_one = torch.full((b, height, width), -1.0, device=device, dtype=dtype)
    # [B, H, W, 3]
    dirs_cam = torch.stack([x.expand(b, height, width), y.expand(b, height, width), minus_one], dim=-1)
    dirs_world = torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], dirs_cam)
    directions = torch.nn.functional.normalize(dirs_world, dim=-1)
    origins = c2w[:, None, None, :3, 3].expand(b, height, width, 3)
    return origins, directions


def ray_sphere_near_far(
    origins: torch.Tensor, directions: torch.Tensor, radius: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances along each ray where it enters and leaves the sphere |x| = radius centred at the origin.

    origins, directions: [..., 3] (directions need not be unit; distances are in units of |direction|)
    -> near, far: [...], 0 <= near <= far. A ray starting inside the sphere gets near = 0. A ray that misses
    the sphere (or meets it only behind its origin, or only grazes it) gets near = far, so every interval on
    it has length 0 and it contributes nothing to a render.
    """
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    a = (directions * directions).sum(-1)
    half_b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = half_b * half_b - a * c
    root = torch.sqrt(torch.clamp(disc, min=0.0))
    near = ((-half_b - root) / a).clamp(min=0.0)
    far = ((-half_b + root) / a).clamp(min=0.0)
    # Closest approach (>= 0) as the common value for misses: a finite point on the ray, interval length 0.
    closest = (-half_b / a).clamp(min=0.0)
    hit = (disc > 0) & (far > near)
    near = torch.where(hit, near, closest)
    far = torch.where(hit, far, closest)
    return near, far


def ray_box_near_far(
    origins: torch.Tensor, directions: torch.Tensor, half_size: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances along each ray where it enters and leaves the cube [-half_size, half_size]^3 (slab method).

    origins, directions: [..., 3] (directions need not be unit; distances are in units of |direction|)
    -> near, far: [...], 0 <= near <= far. A ray starting inside the cube gets near = 0. A ray that misses
    the cube (or meets it only behind its origin, or only touches an edge) gets near = far = 0.
    A direction component of 0 makes that slab either everything (origin inside it) or nothing.
    """
    if not half_size > 0:
        raise ValueError(f"half_size must be > 0, got {half_size}")
    zero = directions == 0
    safe = torch.where(zero, torch.ones_like(directions), directions)
    t1 = (-half_size - origins) / safe
    t2 = (half_size - origins) / safe
    inside_slab = origins.abs() <= half_size
    inf = torch.full_like(t1, float("inf"))
    lo = torch.where(zero, torch.where(inside_slab, -inf, inf), torch.minimum(t1, t2))
    hi = torch.where(zero, torch.where(inside_slab, inf, -inf), torch.maximum(t1, t2))
    near = lo.max(dim=-1).values.clamp(min=0.0)
    far = hi.min(dim=-1).values
    hit = far > near
    near = torch.where(hit, near, torch.zeros_like(near))
    far = torch.where(hit, far, torch.zeros_like(far))
    return near, far
