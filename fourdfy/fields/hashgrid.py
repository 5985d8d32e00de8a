"""Multiresolution hash grid encoding with tiny-cuda-nn's "HashGrid" semantics (Instant-NGP).

The pure-PyTorch path is the reference (and the default); it reproduces tiny-cuda-nn's level sizes,
parameter layout, hashing and N-linear interpolation, so a state dict saved from a
``tinycudann.Encoding`` (key ``params``) loads unchanged and gives the same numbers up to float32
rounding (~1e-7). On a CUDA machine with ``tinycudann`` installed, ``backend="tcnn"`` runs the same
parameters through the CUDA kernels.

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

CPU performance notes: points are processed in chunks, all levels of a kind (dense / hashed) at once;
with F = 2 each table entry is viewed as one complex64, so a corner lookup is one 8-byte gather and the
backward one `index_add_`; backward recomputes indices and weights instead of saving them, so memory
stays O(N * D) beyond the output. The random gathers/scatters dominate (memory latency).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fourdfy.enums import StrChoice

# Hash primes of tiny-cuda-nn's `fast_hash` (grid.h); the first is 1 on purpose (memory coherence).
_TCNN_PRIMES = (1, 2654435761, 805459861, 3674653429)
# tiny-cuda-nn pads every level's table to a multiple of 8 entries (aligned memory accesses, grid.h).
_TABLE_ALIGNMENT = 8
# tiny-cuda-nn's GridEncoding::initialize_params: uniform in [-1e-4, 1e-4].
_TCNN_INIT_RANGE = 1e-4
# Points per chunk of the torch backend: keeps each temporary (<= L * 2^D * chunk elements) under glibc's
# 32 MiB mmap threshold so it is reused rather than page-faulted anew; 2^11..2^15 measured within noise.
_DEFAULT_CHUNK = 1 << 13

class Backend(StrChoice):
    """Which kernels evaluate the encoding; both use the same parameters and give the same numbers."""

    torch = "torch"  # the reference: PyTorch ops, any device
    tcnn = "tcnn"  # tiny-cuda-nn's fused CUDA kernels (optional; no wheel, builds from source with CUDA)
    triton = "triton"  # fused Triton kernels (hashgrid_triton.py): CUDA, or CPU under TRITON_INTERPRET=1


@dataclass
class HashGridConfig:
    """A multiresolution hash grid (paper §5; authors' configs/fourdfy_stage_*.yaml geometry.pos_encoding_config)."""

    n_levels: int = 16  # n_levels: 16
    n_features_per_level: int = 2  # n_features_per_level: 2
    log2_hashmap_size: int = 19  # log2_hashmap_size: 19
    base_resolution: int = 16  # base_resolution: 16
    per_level_scale: float = 1.447269237440378  # per_level_scale: finest level 4096
    backend: Backend = Backend.torch  # torch (reference, default), tcnn or triton (fused kernels, CUDA only)
    # Points the torch backend encodes together (bounds its temporaries); null: 2^13, sized for CPU caches. On a
    # GPU each chunk costs a fixed number of kernel launches, so conf/preset/paper.yaml sets 2^18. Resume-safe:
    # outputs are the same, gradients equal to round-off (the order of the table's index_add sums).
    chunk_size: int | None = None


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
    """Level scales, resolutions and table offsets exactly as tiny-cuda-nn's GridEncoding computes them.

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
class _Group:
    """A run of consecutive levels indexed the same way (dense levels come first, then hashed ones)."""

    start: int  # first level
    stop: int  # one past the last level
    hashed: bool  # hash indexing (else dense)
    first_entry: int  # table entry where the group's first level starts; indices below are relative to it
    scales: tuple[float, ...]  # [Lg] float32 values of scale_l
    strides: tuple[tuple[int, ...], ...]  # dense: [Lg][D] res_l^d; hashed: ()
    table_sizes: tuple[int, ...]  # [Lg] entries per level
    offsets: tuple[int, ...]  # [Lg] level start relative to first_entry


@dataclass(frozen=True)
class _Plan:
    """Constants of the torch kernels (hashable, so their device tensors can be cached per device)."""

    n_dims: int  # D
    n_levels: int  # L
    n_features: int  # F
    groups: tuple[_Group, ...]  # at most one dense and one hashed group
    hash_mask: int  # 2^log2_hashmap_size - 1 (a hashed table always has exactly 2^log2 entries)
    index_dtype: torch.dtype  # int32 when every entry index fits (halves index traffic), else int64
    chunk_size: int  # points per chunk: bounds every temporary to O(chunk * L * 2^D) elements


def _make_plan(layout: GridLayout, n_dims: int, n_features: int, log2_hashmap_size: int, chunk: int) -> _Plan:
    n_levels = len(layout.scales)
    n_dense = layout.hashed.index(True) if any(layout.hashed) else n_levels
    if any(layout.hashed[:n_dense]) or not all(layout.hashed[n_dense:]):
        raise ValueError(f"dense levels must precede hashed ones, got hashed flags {layout.hashed}")
    groups = []
    for start, stop, hashed in ((0, n_dense, False), (n_dense, n_levels, True)):
        if start == stop:
            continue
        first = layout.level_offsets[start]
        groups.append(
            _Group(
                start=start,
                stop=stop,
                hashed=hashed,
                first_entry=first,
                scales=tuple(layout.scales[start:stop]),
                strides=() if hashed else tuple(
                    tuple(r**d for d in range(n_dims)) for r in layout.resolutions[start:stop]
                ),
                table_sizes=tuple(layout.table_sizes[start:stop]),
                offsets=tuple(o - first for o in layout.level_offsets[start:stop]),
            )
        )
    return _Plan(
        n_dims=n_dims,
        n_levels=n_levels,
        n_features=n_features,
        groups=tuple(groups),
        hash_mask=(1 << log2_hashmap_size) - 1,
        # A dense index may reach 2T before its `% T`, hence the second term.
        index_dtype=torch.int32
        if layout.level_offsets[-1] + 2 * max(layout.table_sizes) < 2**31
        else torch.int64,
        chunk_size=chunk,
    )


@dataclass(frozen=True)
class _GroupTensors:
    """A `_Group`'s per-level constants on one device, shaped to broadcast against [Lg, D, n]."""

    scales: Tensor  # [Lg, 1, 1] float64 (exact copies of the float32 scales)
    strides: Tensor  # dense: [Lg, D, 1] int64; hashed: the primes, [1, D, 1] int64
    table_sizes: Tensor  # [Lg, 1, 1] index dtype
    offsets: Tensor  # [Lg, 1, 1] index dtype


@functools.lru_cache(maxsize=64)
def _group_tensors(
    group: _Group, n_dims: int, index_dtype: torch.dtype, device: torch.device
) -> _GroupTensors:
    def t(values: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device).view(shape)

    n = group.stop - group.start
    strides = t(_TCNN_PRIMES[:n_dims], torch.int64, (1, n_dims, 1)) if group.hashed else (
        t(group.strides, torch.int64, (n, n_dims, 1))
    )
    return _GroupTensors(
        scales=t(group.scales, torch.float64, (n, 1, 1)),
        strides=strides,
        table_sizes=t(group.table_sizes, index_dtype, (n, 1, 1)),
        offsets=t(group.offsets, index_dtype, (n, 1, 1)),
    )


def _entries(params: Tensor, n_features: int) -> Tensor:
    """Flat params [n_entries * F] -> one row per table entry.

    F == 2 (the paper's grids) becomes a complex [n_entries] view, so a corner lookup is a single 8-byte
    gather and weighting a corner is one real-by-complex product; other F give a real [n_entries, F] view.
    """
    table = params.view(-1, n_features)
    return torch.view_as_complex(table) if n_features == 2 else table


def _as_real(v: Tensor, n_features: int) -> Tensor:
    """Entry-valued tensor [...] complex or [..., F] real -> [..., F] real."""
    return torch.view_as_real(v) if n_features == 2 else v


def _coords(x: Tensor, gt: _GroupTensors, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x: [n, D] -> (cell [Lg, D, n] int64, frac [Lg, D, n] in dtype), pos = scale_l * x + 0.5.

    tcnn evaluates pos with fmaf(scale, x, 0.5f), i.e. rounded once. scale * x is exact in float64
    (24 + 24 significant bits), so evaluating in float64 and rounding once to float32 reproduces the fused
    result; the plain float32 expression differs by up to ~1e-5 at fine levels.
    """
    xt = x.t().to(torch.float64).unsqueeze(0)  # [1, D, n]
    pos = (xt * gt.scales).add_(0.5).to(dtype)
    cell = torch.floor(pos)
    return cell.long(), pos - cell


def _outer(pairs: Tensor, op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """pairs: [Lg, D, 2, n] -> [Lg, 2^D, n], one entry per dim combined; dim 0 is the most significant bit."""
    acc = pairs[:, 0]
    for d in range(1, pairs.shape[1]):
        acc = op(acc.unsqueeze(2), pairs[:, d].unsqueeze(1)).flatten(1, 2)
    return acc


def _corner_indices(cell: Tensor, group: _Group, gt: _GroupTensors, plan: _Plan) -> Tensor:
    """cell: [Lg, D, n] int64 -> every corner's entry relative to group.first_entry, [Lg, 2^D, n]."""
    if not group.hashed:
        a = cell * gt.strides  # [Lg, D, n]
        idx = _outer(torch.stack((a, a + gt.strides), dim=2).to(plan.index_dtype), torch.add)
        # The +0.5 shift lets the upper corner reach `res`, so a dense index can pass the table end; tcnn
        # wraps it with `% T` (T may also exceed res^D by the 8-entry padding).
        return torch.remainder(idx, gt.table_sizes).add_(gt.offsets)
    # The int64 product has tcnn's uint32 product as its low 32 bits; masking each term before the XOR
    # equals masking the XOR, and `% T` is that mask because T = 2^log2_hashmap_size.
    h = cell * gt.strides
    pairs = torch.stack((h & plan.hash_mask, (h + gt.strides) & plan.hash_mask), dim=2).to(plan.index_dtype)
    # Hashed tables are consecutive and exactly T long, so offset_l = k*T with hash < T: adding it to the
    # dim-0 term before the XOR sets bits the hash never touches (saves a pass over [Lg, C, n]).
    pairs[:, 0] += gt.offsets
    return _outer(pairs, torch.bitwise_xor)


def _corner_weights(frac: Tensor) -> Tensor:
    """frac: [Lg, D, n] -> N-linear corner weights [Lg, 2^D, n] (same corner order as `_corner_indices`)."""
    return _outer(torch.stack((1.0 - frac, frac), dim=2), torch.mul)


def _frac_view(frac_d: Tensor, n_corner_axes: int, n_trailing: int) -> Tensor:
    """frac_d: [Lg, n] -> [Lg, 1 (x n_corner_axes), n, 1 (x n_trailing)] for broadcasting."""
    shape = (frac_d.shape[0], *([1] * n_corner_axes), frac_d.shape[1], *([1] * n_trailing))
    return frac_d.view(shape)


def _encode_chunk(x: Tensor, entries: Tensor, plan: _Plan, out: Tensor) -> None:
    """x: [n, D], entries: see `_entries`; writes the features into out: [n, L, F]."""
    n, n_dims = x.shape
    n_trailing = entries.dim() - 1
    for group in plan.groups:
        gt = _group_tensors(group, n_dims, plan.index_dtype, x.device)
        cell, frac = _coords(x, gt, out.dtype)
        idx = _corner_indices(cell, group, gt, plan)  # [Lg, C, n]
        vals = entries[group.first_entry :].index_select(0, idx.view(-1))
        vals = vals.view(group.stop - group.start, *([2] * n_dims), n, *entries.shape[1:])
        # N-linear interpolation as a tree of lerps (last dim first): C - 1 lerps, no explicit corner
        # weights; equal to tcnn's weighted corner sum up to float32 rounding.
        for d in reversed(range(n_dims)):
            lo, hi = vals.select(1 + d, 0), vals.select(1 + d, 1)
            vals = lo + (hi - lo) * _frac_view(frac[:, d], d, n_trailing)
        out[:, group.start : group.stop] = _as_real(vals, plan.n_features).transpose(0, 1)


def _backward_chunk(
    x: Tensor, entries: Tensor, grad_out: Tensor, plan: _Plan, grad_entries: Tensor | None, need_x: bool
) -> Tensor | None:
    """Backward of `_encode_chunk` for x: [n, D] and grad_out: [n, L*F].

    Adds dL/d(entries) into grad_entries (shaped like entries) when given; returns dL/dx [n, D] when
    need_x. Only differentiable torch ops are used, so a second backward (e.g. through analytic normals)
    works when autograd records this one (create_graph=True).
    """
    n, n_dims = x.shape
    n_features = plan.n_features
    # Level-major copy of grad_out ([L, n] complex or [L, n, F]): contiguous rows keep the products below
    # plain vector ops (a strided operand is several times slower).
    g_all = grad_out.view(n, plan.n_levels, n_features).transpose(0, 1).contiguous()
    if n_features == 2:
        g_all = torch.view_as_complex(g_all)
    grad_x: Tensor | None = None
    for group in plan.groups:
        gt = _group_tensors(group, n_dims, plan.index_dtype, x.device)
        cell, frac = _coords(x, gt, grad_out.dtype)
        idx = _corner_indices(cell, group, gt, plan).view(-1)
        g = g_all[group.start : group.stop].unsqueeze(1)  # [Lg, 1, n] complex or [Lg, 1, n, F]
        if grad_entries is not None:
            w = _corner_weights(frac)  # [Lg, C, n]
            contrib = w * g if n_features == 2 else w.unsqueeze(-1) * g
            grad_entries[group.first_entry :].index_add_(0, idx, contrib.view(-1, *entries.shape[1:]))
        if need_x:
            n_lv = group.stop - group.start
            vals = entries[group.first_entry :].index_select(0, idx)
            vals = _as_real(vals, n_features).view(n_lv, -1, n, n_features)
            gv = (vals * _as_real(g, n_features)).sum(-1)  # dL/d(weight of each corner), [Lg, C, n]
            gv = gv.view(n_lv, *([2] * n_dims), n)
            cols = []
            for d in range(n_dims):
                # d weight_c / d frac_d = (+1 upper, -1 lower corner along d) * (weights of the other
                # dims): difference along d, then interpolate over the remaining dims (last first).
                t = gv.select(1 + d, 1) - gv.select(1 + d, 0)
                for e in reversed([e for e in range(n_dims) if e != d]):
                    k = t.dim() - 2  # the last remaining corner axis
                    lo, hi = t.select(k, 0), t.select(k, 1)
                    t = lo + (hi - lo) * _frac_view(frac[:, e], k - 1, 0)
                cols.append((t * gt.scales.view(n_lv, 1).to(t.dtype)).sum(0))  # d pos / d x = scale_l
            term = torch.stack(cols, dim=1)
            grad_x = term if grad_x is None else grad_x + term
    return grad_x


class _HashGridFunction(torch.autograd.Function):
    """Saves only x and params; indices and weights are recomputed in backward (memory O(N * D))."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, params: Tensor, plan: _Plan) -> Tensor:
        ctx.save_for_backward(x, params)
        ctx.plan = plan
        entries = _entries(params, plan.n_features)
        out = params.new_empty(x.shape[0], plan.n_levels, plan.n_features)
        for start in range(0, x.shape[0], plan.chunk_size):
            stop = start + plan.chunk_size
            _encode_chunk(x[start:stop], entries, plan, out[start:stop])
        return out.view(x.shape[0], plan.n_levels * plan.n_features)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, params = ctx.saved_tensors
        plan: _Plan = ctx.plan
        need_x, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        entries = _entries(params, plan.n_features)
        grad_entries = torch.zeros_like(entries) if need_params else None
        grad_x_chunks = []
        for start in range(0, x.shape[0], plan.chunk_size):
            stop = start + plan.chunk_size
            gx = _backward_chunk(x[start:stop], entries, grad_out[start:stop], plan, grad_entries, need_x)
            if gx is not None:
                grad_x_chunks.append(gx)
        grad_x = None
        if need_x:
            grad_x = torch.cat(grad_x_chunks) if grad_x_chunks else torch.zeros_like(x)
        grad_params = None
        if grad_entries is not None:
            grad_params = _as_real(grad_entries, plan.n_features).reshape(-1)
        return grad_x, grad_params, None


def _make_triton_grid(layout: GridLayout, n_dims: int, n_features: int) -> Any:
    """The Triton backend's constants; a ValueError when it cannot run here (no triton, or no CUDA and no
    TRITON_INTERPRET=1)."""
    fix = (
        "set field.static_grid.backend / field.dynamic_grid.backend to torch (same parameters, same numbers)"
    )
    try:
        from fourdfy.fields import hashgrid_triton  # optional: triton ships with Linux torch wheels
    except Exception as err:  # ImportError, or a broken triton install
        raise ValueError(f"backend='triton' needs the triton package ({err}); {fix}") from err
    if not (torch.cuda.is_available() or hashgrid_triton.interpreting()):
        raise ValueError(
            f"backend='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's CPU interpreter); {fix}"
        )
    return hashgrid_triton.make_grid(layout, n_dims, n_features)


class HashGridEncoding(nn.Module):
    """tiny-cuda-nn-exact multiresolution hash grid: x [N, D] in [0, 1] -> features [N, n_levels * F].

    Args:
        n_input_dims: D, 3 (space) or 4 (space + time as the 4th coordinate); any D in 1..4 works.
        n_levels: number of resolution levels L.
        n_features_per_level: F, features stored per table entry.
        log2_hashmap_size: log2 of the largest per-level table (entries).
        base_resolution: vertices per axis of the coarsest level (tcnn convention: scale = base - 1).
        per_level_scale: resolution growth factor between levels (>= 1).
        backend: "torch" (reference, any device), "tcnn" (tinycudann CUDA kernels) or "triton" (Triton
            kernels, CUDA or TRITON_INTERPRET=1); all use the same parameters.
        check_inputs: validate x's shape, dtype and range on every call (one min/max reduction).
        chunk_size: points processed together by the torch backend (bounds temporary memory).
    """

    def __init__(
        self,
        n_input_dims: int,
        n_levels: int,
        n_features_per_level: int,
        log2_hashmap_size: int,
        base_resolution: int,
        per_level_scale: float,
        backend: Backend | str = Backend.torch,
        check_inputs: bool = True,
        chunk_size: int = _DEFAULT_CHUNK,
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
                f"per_level_scale must be >= 1 (levels must not get coarser), got {per_level_scale}"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if backend not in tuple(Backend):
            raise ValueError(f"backend must be one of {[b.value for b in Backend]}, got {backend!r}")
        backend = Backend(backend)

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

        self.params = nn.Parameter(torch.empty(self.n_params).uniform_(-_TCNN_INIT_RANGE, _TCNN_INIT_RANGE))
        self._plan = _make_plan(layout, n_input_dims, n_features_per_level, log2_hashmap_size, chunk_size)
        # Set with object.__setattr__ so tcnn's module is not registered as a child: its `params` would
        # otherwise appear twice in the state dict, which must stay {"params"} like tcnn's own.
        object.__setattr__(self, "_tcnn", self._make_tcnn() if backend == "tcnn" else None)
        self._triton_grid = _make_triton_grid(layout, n_input_dims, n_features_per_level) if (
            backend == Backend.triton
        ) else None

    def set_chunk_size(self, chunk_size: int) -> None:
        """Points the torch backend processes together: bounds temporary memory; on a GPU, larger chunks mean
        fewer kernel launches. Results do not depend on it (tests/test_hashgrid.py)."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._plan = dataclasses.replace(self._plan, chunk_size=chunk_size)

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
            f"backend='{self.backend}', n_params={self.n_params}"
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
        if self._triton_grid is not None:
            from fourdfy.fields import hashgrid_triton  # imported by _make_triton_grid already

            return hashgrid_triton.encode(x, self.params, self._triton_grid)
        dtype = self.params.dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"params must be float32 or float64 (tcnn computes in float32), got {dtype}")
        return _HashGridFunction.apply(x.to(dtype).contiguous(), self.params, self._plan)

    def _forward_tcnn(self, x: Tensor) -> Tensor:
        if not (x.is_cuda and self.params.is_cuda):
            raise ValueError("backend='tcnn' needs x and the module on a CUDA device; call .cuda() on both")
        # Share the one parameter (re-bound every call, so `.to()`/`load_state_dict` on this module
        # are always what tcnn sees).
        self._tcnn.params = self.params
        return self._tcnn(x).to(self.params.dtype)
