"""Multiresolution hash grid encoding, bit-compatible with tiny-cuda-nn's "HashGrid" (Instant-NGP).

The pure-PyTorch path is the reference (and the default); it reproduces tiny-cuda-nn's level sizes,
parameter layout, hashing and N-linear interpolation, so a state dict saved from a
``tinycudann.Encoding`` (key ``params``) loads unchanged and gives the same numbers. On a CUDA machine with
``tinycudann`` installed, ``backend="tcnn"`` runs the same parameters through the CUDA kernels.

Semantics (tiny-cuda-nn ``include/tiny-cuda-nn/encodings/grid.h``), per level ``l``:

- ``scale_l = exp2(l * log2(per_level_scale)) * base_resolution - 1`` in float32;
  ``res_l = ceil(scale_l) + 1``.
- Table size ``T_l = min(next_multiple_of_8(res_l^D), 2^log2_hashmap_size)``; tables are stored one after
  the other (``level_offsets`` is the running sum), each entry holding ``F`` contiguous features, so the
  flat parameter of feature ``f`` at entry ``i`` of level ``l`` is ``(offset_l + i) * F + f``.
- ``pos = scale_l * x + 0.5``, ``cell = floor(pos)``, ``frac = pos - cell``; the ``2^D`` corners
  ``cell + b`` (b in {0,1}^D) are weighted by ``prod_d (b_d ? frac_d : 1 - frac_d)``.
- A level is dense when ``res_l^D <= T_l``: ``index = (sum_d corner_d * res_l^d) % T_l`` (the +0.5 shift
  lets the upper corner reach ``res_l``, which wraps around, exactly as in tiny-cuda-nn). Otherwise it is
  hashed: ``index = (XOR_d corner_d * P_d mod 2^32) % T_l`` with ``P = (1, 2654435761, 805459861,
  3674653429)``.
- Output column ``l * F + f``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

# Hash primes of tiny-cuda-nn's `fast_hash` (grid.h); the first is 1 on purpose (memory coherence).
_TCNN_PRIMES = (1, 2654435761, 805459861, 3674653429)
# tiny-cuda-nn pads every level's table to a multiple of 8 entries (aligned memory accesses, grid.h).
_TABLE_ALIGNMENT = 8
# tiny-cuda-nn's GridEncoding::initialize_params: uniform in [-1e-4, 1e-4].
_TCNN_INIT_RANGE = 1e-4

Backend = Literal["torch", "tcnn"]


@dataclass(frozen=True)
class GridLayout:
    """Per-level sizes of a tiny-cuda-nn hash grid (all derived from the constructor arguments)."""

    scales: list[float]  # float32 value of scale_l = exp2(l*log2(pls))*base - 1, per level
    resolutions: list[int]  # res_l = ceil(scale_l) + 1, per level
    level_offsets: list[int]  # running sum of table sizes, length L+1 (in entries, not floats)
    hashed: list[bool]  # True where res_l^D exceeds the level's table (hash indexing)

    @property
    def table_sizes(self) -> list[int]:
        """Entries per level, [L]."""
        return [b - a for a, b in zip(self.level_offsets[:-1], self.level_offsets[1:], strict=True)]


def tcnn_grid_layout(
    n_input_dims: int, n_levels: int, log2_hashmap_size: int, base_resolution: int, per_level_scale: float
) -> GridLayout:
    """Level scales, resolutions and table offsets exactly as tiny-cuda-nn's GridEncodingTemplated computes them.

    tiny-cuda-nn evaluates ``exp2f(l * std::log2(per_level_scale)) * base_resolution - 1.0f`` in float32;
    each float32 step is reproduced here (log2/exp2 are evaluated in double and rounded once to float32,
    i.e. correctly rounded like glibc's log2f/exp2f).
    """
    f32 = np.float32
    log2_scale = f32(math.log2(float(f32(per_level_scale))))
    scales: list[float] = []
    resolutions: list[int] = []
    offsets = [0]
    hashed: list[bool] = []
    max_table = 1 << log2_hashmap_size
    for level in range(n_levels):
        exponent = f32(f32(level) * log2_scale)
        scale = f32(f32(f32(2.0 ** float(exponent)) * f32(base_resolution)) - f32(1.0))
        res = int(math.ceil(float(scale))) + 1
        dense_entries = res**n_input_dims
        padded = -(-dense_entries // _TABLE_ALIGNMENT) * _TABLE_ALIGNMENT
        table = min(padded, max_table)
        scales.append(float(scale))
        resolutions.append(res)
        offsets.append(offsets[-1] + table)
        hashed.append(dense_entries > table)
    return GridLayout(scales=scales, resolutions=resolutions, level_offsets=offsets, hashed=hashed)


@dataclass(frozen=True)
class _GridTables:
    """Device tensors the kernels need; built per call from the module's buffers (they follow `.to()`)."""

    scales: Tensor  # [L] in the compute dtype
    n_dense: int  # levels [0, n_dense) are dense, [n_dense, L) hashed (resolution grows with l)
    dense_corner_offsets: Tensor  # [Ld, C] int64: sum_d bit_d(c) * res^d
    dense_strides: Tensor  # [Ld, D] int64: res^d
    dense_table_sizes: Tensor  # [Ld, 1] int64
    dense_offsets: Tensor  # [Ld, 1] int64
    hashed_offsets: Tensor  # [Lh, 1] int64
    hash_mask: int  # 2^log2_hashmap_size - 1 (hashed tables always have exactly 2^log2 entries)


def _corner_bits(n_dims: int) -> list[list[int]]:
    """bits[c][d] for the 2^D corners; dim 0 is the most significant bit (matches the outer products)."""
    return [[(c >> (n_dims - 1 - d)) & 1 for d in range(n_dims)] for c in range(1 << n_dims)]


def _cells_and_fracs(x: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """x: [N, D], scales: [L] -> (cell [N, L, D] int64, frac [N, L, D] in [0, 1))."""
    if x.dtype == torch.float32:
        # tcnn evaluates pos with fmaf(scale, x, 0.5f), i.e. rounded once. scale * x is exact in float64
        # (24 + 24 significant bits), so float64 evaluation rounded once to float32 reproduces the fused
        # result; the unfused float32 expression differs by up to ~1e-5 at the finest levels.
        pos = (x.double().unsqueeze(1) * scales.double().view(1, -1, 1) + 0.5).float()
    else:
        pos = x.unsqueeze(1) * scales.view(1, -1, 1) + 0.5
    cell = torch.floor(pos)
    return cell.long(), pos - cell


def _outer_pairs(pairs: list[Tensor], combine: str) -> Tensor:
    """Outer product (`mul`) or outer XOR (`xor`) of D tensors [..., 2] -> [..., 2^D], dim 0 most significant."""
    acc = pairs[0]
    for pair in pairs[1:]:
        a, b = acc.unsqueeze(-1), pair.unsqueeze(-2)
        acc = (a * b if combine == "mul" else a ^ b).flatten(-2)
    return acc


def _corner_weights(frac: Tensor) -> Tensor:
    """frac: [N, L, D] -> N-linear corner weights [N, L, 2^D]."""
    return _outer_pairs([torch.stack((1.0 - f, f), dim=-1) for f in frac.unbind(-1)], "mul")


def _corner_indices(cell: Tensor, tables: _GridTables) -> Tensor:
    """cell: [N, L, D] int64 -> global table entry of every corner, [N, L, 2^D] int64."""
    parts: list[Tensor] = []
    nd = tables.n_dense
    if nd > 0:
        base = (cell[:, :nd] * tables.dense_strides).sum(-1, keepdim=True)  # [N, Ld, 1]
        idx = torch.remainder(base + tables.dense_corner_offsets, tables.dense_table_sizes)
        parts.append(idx + tables.dense_offsets)
    if nd < cell.shape[1]:
        hcell = cell[:, nd:]
        pairs = []
        for d, prime in enumerate(_TCNN_PRIMES[: cell.shape[-1]]):
            h = hcell[..., d] * prime if prime != 1 else hcell[..., d]
            pairs.append(torch.stack((h, h + prime), dim=-1))
        # XOR of the products in int64 has the same low 32 bits as tcnn's uint32 arithmetic, and the table
        # is a power of two, so `% T` is the low log2(T) bits.
        parts.append((_outer_pairs(pairs, "xor") & tables.hash_mask) + tables.hashed_offsets)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _encode(x: Tensor, table: Tensor, tables: _GridTables) -> Tensor:
    """x: [N, D], table: [n_entries, F] -> features [N, L*F]."""
    cell, frac = _cells_and_fracs(x, tables.scales)
    idx = _corner_indices(cell, tables)  # [N, L, C]
    w = _corner_weights(frac)  # [N, L, C]
    n, n_levels, n_corners = idx.shape
    vals = table.index_select(0, idx.view(-1)).view(n, n_levels, n_corners, -1)
    return (vals * w.unsqueeze(-1)).sum(2).view(n, -1)


def _encode_backward(
    x: Tensor, table: Tensor, grad_out: Tensor, tables: _GridTables, need_x: bool, need_params: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of `_encode` w.r.t. x [N, D] and table [n_entries, F], given grad_out [N, L*F].

    Written with differentiable torch ops only, so a second backward (e.g. through analytic normals)
    works when autograd asks for it (create_graph=True).
    """
    cell, frac = _cells_and_fracs(x, tables.scales)
    idx = _corner_indices(cell, tables)
    n, n_levels, n_corners = idx.shape
    g = grad_out.view(n, n_levels, 1, -1)  # [N, L, 1, F]
    grad_table = grad_x = None
    if need_params:
        w = _corner_weights(frac)
        contrib = (g * w.unsqueeze(-1)).view(n * n_levels * n_corners, -1)
        grad_table = torch.zeros_like(table).index_add(0, idx.view(-1), contrib)
    if need_x:
        vals = table.index_select(0, idx.view(-1)).view(n, n_levels, n_corners, -1)
        gv = (vals * g).sum(-1)  # [N, L, C]: dL/d(weight of corner c)
        n_dims = x.shape[-1]
        gv = gv.view(n, n_levels, *([2] * n_dims))
        fracs = frac.unbind(-1)
        cols = []
        for d in range(n_dims):
            # d weight_c / d frac_d = (+1 upper, -1 lower corner along d) * (weights of the other dims):
            # difference along d, then N-linear interpolation over the remaining D-1 dims (last first).
            t = gv.select(2 + d, 1) - gv.select(2 + d, 0)
            for e in reversed([e for e in range(n_dims) if e != d]):
                lo, hi = t.select(-1, 0), t.select(-1, 1)
                t = torch.lerp(lo, hi, fracs[e].view(n, n_levels, *([1] * (lo.dim() - 2))))
            cols.append((t * tables.scales).sum(-1))  # d pos / d x = scale_l
        grad_x = torch.stack(cols, dim=-1)
    return grad_x, grad_table


class _HashGridFunction(torch.autograd.Function):
    """Saves only x and the table; indices and weights are recomputed in backward (memory ~ O(N*D))."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, table: Tensor, tables: _GridTables) -> Tensor:
        ctx.save_for_backward(x, table)
        ctx.tables = tables
        return _encode(x, table, tables)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, table = ctx.saved_tensors
        grad_x, grad_table = _encode_backward(
            x, table, grad_out.contiguous(), ctx.tables, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return grad_x, grad_table, None


class HashGridEncoding(nn.Module):
    """tiny-cuda-nn-exact multiresolution hash grid: x [N, D] in [0, 1] -> features [N, n_levels * F].

    Args:
        n_input_dims: D, 3 (space) or 4 (space + time as the 4th coordinate); any D in 1..4 works.
        n_levels: number of resolution levels L.
        n_features_per_level: F, features stored per table entry.
        log2_hashmap_size: log2 of the largest per-level table (entries).
        base_resolution: vertices per axis of the coarsest level (tcnn convention: scale = base - 1).
        per_level_scale: resolution growth factor between levels (>= 1).
        backend: "torch" (reference, any device) or "tcnn" (tinycudann CUDA kernels, same parameters).
        check_inputs: validate x's shape, dtype and range on every call (one min/max reduction).
    """

    def __init__(
        self,
        n_input_dims: int,
        n_levels: int,
        n_features_per_level: int,
        log2_hashmap_size: int,
        base_resolution: int,
        per_level_scale: float,
        backend: Backend = "torch",
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= n_input_dims <= len(_TCNN_PRIMES):
            raise ValueError(f"n_input_dims must be in 1..{len(_TCNN_PRIMES)}, got {n_input_dims}")
        if n_levels < 1 or n_features_per_level < 1:
            raise ValueError(
                f"n_levels and n_features_per_level must be >= 1, got {n_levels} and {n_features_per_level}"
            )
        if not 1 <= log2_hashmap_size <= 32:
            raise ValueError(f"log2_hashmap_size must be in 1..32 (uint32 hashing), got {log2_hashmap_size}")
        if base_resolution < 1:
            raise ValueError(f"base_resolution must be >= 1, got {base_resolution}")
        if not per_level_scale >= 1.0:
            raise ValueError(
                f"per_level_scale must be >= 1 (levels get finer), got {per_level_scale}; "
                "reverse the level order outside the encoding if you need coarser levels"
            )
        if backend not in ("torch", "tcnn"):
            raise ValueError(f"backend must be 'torch' or 'tcnn', got {backend!r}")

        self.n_input_dims = n_input_dims
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.base_resolution = base_resolution
        self.per_level_scale = per_level_scale
        self.backend: Backend = backend
        self.check_inputs = check_inputs

        layout = tcnn_grid_layout(n_input_dims, n_levels, log2_hashmap_size, base_resolution, per_level_scale)
        self.layout = layout
        self.level_offsets: list[int] = list(layout.level_offsets)
        self.level_resolutions: list[int] = list(layout.resolutions)
        self.n_params: int = layout.level_offsets[-1] * n_features_per_level
        self.n_output_dims: int = n_levels * n_features_per_level

        n_dense = sum(1 for h in layout.hashed if not h)
        if any(layout.hashed[:n_dense]):  # guaranteed by per_level_scale >= 1; guards the kernel's split
            raise AssertionError("dense levels must precede hashed levels")
        self._n_dense = n_dense
        self.params = nn.Parameter(torch.empty(self.n_params).uniform_(-_TCNN_INIT_RANGE, _TCNN_INIT_RANGE))
        self._register_tables(layout)
        self._tcnn: Any = None
        if backend == "tcnn":
            self._tcnn = self._make_tcnn()

    def _register_tables(self, layout: GridLayout) -> None:
        """Non-persistent buffers (so the state dict holds only `params`, like tcnn's)."""
        nd, d = self._n_dense, self.n_input_dims
        bits = torch.tensor(_corner_bits(d), dtype=torch.int64)  # [C, D]
        res = torch.tensor(layout.resolutions[:nd], dtype=torch.int64)
        strides = res.unsqueeze(-1) ** torch.arange(d).unsqueeze(0)  # [Ld, D]
        sizes = torch.tensor(layout.table_sizes, dtype=torch.int64)
        offsets = torch.tensor(layout.level_offsets[:-1], dtype=torch.int64)
        self.register_buffer("_scales", torch.tensor(layout.scales, dtype=torch.float32), persistent=False)
        self.register_buffer("_dense_corner_offsets", strides @ bits.T, persistent=False)
        self.register_buffer("_dense_strides", strides, persistent=False)
        self.register_buffer("_dense_table_sizes", sizes[:nd, None].clone(), persistent=False)
        self.register_buffer("_dense_offsets", offsets[:nd, None].clone(), persistent=False)
        self.register_buffer("_hashed_offsets", offsets[nd:, None].clone(), persistent=False)

    def _tables(self, dtype: torch.dtype) -> _GridTables:
        return _GridTables(
            scales=self._scales.to(dtype),
            n_dense=self._n_dense,
            dense_corner_offsets=self._dense_corner_offsets,
            dense_strides=self._dense_strides,
            dense_table_sizes=self._dense_table_sizes,
            dense_offsets=self._dense_offsets,
            hashed_offsets=self._hashed_offsets,
            hash_mask=(1 << self.log2_hashmap_size) - 1,
        )

    def _make_tcnn(self) -> Any:
        try:
            import tinycudann as tcnn  # optional CUDA-only dependency, built from source
        except Exception as err:  # ImportError, or EnvironmentError when CUDA is missing
            raise ValueError(
                f"backend='tcnn' needs the tinycudann package and a CUDA GPU ({err}); "
                "use backend='torch' (same parameters, same numbers)"
            ) from err
        config = {
            "otype": "HashGrid",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
        }
        enc = tcnn.Encoding(self.n_input_dims, config, dtype=torch.float32)
        if enc.params.numel() != self.n_params:
            raise ValueError(
                f"tinycudann reports {enc.params.numel()} parameters, the torch layout {self.n_params}; "
                "this tinycudann version lays the grid out differently, use backend='torch'"
            )
        return enc

    def extra_repr(self) -> str:
        return (
            f"n_input_dims={self.n_input_dims}, n_levels={self.n_levels}, "
            f"n_features_per_level={self.n_features_per_level}, log2_hashmap_size={self.log2_hashmap_size}, "
            f"base_resolution={self.base_resolution}, per_level_scale={self.per_level_scale}, "
            f"backend={self.backend!r}, n_params={self.n_params}"
        )

    def _validate(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.n_input_dims:
            raise ValueError(f"x must have shape [N, {self.n_input_dims}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.shape[0] == 0:
            return
        lo, hi = torch.aminmax(x.detach())
        lo_v, hi_v = float(lo), float(hi)
        if not (lo_v >= 0.0 and hi_v <= 1.0):  # also catches NaN
            raise ValueError(
                f"x must lie in [0, 1] (map positions into the unit box before encoding; nothing is "
                f"clamped), got min {lo_v} and max {hi_v}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, D] in [0, 1] -> [N, n_levels * n_features_per_level] (params' dtype)."""
        if self.check_inputs:
            self._validate(x)
        if self._tcnn is not None:
            return self._forward_tcnn(x)
        dtype = self.params.dtype
        table = self.params.view(-1, self.n_features_per_level)
        return _HashGridFunction.apply(x.to(dtype).contiguous(), table, self._tables(dtype))

    def _forward_tcnn(self, x: Tensor) -> Tensor:
        if not (x.is_cuda and self.params.is_cuda):
            raise ValueError("backend='tcnn' needs x and the module on a CUDA device; call .cuda() on both")
        # Share the one parameter: tcnn's module is deliberately not a child (state dict = {"params"}).
        self._tcnn.params = self.params
        return self._tcnn(x).to(self.params.dtype)
