"""The environment behind the object: a view-direction MLP (authors' configs/fourdfy_stage_*.yaml
``background_type: neural-environment-map-background``).

threestudio's "neural-environment-map-background" as used by 4D-fy: spherical-harmonics encoding of the ray
direction (tcnn SphericalHarmonics "degree" 3 = bands 0-2, 9 coefficients) → MLP with 2 hidden layers of 16 →
sigmoid.
During training the trainer swaps it for a random solid colour half of the time, which stops the
background from explaining the object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BackgroundConfig:
    """Background MLP settings (authors' config: background.mlp_network_config)."""

    hidden_dim: int = 16  # n_neurons: 16
    n_hidden_layers: int = 2  # n_hidden_layers: 2
    random_color_prob: float = 0.5  # random_aug_prob: 0.5 — solid random colour instead of the MLP in training
    # tiny-cuda-nn SphericalHarmonics degree (degree² coefficients): threestudio/models/background/
    # neural_environment_map_background.py dir_encoding_config {"otype": "SphericalHarmonics", "degree": 3} -> 9.
    sh_degree: int = 3

    def validate(self) -> None:
        if not 1 <= self.sh_degree <= 4:
            raise ValueError(f"field.background.sh_degree must be in 1..4 (degree² coefficients), got {self.sh_degree}")


def spherical_harmonics(directions: torch.Tensor, degree: int = 4) -> torch.Tensor:
    """Real spherical harmonics of bands 0..degree−1, band by band (tiny-cuda-nn's "SphericalHarmonics" with
    that degree: degree² terms; the first 9 of the 16 are degree 3's).

    directions: [N, 3] unit vectors -> [N, degree²].
    """
    x, y, z = directions.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    xy, yz, xz = x * y, y * z, x * z
    return torch.stack(
        [
            torch.full_like(x, 0.28209479177387814),
            -0.48860251190291987 * y,
            0.48860251190291987 * z,
            -0.48860251190291987 * x,
            1.0925484305920792 * xy,
            -1.0925484305920792 * yz,
            0.94617469575755997 * zz - 0.31539156525251999,
            -1.0925484305920792 * xz,
            0.54627421529603959 * (xx - yy),
            0.59004358992664352 * y * (-3.0 * xx + yy),
            2.8906114426405538 * xy * z,
            0.45704579946446572 * y * (1.0 - 5.0 * zz),
            0.3731763325901154 * z * (5.0 * zz - 3.0),
            0.45704579946446572 * x * (1.0 - 5.0 * zz),
            1.4453057213202769 * z * (xx - yy),
            0.59004358992664352 * x * (-xx + 3.0 * yy),
        ],
        dim=-1,
    )[:, : degree * degree]


class BackgroundMLP(nn.Module):
    """directions [N, 3] (unit) -> rgb [N, 3] in [0, 1]."""

    def __init__(self, cfg: BackgroundConfig | None = None):
        super().__init__()
        cfg = cfg or BackgroundConfig()
        cfg.validate()
        self.sh_degree = cfg.sh_degree
        layers: list[nn.Module] = []
        width_in = cfg.sh_degree**2
        for _ in range(cfg.n_hidden_layers):
            layers += [nn.Linear(width_in, cfg.hidden_dim, bias=False), nn.ReLU()]
            width_in = cfg.hidden_dim
        layers.append(nn.Linear(width_in, 3, bias=False))
        self.mlp = nn.Sequential(*layers)

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        if directions.ndim != 2 or directions.shape[-1] != 3:
            raise ValueError(f"directions must have shape [N, 3], got {tuple(directions.shape)}")
        return torch.sigmoid(self.mlp(spherical_harmonics(directions, self.sh_degree)))
