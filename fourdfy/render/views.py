"""The one render of a set of views for people and metrics: deterministic, chunked, on white by default.

Exports (videos, the views×time grid), eval.orbit, the toy world's data and ground truth, and the
ground-truth metrics all render through :func:`render_views`, so they see the same pixels and the same depth.
"""

from __future__ import annotations

import torch
from torch import nn

from fourdfy.render.cameras import Cameras
from fourdfy.render.volume import Background, Field, Renderer

# Renders for people and metrics sit on white, like the paper's figures and the toy priors' data.
WHITE = torch.ones(3)


def field_device(field: Field) -> torch.device:
    """Where the field's parameters live (CPU for a parameter-free callable such as a toy scene)."""
    if isinstance(field, nn.Module):
        for p in field.parameters():
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def render_views(
    field: Field, renderer: Renderer, cameras: Cameras, times: torch.Tensor, size: int,
    background: Background | None = WHITE, chunk: int = 8,
) -> dict[str, torch.Tensor]:
    """Render B = len(cameras) square views, view b at times[b], without jitter (``train=False``).

    cameras and times [B] are moved to the field's device; ``chunk`` cameras go to the renderer per call
    (bounds memory: chunk·size² rays). The chunk is part of the result's recipe: a field's MLP may round
    differently at another batch size, so callers whose numbers are compared keep theirs.

    Returns, on the CPU:
        rgb [B, size, size, 3] in [0, 1], composited over ``background``;
        depth [B, size, size]: the renderer's ``depth_normalized``, the expected distance of the visible
            surface from the camera (Σ w_i t_i / opacity; 0 where nothing is hit);
        opacity [B, size, size].
    """
    if times.shape != (len(cameras),):
        raise ValueError(f"times must be [B]=[{len(cameras)}] (one per camera), got {tuple(times.shape)}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    device = field_device(field)
    cameras, times = cameras.to(device), times.to(device)
    keys = {"rgb": "rgb", "depth": "depth_normalized", "opacity": "opacity"}  # ours: the renderer's
    pieces: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for i in range(0, len(cameras), chunk):
        out = renderer.render(field, cameras[i : i + chunk], times[i : i + chunk], size, size,
                              background=background, train=False)
        for ours, theirs in keys.items():
            pieces[ours].append(out[theirs].cpu())
    return {k: torch.cat(v) for k, v in pieces.items()}
