"""Multi-resolution dense feature grids: the CPU fast path of the toy world.

A hash grid whose levels all fit their tables *is* a dense grid; on a CPU, PyTorch's fused
``grid_sample`` kernel evaluates such grids far faster than gathering 2^D corners level by level.
The demo therefore uses these (DESIGN.md §4: dense grids of 16³–48³ were much cheaper than hash
grids on 2 cores). Same interface as :class:`fourdfy.fields.hashgrid.HashGridEncoding`:
[N, D] in [0,1] -> [N, n_levels·F]; initialised uniform ±1e-4 like tiny-cuda-nn.

The 4D grid stores, per level, a 3D volume with F·T channels (T samples along time) and interpolates
linearly in t after the trilinear lookup: quadrilinear interpolation, computed as 3D + 1D.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DenseGridConfig:
    """Dense multi-resolution grids (static 3D and dynamic 4D)."""

    resolutions: list[int] = field(default_factory=lambda: [12, 24, 48])  # static grid, per level
    n_features: int = 4  # features per level
    dynamic_resolutions: list[int] = field(default_factory=lambda: [8, 16, 32])  # dynamic grid, per level
    time_resolution: int = 16  # samples along t of the dynamic grid (the 16 frame times)
    init_scale: float = 1e-4  # uniform ±init_scale, as tiny-cuda-nn initialises hash grids


def _check(x: torch.Tensor, n_dims: int) -> None:
    if x.ndim != 2 or x.shape[-1] != n_dims:
        raise ValueError(f"input must have shape [N, {n_dims}], got {tuple(x.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"input must lie in [0, 1]; got values in [{float(x.min())}, {float(x.max())}]")


def _trilinear(volume: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """volume: [1, C, R, R, R] (indexed z, y, x); x: [N, 3] in [0,1] -> [N, C]."""
    grid = (x * 2.0 - 1.0).view(1, -1, 1, 1, 3).to(volume.dtype)
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(volume.shape[1], -1).t()


class DenseGridEncoding3D(nn.Module):
    """x: [N,3] in [0,1] -> [N, len(resolutions)·n_features]."""

    def __init__(self, resolutions: list[int], n_features: int, init_scale: float = 1e-4):
        super().__init__()
        self.volumes = nn.ParameterList(
            nn.Parameter(torch.empty(1, n_features, r, r, r).uniform_(-init_scale, init_scale)) for r in resolutions
        )
        self.n_output_dims = n_features * len(resolutions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check(x, 3)
        return torch.cat([_trilinear(v, x) for v in self.volumes], dim=-1)


class DenseGridEncoding4D(nn.Module):
    """xt: [N,4] in [0,1] (x, y, z, t) -> [N, len(resolutions)·n_features].

    Per level a stack of T volumes [T, F, R, R, R] along time. Points are grouped by their time (a
    rendered view has one time, so a training batch has at most 16 distinct times); each group reads
    only its two neighbouring time slices, then interpolates linearly in t.
    """

    def __init__(self, resolutions: list[int], n_features: int, time_resolution: int, init_scale: float = 1e-4):
        super().__init__()
        if time_resolution < 2:
            raise ValueError(f"time_resolution must be >= 2, got {time_resolution}")
        self.n_features, self.time_resolution = n_features, time_resolution
        self.volumes = nn.ParameterList(
            nn.Parameter(torch.empty(time_resolution, n_features, r, r, r).uniform_(-init_scale, init_scale))
            for r in resolutions
        )
        self.n_output_dims = n_features * len(resolutions)

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        _check(xt, 4)
        times, group = torch.unique(xt[:, 3], return_inverse=True)
        out = xt.new_empty(xt.shape[0], self.n_output_dims)
        for k, t in enumerate(times.tolist()):
            rows = (group == k).nonzero().squeeze(1)
            pos = t * (self.time_resolution - 1)
            i0 = min(int(pos), self.time_resolution - 2)
            w = pos - i0
            x = xt.index_select(0, rows)[:, :3]
            grid = (x * 2.0 - 1.0).view(1, -1, 1, 1, 3).expand(2, -1, -1, -1, -1)
            feats = []
            for volume in self.volumes:
                pair = F.grid_sample(volume[i0 : i0 + 2], grid.to(volume.dtype), mode="bilinear",
                                     padding_mode="border", align_corners=True).flatten(2)  # [2, F, n]
                feats.append((pair[0] * (1.0 - w) + pair[1] * w).t())
            out = out.index_copy(0, rows, torch.cat(feats, dim=-1))
        return out
