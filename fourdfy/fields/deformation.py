"""Deformation-based motion: a 4D encoding of (x, t) and an MLP predict a displacement Δ(x, t) of x into the
static canonical field (the authors' newer recipe, ``HashGridSpatialTimeDeform``).

Authors (threestudio/models/networks.py ``TCNNEncodingSpatialTimeDeform``): the input x of the geometry's
encoding, already contracted to the unit cube [0, 1]³ (geometry/implicit_volume.py ``contract_to_unisphere``),
becomes x + Δ with Δ = time_network(encoding_time([x, t])), added unscaled and unclamped; the *static* 3D hash
grid is then read at x + Δ and its features alone feed the density/colour MLPs (no dynamic features are
summed). The density blob is evaluated at the undisplaced point (``get_activated_density(points_unscaled)``).
The time network is a ``VanillaMLP`` (16 → 64 → ReLU → 64 → ReLU → 3, no biases, no output activation).

Progressive levels (issue #19): the encoding's output columns of levels ≥ k are multiplied by 0, k =
min(start_level + max(step − start_step, 0) // update_steps, n_levels) at the stage-local step of stage 3
(the rule of networks.py ``ProgressiveBandHashGrid.update_step``). Note: the authors' configs name this rule
(``start_level: 4``, ``update_steps: 500``) but select ``otype: Grid``, which ``get_encoding`` builds as a
plain tiny-cuda-nn grid, so in their code all 8 levels are active from the first step; ``start_level`` =
the level count reproduces that.

``lambda_deformation`` (threestudio/systems/fourdfy.py): a total-variation loss on the *rendered* displacement,
Δ composited along each ray with the volume-rendering weights like a colour (renderers/mask_nerf_renderer.py
``deformation``), over frames, rows and columns of a video step: :func:`deformation_tv`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field

import torch
from torch import nn

from fourdfy.clock import Clock
from fourdfy.fields.hashgrid import HashGridConfig

# configs/fourdfy_stage_3_vc_deformation.yaml geometry.pos_encoding_config.time_encoding_config
_TIME_GRID = dict(n_levels=8, n_features_per_level=2, log2_hashmap_size=19, base_resolution=4,
                  per_level_scale=1.447269237440378)


@dataclass
class DeformationConfig:
    """The deformation network (authors' configs/fourdfy_stage_3_vc_deformation.yaml
    geometry.pos_encoding_config.time_encoding_config / time_network_config)."""

    # 4D hash grid of (x, t): n_levels 8, n_features_per_level 2, log2_hashmap_size 19, base_resolution 4,
    # per_level_scale 1.447269237440378 (time_encoding_config; otype Grid, type Hash)
    grid: HashGridConfig = dc_field(default_factory=lambda: HashGridConfig(**_TIME_GRID))
    start_level: int = 4  # time_encoding_config.start_level: 4 (levels active at the first stage-3 step)
    start_step: int = 0  # time_encoding_config.start_step: 0 (stage-local step where levels start to grow)
    update_steps: int = 500  # time_encoding_config.update_steps: 500 (one more level every 500 steps)
    hidden_dim: int = 64  # time_network_config.n_neurons: 64
    n_hidden_layers: int = 2  # time_network_config.n_hidden_layers: 2 (VanillaMLP, no biases)
    # CPU fast path (field.kind=dense), our choice: 8 dense 4D levels like the hash grid's 8, coarser at the top
    # (the hash grid's dense levels are 4, 6, 9, 13, 18, 26; a toy scene's motion needs no finer ones).
    dense_resolutions: list[int] = dc_field(default_factory=lambda: [3, 4, 6, 8, 11, 16, 22, 32])
    dense_time_resolution: int = 16  # samples along t of the dense 4D grid (the 16 frame times)

    def validate(self, n_levels: int) -> None:
        """ValueError naming the key; ``n_levels``: levels of the encoding in use (hash or dense)."""
        if not 1 <= self.start_level <= n_levels:
            raise ValueError(f"field.deformation.start_level must be in [1, {n_levels}] (levels of the deformation "
                             f"encoding in use), got {self.start_level}")
        if self.update_steps < 1:
            raise ValueError(f"field.deformation.update_steps must be >= 1 (steps per added level), "
                             f"got {self.update_steps}")
        if self.start_step < 0:
            raise ValueError(f"field.deformation.start_step must be >= 0, got {self.start_step}")
        if self.hidden_dim < 1 or self.n_hidden_layers < 0:
            raise ValueError(f"field.deformation.hidden_dim must be >= 1 and n_hidden_layers >= 0, got "
                             f"{self.hidden_dim} and {self.n_hidden_layers}")
        if not self.dense_resolutions or min(self.dense_resolutions) < 2 or self.dense_time_resolution < 2:
            raise ValueError(f"field.deformation.dense_resolutions must be a non-empty list of values >= 2 and "
                             f"dense_time_resolution >= 2, got {self.dense_resolutions} and "
                             f"{self.dense_time_resolution}")


def active_levels(step: int, start_level: int, n_levels: int, update_steps: int, start_step: int = 0) -> int:
    """Levels active at a stage-local step: min(start_level + max(step − start_step, 0) // update_steps,
    n_levels) (networks.py ProgressiveBandHashGrid.update_step). Negative steps (before the stage) count as 0."""
    return min(start_level + max(step - start_step, 0) // update_steps, n_levels)


@dataclass(frozen=True)
class ProgressiveLevels:
    """The active level count at the clock's moment: the count of stage 3's stage-local step, and of its
    step 0 before stage 3 (the deformation trains only in stage 3, on VID updates). A function of the
    iteration, not state: a resumed or reloaded run gets it back from its clock."""

    clock: Clock
    start_level: int  # time_encoding_config.start_level
    n_levels: int  # levels of the encoding
    update_steps: int  # time_encoding_config.update_steps
    start_step: int = 0  # time_encoding_config.start_step

    def value(self) -> int:
        moment = self.clock.moment()
        step = moment.stage_step if moment.stage == 3 else 0
        return active_levels(step, self.start_level, self.n_levels, self.update_steps, self.start_step)

    __call__ = value  # Deformation asks any zero-argument callable for the count


class Deformation(nn.Module):
    """(x [N,3] in [0,1], t [N] in [0,1]) -> Δ [N,3], in the same unit-cube coordinates as x.

    Args:
        encoding: [N,4] in [0,1] -> [N, n_levels·F], columns level-major (level l at l·F … l·F + F − 1), as
            both HashGridEncoding and DenseGridEncoding4D lay them out.
        n_levels: levels of ``encoding``.
        hidden_dim, n_hidden_layers: the MLP (no biases, ReLU, linear output).
        levels: gives the active level count now (e.g. :class:`ProgressiveLevels`); None: all levels.
    """

    def __init__(self, encoding: nn.Module, n_levels: int, hidden_dim: int = 64, n_hidden_layers: int = 2,
                 levels: Callable[[], int] | None = None):
        super().__init__()
        if encoding.n_output_dims % n_levels:
            raise ValueError(f"encoding width {encoding.n_output_dims} is not a multiple of n_levels={n_levels}")
        self.encoding = encoding
        self.n_levels = n_levels
        self.n_features = encoding.n_output_dims // n_levels
        layers: list[nn.Module] = []
        width = encoding.n_output_dims
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(width, hidden_dim, bias=False), nn.ReLU()]
            width = hidden_dim
        layers.append(nn.Linear(width, 3, bias=False))  # VanillaMLP: bias=False, no output activation
        self.network = nn.Sequential(*layers)
        self._levels = levels

    def active_levels(self) -> int:
        """Levels whose features reach the MLP now."""
        return self.n_levels if self._levels is None else self._levels()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [N,3] in [0,1], t: [N] -> Δ [N,3]."""
        enc = self.encoding(torch.cat([x, t[:, None].to(x.dtype)], dim=-1))
        k = self.active_levels()
        if k < self.n_levels:
            # Multiplied by the mask, as the authors do: masked levels get zero features and zero gradient.
            mask = (torch.arange(enc.shape[-1], device=enc.device) < k * self.n_features).to(enc.dtype)
            enc = enc * mask
        return self.network(enc)


def deformation_tv(displacement: torch.Tensor) -> torch.Tensor:
    """The authors' ``lambda_deformation`` term (utils/ops.py TVLoss on ``out["deformation"].permute(3,0,1,2)``).

    displacement: [F, H, W, 3], the rendered Δ of F frames (Σ_i w_i Δ_i per ray). Returns the sum over
    frame pairs, rows and columns of squared neighbour differences summed over the 3 components
    (their 3 · mean over components), i.e. Σ‖Δ[f+1]−Δ[f]‖² + Σ‖Δ[:,h+1]−Δ[:,h]‖² + Σ‖Δ[:,:,w+1]−Δ[:,:,w]‖².
    A single frame has no time term.
    """
    if displacement.ndim != 4 or displacement.shape[-1] != 3:
        raise ValueError(f"displacement must be [frames, H, W, 3], got {tuple(displacement.shape)}")
    d = displacement
    return ((d[1:] - d[:-1]).square().sum() + (d[:, 1:] - d[:, :-1]).square().sum()
            + (d[:, :, 1:] - d[:, :, :-1]).square().sum())
