"""The 4D radiance field: static 3D features + dynamic 4D features, then two small MLP heads.

f(x, t) = f_static(x) + f_dynamic(x, t)  (element-wise sum, REFERENCE.md §Representation)
σ = softplus(density_head(f) + b(x)),  b(x) = blob_density·(1 − ‖x‖/blob_std)  ("blob_magic3d")
rgb = sigmoid(color_head(f))            (no view dependence, no shading)

The two encodings are injected, so the same class is the hash-grid field of the paper and the
HexPlane field of the Table-2 ablation; the optimiser sees the roles through :meth:`param_groups`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class HeadsConfig:
    """Density and colour MLPs (authors' config: geometry.mlp_network_config)."""

    hidden_dim: int = 64  # n_neurons: 64
    n_hidden_layers: int = 1  # n_hidden_layers: 1 -> Linear(32→64) → ReLU → Linear(64→out)
    blob_density: float = 10.0  # density_blob_scale: 10.0 ("blob_magic3d")
    blob_std: float = 0.5  # density_blob_std: 0.5; stage 3 anneals it towards 5.0 (REFERENCE.md)


def _mlp(width_in: int, hidden: int, n_hidden: int, width_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n_hidden):
        layers += [nn.Linear(width_in, hidden, bias=False), nn.ReLU()]
        width_in = hidden
    layers.append(nn.Linear(width_in, width_out, bias=False))  # official fork: no biases
    return nn.Sequential(*layers)


class Field4D(nn.Module):
    """(x [N,3] world coords in the scene box, t [N] in [0,1]) -> (density [N], rgb [N,3]).

    Args:
        static_encoding: module mapping [N,3] in [0,1] to [N,C].
        dynamic_encoding: module mapping [N,4] in [0,1] (x, y, z, t) to [N,C] (same C).
        heads: MLP and density-bias settings.
        box_radius: half-size of the scene box [-r, r]^3; points outside have zero density.
    """

    def __init__(
        self,
        static_encoding: nn.Module,
        dynamic_encoding: nn.Module,
        heads: HeadsConfig | None = None,
        box_radius: float = 1.0,
    ):
        super().__init__()
        heads = heads or HeadsConfig()
        n_features = static_encoding.n_output_dims
        if dynamic_encoding.n_output_dims != n_features:
            raise ValueError(
                f"static and dynamic encodings must have the same output width to be summed, got "
                f"{n_features} and {dynamic_encoding.n_output_dims}"
            )
        self.static_encoding = static_encoding
        self.dynamic_encoding = dynamic_encoding
        self.density_head = _mlp(n_features, heads.hidden_dim, heads.n_hidden_layers, 1)
        self.color_head = _mlp(n_features, heads.hidden_dim, heads.n_hidden_layers, 3)
        self.blob_density = heads.blob_density
        # Set every iteration by the schedule (annealed in stage 3); a plain attribute, not state,
        # because it is a function of the iteration and so restored by resuming the iteration.
        self.blob_std = heads.blob_std
        self.box_radius = box_radius

    def features(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N,3] world, t: [N] -> (features [N,C], inside-box mask [N])."""
        if x.ndim != 2 or x.shape[-1] != 3:
            raise ValueError(f"x must have shape [N, 3], got {tuple(x.shape)}")
        if t.shape != x.shape[:1]:
            raise ValueError(f"t must have shape [N] = [{x.shape[0]}], got {tuple(t.shape)}")
        unit = (x / self.box_radius + 1.0) * 0.5
        inside = ((unit >= 0) & (unit <= 1)).all(dim=-1)
        # Samples outside the box are evaluated at the box surface and then masked to zero density:
        # explicit, so the encodings' own range check stays strict.
        unit = unit.clamp(0.0, 1.0)
        f_static = self.static_encoding(unit)
        f_dynamic = self.dynamic_encoding(torch.cat([unit, t[:, None].to(unit.dtype)], dim=-1))
        return f_static + f_dynamic, inside

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, inside = self.features(x, t)
        raw = self.density_head(features).squeeze(-1)
        bias = self.blob_density * (1.0 - x.norm(dim=-1) / self.blob_std)
        density = F.softplus(raw + bias) * inside
        rgb = torch.sigmoid(self.color_head(features))
        return density, rgb

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role: the hybrid schedule trains "dynamic" only on video steps."""
        return {
            "static": list(self.static_encoding.parameters()),
            "dynamic": list(self.dynamic_encoding.parameters()),
            "heads": list(self.density_head.parameters()) + list(self.color_head.parameters()),
        }
