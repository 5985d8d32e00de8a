"""HexPlane encodings for the Table-2 "HexPlane" ablation (paper §5, following HexPlane / K-Planes).

Six multi-scale feature planes: xy, xz, yz (static part) and xt, yt, zt (dynamic part). Each part is
an encoding module with the same interface as the hash grid ([N,D] in [0,1] -> [N,C]), so
:class:`fourdfy.fields.field4d.Field4D` combines them exactly as it combines the two hash grids
(f = f_static + f_dynamic), and the hybrid schedule freezes the dynamic planes the same way.

Within a part the three planes are multiplied (K-Planes' Hadamard product, which lets a plane
factorisation represent localised content); scales are concatenated. The time planes start at 1 and
the dynamic part subtracts 1, so the dynamic contribution is exactly 0 at initialisation, as the
frozen-at-init hash grid's is ~0. The time planes are stored as offsets from 1 (initialised to 0), so
AdamW's weight decay pulls them towards "no motion" rather than towards −1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class HexPlaneConfig:
    """Plane sizes; choose them to match the hash grid's parameter count (memory-matched ablation)."""

    # Spatial resolution per scale. Paper §4.3: the HexPlane ablation's planes are "increased ... to match the
    # memory consumption" of the hash grids: [112, 224, 448, 896] x 8 features, time 64 give 28,170,240
    # parameters vs 28,074,608 for the two default hash grids (+0.34%; tests/test_hexplane_size in test_field4d.py).
    resolutions: list[int] = field(default_factory=lambda: [112, 224, 448, 896])
    time_resolution: int = 64  # samples along t for the xt/yt/zt planes
    n_features: int = 8  # channels per plane and scale; output width = n_features·len(resolutions)
    init_low: float = 0.1  # K-Planes spatial-plane init U[0.1, 0.5]
    init_high: float = 0.5


def _sample_plane(plane: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """plane: [C,H,W]; uv: [N,2] in [0,1] (u along W, v along H) -> [N,C] bilinear, align_corners."""
    grid = (uv * 2.0 - 1.0).view(1, -1, 1, 2).to(plane.dtype)
    out = F.grid_sample(plane[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, :, :, 0].transpose(0, 1)


def _check_unit(x: torch.Tensor, n_dims: int, name: str) -> None:
    if x.ndim != 2 or x.shape[-1] != n_dims:
        raise ValueError(f"{name} must have shape [N, {n_dims}], got {tuple(x.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"{name} must lie in [0, 1] (map the scene box first); got [{x.min()}, {x.max()}]")


class TriPlaneEncoding(nn.Module):
    """Static part: xy, xz, yz planes. x: [N,3] in [0,1] -> [N, n_features·n_scales]."""

    _axes = ((0, 1), (0, 2), (1, 2))

    def __init__(self, cfg: HexPlaneConfig):
        super().__init__()
        self.planes = nn.ParameterList()
        for res in cfg.resolutions:
            for _ in self._axes:
                p = torch.empty(cfg.n_features, res, res).uniform_(cfg.init_low, cfg.init_high)
                self.planes.append(nn.Parameter(p))
        self.n_scales = len(cfg.resolutions)
        self.n_output_dims = cfg.n_features * self.n_scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_unit(x, 3, "x")
        outs = []
        for s in range(self.n_scales):
            prod = None
            for k, (a, b) in enumerate(self._axes):
                f = _sample_plane(self.planes[3 * s + k], x[:, [a, b]])
                prod = f if prod is None else prod * f
            outs.append(prod)
        return torch.cat(outs, dim=-1)


class TimePlaneEncoding(nn.Module):
    """Dynamic part: xt, yt, zt planes. xt: [N,4] in [0,1] -> [N, n_features·n_scales], 0 at init."""

    def __init__(self, cfg: HexPlaneConfig):
        super().__init__()
        self.planes = nn.ParameterList()
        for res in cfg.resolutions:
            for _ in range(3):
                self.planes.append(nn.Parameter(torch.zeros(cfg.n_features, cfg.time_resolution, res)))
        self.n_scales = len(cfg.resolutions)
        self.n_output_dims = cfg.n_features * self.n_scales

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        _check_unit(xt, 4, "xt")
        outs = []
        for s in range(self.n_scales):
            prod = None
            for k in range(3):
                f = 1.0 + _sample_plane(self.planes[3 * s + k], xt[:, [k, 3]])
                prod = f if prod is None else prod * f
            outs.append(prod - 1.0)
        return torch.cat(outs, dim=-1)
