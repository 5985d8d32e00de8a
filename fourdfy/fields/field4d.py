"""The 4D radiance field: static 3D features + dynamic 4D features, then two small MLP heads.

f(x, t) = f_static(x) + f_dynamic(x, t)  (element-wise sum, paper §3.1 "4D Neural Rendering"), or with
field.dynamic=deformation f(x, t) = f_static(x + Δ(x, t)) (the authors' newer recipe, fourdfy/fields/deformation.py)
σ = softplus(density_head(f) + b(x)),  b(x) = blob_density·(1 − ‖x‖/blob_std)  ("blob_magic3d")
rgb = sigmoid(color_head(f))            (no view dependence, no shading)

The two encodings are injected, so the same class is the hash-grid field of the paper and the
HexPlane field of the Table-2 ablation; the optimiser sees the roles through :meth:`param_groups`.

Activation checkpointing (``checkpoint_chunk``): under autograd the field is evaluated in chunks of
samples, each under ``torch.utils.checkpoint``, so only each chunk's inputs (x, t) are kept for backward
and the chunk's forward is recomputed there. See :meth:`Field4D.forward` for why the whole forward is
checkpointed rather than only the heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fourdfy.clock import Scheduled
from fourdfy.enums import StrChoice
from fourdfy.fields.background import BackgroundConfig
from fourdfy.fields.deformation import Deformation, DeformationConfig
from fourdfy.fields.dense import DenseGridConfig
from fourdfy.fields.hashgrid import HashGridConfig
from fourdfy.fields.hexplane import HexPlaneConfig
from fourdfy.kinds import ParamGroup


@dataclass
class HeadsConfig:
    """Density and colour MLPs (authors' config: geometry.mlp_network_config)."""

    hidden_dim: int = 64  # n_neurons: 64
    n_hidden_layers: int = 1  # n_hidden_layers: 1 -> Linear(32→64) → ReLU → Linear(64→out)
    blob_density: float = 10.0  # density_blob_scale: 10.0 ("blob_magic3d")
    blob_std: float = 0.5  # density_blob_std: 0.5; stage 3 anneals it (schedule.blob_std_stage3_end)


class FieldKind(StrChoice):
    """Which encodings the field sums."""

    hashgrid = "hashgrid"  # static 3D + dynamic 4D multiresolution hash grids (the paper)
    hexplane = "hexplane"  # six feature planes (Table 2's "w/ HexPlane" ablation)
    dense = "dense"  # dense grid_sample grids: the CPU fast path of the toy world


class DynamicKind(StrChoice):
    """How the field moves: dynamic features summed onto the static ones, or a displacement into the static field."""

    grid = "grid"  # f_static(x) + f_dynamic(x, t): the paper's 4D hash grid (or HexPlane's time planes, dense grid)
    deformation = "deformation"  # f_static(x + Δ(x, t)): HashGridSpatialTimeDeform (configs/*_deformation.yaml)


@dataclass
class FieldConfig:
    """The 4D field: which encodings, the heads, the background (built by fourdfy.build.build_field)."""

    kind: FieldKind = FieldKind.hashgrid  # hashgrid (the paper), hexplane (Table-2 ablation), dense (CPU fast path)
    dynamic: DynamicKind = DynamicKind.grid  # grid (the paper: summed 4D features) or deformation (Δ of x)
    static_grid: HashGridConfig = dc_field(default_factory=HashGridConfig)  # 3D grid of x
    dynamic_grid: HashGridConfig = dc_field(default_factory=HashGridConfig)  # 4D grid of (x, t)
    hexplane: HexPlaneConfig = dc_field(default_factory=HexPlaneConfig)  # used when kind = hexplane
    dense: DenseGridConfig = dc_field(default_factory=DenseGridConfig)  # used when kind = dense
    deformation: DeformationConfig = dc_field(default_factory=DeformationConfig)  # used when dynamic = deformation
    heads: HeadsConfig = dc_field(default_factory=HeadsConfig)  # density and colour MLPs, density blob
    background: BackgroundConfig = dc_field(default_factory=BackgroundConfig)  # background MLP
    box_radius: float = 1.0  # scene box [-1, 1]^3 (authors' system.geometry.radius: 1.0)
    checkpoint_chunk: int | None = None  # samples per recomputed-in-backward chunk (keeps only x, t); None = off

    def validate(self) -> None:
        """Raise ValueError naming the key for a value out of range."""
        if self.checkpoint_chunk is not None and self.checkpoint_chunk < 1:
            raise ValueError(
                f"field.checkpoint_chunk must be >= 1 (samples per recomputed chunk) or null (off), "
                f"got {self.checkpoint_chunk}"
            )
        if self.heads.hidden_dim < 1:
            raise ValueError(f"field.heads.hidden_dim must be >= 1, got {self.heads.hidden_dim}")
        if not self.box_radius > 0:
            raise ValueError(f"field.box_radius must be > 0, got {self.box_radius}")
        if DynamicKind(self.dynamic) is DynamicKind.deformation:
            if FieldKind(self.kind) is FieldKind.hexplane:
                raise ValueError(
                    "field.dynamic=deformation needs a 3D grid to displace x into, but field.kind=hexplane; set "
                    "field.kind=hashgrid (or dense on a CPU) or field.dynamic=grid"
                )
            dense = FieldKind(self.kind) is FieldKind.dense
            self.deformation.validate(len(self.deformation.dense_resolutions) if dense
                                      else self.deformation.grid.n_levels)


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
        dynamic_encoding: module mapping [N,4] in [0,1] (x, y, z, t) to [N,C] (same C), summed onto the static
            features; None when ``deformation`` is given.
        heads: MLP and density-bias settings.
        box_radius: half-size of the scene box [-r, r]^3; points outside have zero density.
        checkpoint_chunk: samples per activation-checkpointed chunk when a graph is recorded; None
            evaluates in one piece and keeps every activation for backward (the default).
        blob_std: the density blob's std as a quantity scheduled on the run's clock (annealed in stage 3);
            None holds ``heads.blob_std``.
        deformation: Δ(x, t) [N,3] in unit-cube coordinates; the static encoding is then read at
            clamp(x + Δ, 0, 1) and nothing is summed (``dynamic_encoding`` must be None).
    """

    def __init__(
        self,
        static_encoding: nn.Module,
        dynamic_encoding: nn.Module | None,
        heads: HeadsConfig | None = None,
        box_radius: float = 1.0,
        checkpoint_chunk: int | None = None,
        blob_std: Scheduled | None = None,
        deformation: Deformation | None = None,
    ):
        super().__init__()
        if checkpoint_chunk is not None and (
            isinstance(checkpoint_chunk, bool) or not isinstance(checkpoint_chunk, int) or checkpoint_chunk < 1
        ):
            raise ValueError(
                "checkpoint_chunk must be a positive int (samples recomputed together in backward) or None "
                f"(no activation checkpointing), got {checkpoint_chunk!r}"
            )
        if (dynamic_encoding is None) == (deformation is None):
            raise ValueError("give exactly one of dynamic_encoding (summed features) and deformation (displacement)")
        heads = heads or HeadsConfig()
        n_features = static_encoding.n_output_dims
        if dynamic_encoding is not None and dynamic_encoding.n_output_dims != n_features:
            raise ValueError(
                f"static and dynamic encodings must have the same output width to be summed, got "
                f"{n_features} and {dynamic_encoding.n_output_dims}"
            )
        self.static_encoding = static_encoding
        self.dynamic_encoding = dynamic_encoding
        self.deformation = deformation
        self.density_head = _mlp(n_features, heads.hidden_dim, heads.n_hidden_layers, 1)
        self.color_head = _mlp(n_features, heads.hidden_dim, heads.n_hidden_layers, 3)
        self.blob_density = heads.blob_density
        # A function of the iteration, not state: restored by resuming the iteration (the clock).
        self._blob_std_fixed = heads.blob_std
        self._blob_std_scheduled = blob_std
        self.box_radius = box_radius
        self.checkpoint_chunk = checkpoint_chunk

    @property
    def blob_std(self) -> float:
        """The density blob's std now: the scheduled value at the clock's iteration, else heads.blob_std."""
        if self._blob_std_scheduled is None:
            return self._blob_std_fixed
        return self._blob_std_scheduled.value()

    def features(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N,3] world, t: [N] -> (features [N,C], inside-box mask [N])."""
        _check_inputs(x, t)
        unit = (x / self.box_radius + 1.0) * 0.5
        inside = ((unit >= 0) & (unit <= 1)).all(dim=-1)
        # Samples outside the box are evaluated at the box surface and then masked to zero density:
        # explicit, so the encodings' own range check stays strict.
        unit = unit.clamp(0.0, 1.0)
        if self.deformation is not None:
            return self.static_encoding(self._displaced(unit, t)), inside
        f_static = self.static_encoding(unit)
        f_dynamic = self.dynamic_encoding(torch.cat([unit, t[:, None].to(unit.dtype)], dim=-1))
        return f_static + f_dynamic, inside

    def _displaced(self, unit: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """unit: [N,3] in [0,1], t: [N] -> x + Δ(x, t) [N,3], clamped to [0,1].

        The authors add Δ unclamped (tiny-cuda-nn reads any coordinate); our encodings refuse points outside
        the unit cube, so a point displaced out of it reads the box surface (zero gradient to Δ there).
        """
        return (unit + self.deformation(unit, t)).clamp(0.0, 1.0)

    def displacement(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [N,3] world, t: [N] -> Δ(x, t) [N,3] in unit-cube coordinates (world Δ = 2·box_radius·this),
        the tensor the authors' lambda_deformation composites and penalises; zeros without a deformation."""
        _check_inputs(x, t)
        if self.deformation is None:
            return x.new_zeros(x.shape)
        unit = ((x / self.box_radius + 1.0) * 0.5).clamp(0.0, 1.0)
        return self.deformation(unit, t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N,3] world, t: [N] in [0,1] -> (density [N] >= 0, rgb [N,3] in [0,1]).

        With ``checkpoint_chunk`` set and a graph being recorded, the samples are evaluated in chunks of
        that many, each under non-reentrant ``torch.utils.checkpoint``: a chunk keeps only its (x, t) for
        backward, and its forward is recomputed when backward reaches it. Outputs and gradients equal the
        unchunked ones bitwise when N <= chunk, else to float32 round-off (CPU kernels block by row count,
        and parameter gradients are summed chunk by chunk).

        Why the whole forward and not only the heads: the hash grid's autograd Function already saves
        only its input, yet without checkpointing a sample keeps 689 B for backward (measured, paper-size
        field), almost all the summed features [32] and the two heads' hidden layers [2 x 64]: 22.7 GiB at
        the 35.4 M samples of a paper VID step. Checkpointing only the heads still keeps the features and
        both grids' inputs, 185 B (6.1 GiB); checkpointing everything keeps the outputs and the chunks'
        (x, t), 32 B (1.05 GiB). For a ≤ 24 GB video step those 5 GiB matter more than the price, one more
        encoding forward per backward (the grids' random gathers): 1.34x the field's forward + backward
        time on CPU, vs ~1.0x for heads only (``python -m bench.field_memory``, 2^17 samples, chunk 2^15).
        Under no_grad / inference mode, or with nothing requiring grad, there is nothing to keep, so the
        plain forward runs without chunks or checkpoint overhead.
        """
        _check_inputs(x, t)
        # Bound now, not read again in backward: the clock may move on before the recomputation.
        blob_std = self.blob_std
        chunk = self.checkpoint_chunk
        if chunk is None or x.shape[0] == 0 or not self._records_graph(x, t):
            return self._evaluate(x, t, blob_std)
        pieces = [
            # preserve_rng_state=False: the field draws no random numbers, so stashing and restoring the
            # CPU/CUDA generators per chunk would be pure overhead.
            checkpoint(self._evaluate, x[start : start + chunk], t[start : start + chunk], blob_std,
                       use_reentrant=False, preserve_rng_state=False)
            for start in range(0, x.shape[0], chunk)
        ]
        if len(pieces) == 1:
            return pieces[0]
        return torch.cat([d for d, _ in pieces]), torch.cat([c for _, c in pieces])

    def heads(
        self, features: torch.Tensor, x: torch.Tensor, inside: torch.Tensor, blob_std: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features: [N,C], x: [N,3] world, inside: [N] bool -> (density [N], rgb [N,3])."""
        raw = self.density_head(features).squeeze(-1)
        bias = self.blob_density * (1.0 - x.norm(dim=-1) / blob_std)
        density = F.softplus(raw + bias) * inside
        rgb = torch.sigmoid(self.color_head(features))
        return density, rgb

    def _evaluate(self, x: torch.Tensor, t: torch.Tensor, blob_std: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The field on x: [N,3], t: [N] in one piece (the unit that is checkpointed)."""
        features, inside = self.features(x, t)
        return self.heads(features, x, inside, blob_std)

    def _records_graph(self, x: torch.Tensor, t: torch.Tensor) -> bool:
        """True when this call builds an autograd graph, i.e. when activations would be kept."""
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or t.requires_grad or any(p.requires_grad for p in self.parameters())

    def param_groups(self) -> dict[ParamGroup, list[nn.Parameter]]:
        """Parameters by role: the hybrid schedule trains DYNAMIC (the 4D grid, or the whole deformation
        network: its 4D encoding and MLP) only on video steps."""
        dynamic = self.dynamic_encoding if self.deformation is None else self.deformation
        return {
            ParamGroup.STATIC: list(self.static_encoding.parameters()),
            ParamGroup.DYNAMIC: list(dynamic.parameters()),
            ParamGroup.HEADS: list(self.density_head.parameters()) + list(self.color_head.parameters()),
        }


def _check_inputs(x: torch.Tensor, t: torch.Tensor) -> None:
    if x.ndim != 2 or x.shape[-1] != 3:
        raise ValueError(f"x must have shape [N, 3], got {tuple(x.shape)}")
    if t.shape != x.shape[:1]:
        raise ValueError(f"t must have shape [N] = [{x.shape[0]}], got {tuple(t.shape)}")
