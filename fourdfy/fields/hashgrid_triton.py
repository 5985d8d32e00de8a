"""Triton kernels of the hash grid encoding: the same numbers as the torch backend of `hashgrid.py`.

Same semantics as ``HashGridEncoding``'s torch path (tiny-cuda-nn's grid.h): the parameter vector is the
tcnn layout (level ``l`` at entries ``offset_l .. offset_l + T_l``, ``F`` features per entry), dense levels
index ``(sum_d corner_d * res_l^d) % T_l``, hashed ones ``(XOR_d corner_d * P_d) % T_l`` with tcnn's primes,
and ``pos = fl32(scale_l * x + 0.5)`` is evaluated in float64 and rounded once (like the torch path, which
reproduces tcnn's ``fmaf``). Corners are combined as tcnn does (sum of weight * value), not as the torch
path's tree of lerps, so outputs agree with it up to float32 rounding (~1e-7 relative).

One program handles ``BLOCK`` points of one level (grid ``[cdiv(N, BLOCK), levels of the group]``), with
the dense and the hashed levels as two launches (``HASHED`` is a compile-time flag). Every kernel always
runs 4 coordinate slots: slots ``d >= D`` hold cell 0 and frac 0, so their factor is exactly 1.0 and their
corner bit is always 0 (they change no index), which keeps one code path for D = 1..4 without lists.

Backward: ``atomic_add`` of ``grad_out * weight`` into a float32 table gradient (the order of the atomic
adds is not fixed, so the gradient is reproducible only to float32 rounding), and, when x needs one,
dL/dx = sum_l scale_l * sum_c d(weight_c)/d(frac) * <value_c, grad_out_l> (first order only, as tcnn).

Tables may be float32, float16 or bfloat16: values are loaded and accumulated in float32, the output and
the table gradient are cast to the table's dtype at the end.

Without a GPU the kernels run on CPU tensors under Triton's interpreter when ``TRITON_INTERPRET=1`` is set
(read when a kernel is first launched in that mode, see `_kernels`); that is how the tests run them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

# tiny-cuda-nn grid.h `fast_hash` primes, the same tuple as hashgrid._TCNN_PRIMES (kept in a device tensor:
# as kernel literals the large ones would be typed uint32, and int64 keeps the products exact).
_PRIMES = (1, 2654435761, 805459861, 3674653429)
# Points per program on a GPU: 128 points x 2 features fills 4 warps with one 8-byte gather per corner.
_GPU_BLOCK = 128
# Under the interpreter each program costs a Python-level pass over numpy arrays: bigger blocks, fewer passes.
_INTERPRET_BLOCK = 1024
# Table dtypes the kernels read (accumulation is always float32).
TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


@dataclass(frozen=True)
class TritonGrid:
    """Constants of one grid for the kernels (hashable: device tensors are cached per device)."""

    n_dims: int  # D
    n_features: int  # F
    scales: tuple[float, ...]  # [L] float32 values of scale_l
    resolutions: tuple[int, ...]  # [L] res_l
    offsets: tuple[int, ...]  # [L] first table entry of each level
    table_sizes: tuple[int, ...]  # [L] entries per level
    groups: tuple[tuple[int, int, bool], ...]  # (start, stop, hashed): runs of levels indexed alike

    @property
    def n_levels(self) -> int:
        return len(self.scales)


def make_grid(layout: Any, n_dims: int, n_features: int) -> TritonGrid:
    """`hashgrid.GridLayout` -> `TritonGrid` (dense levels first, then hashed, as tcnn lays them out)."""
    hashed = list(layout.hashed)
    n_dense = hashed.index(True) if any(hashed) else len(hashed)
    if any(hashed[:n_dense]) or not all(hashed[n_dense:]):
        raise ValueError(f"dense levels must precede hashed ones, got hashed flags {hashed}")
    # int64 products corner * prime must not overflow: corner <= res_l, prime < 2^32.
    if max(layout.resolutions) >= 2**30:
        raise ValueError(f"grid resolution {max(layout.resolutions)} too large for int64 hashing")
    sizes = layout.table_sizes
    for level, (res, size, flag) in enumerate(zip(layout.resolutions, sizes, hashed, strict=True)):
        # What the kernels' index wrapping relies on: a hashed table is 2^log2_hashmap_size entries (a mask);
        # a dense index, at most sum_d res * res^d <= 2 * (res^D - 1) for res >= 2 (at most D for res = 1),
        # stays below 2 * size (one subtraction).
        if flag and size & (size - 1):
            raise ValueError(f"level {level}: hashed table of {size} entries is not a power of two")
        if not flag and res * sum(res**d for d in range(n_dims)) >= 2 * size:
            raise ValueError(f"level {level}: dense index bound exceeds twice the table ({size} entries)")
    groups = tuple(
        (start, stop, flag)
        for start, stop, flag in ((0, n_dense, False), (n_dense, len(hashed), True))
        if start < stop
    )
    return TritonGrid(
        n_dims=n_dims,
        n_features=n_features,
        scales=tuple(layout.scales),
        resolutions=tuple(layout.resolutions),
        offsets=tuple(layout.level_offsets[:-1]),
        table_sizes=tuple(layout.table_sizes),
        groups=groups,
    )


@functools.lru_cache(maxsize=64)
def _device_constants(grid: TritonGrid, device: torch.device) -> tuple[Tensor, Tensor]:
    """(scales [L] float32, ints [4, L] int64 rows res / offset / table size / -, plus primes in row 3)."""
    scales = torch.tensor(grid.scales, dtype=torch.float32, device=device)
    n = grid.n_levels
    ints = torch.zeros(4, max(n, len(_PRIMES)), dtype=torch.int64)
    ints[0, :n] = torch.tensor(grid.resolutions)
    ints[1, :n] = torch.tensor(grid.offsets)
    ints[2, :n] = torch.tensor(grid.table_sizes)
    ints[3, : len(_PRIMES)] = torch.tensor(_PRIMES)
    return scales, ints.to(device)


def _forward_kernel(
    x_ptr, table_ptr, out_ptr, scale_ptr, int_ptr, n_points, level_start, int_stride,
    D: tl.constexpr, F: tl.constexpr, FP: tl.constexpr, L: tl.constexpr, HASHED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """x [N, D] f32, table [entries * F], out [N, L * F] f32 (the level's F columns are written)."""
    level = level_start + tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n_points
    scale = tl.load(scale_ptr + level).to(tl.float64)
    res = tl.load(int_ptr + level)
    offset = tl.load(int_ptr + int_stride + level)
    size = tl.load(int_ptr + 2 * int_stride + level)
    p1 = tl.load(int_ptr + 3 * int_stride + 1)
    p2 = tl.load(int_ptr + 3 * int_stride + 2)
    p3 = tl.load(int_ptr + 3 * int_stride + 3)
    # pos = fl32(scale * x + 0.5): the float64 product is exact, so this is one rounding like tcnn's fmaf.
    pos = (tl.load(x_ptr + rows * D, mask=mask, other=0.0).to(tl.float64) * scale + 0.5).to(tl.float32)
    cf = tl.floor(pos)
    f0 = pos - cf
    c0 = cf.to(tl.int64)
    f1 = tl.zeros([BLOCK], tl.float32)
    c1 = tl.zeros([BLOCK], tl.int64)
    f2 = f1
    c2 = c1
    f3 = f1
    c3 = c1
    if D > 1:
        pos = (tl.load(x_ptr + rows * D + 1, mask=mask, other=0.0).to(tl.float64) * scale + 0.5).to(tl.float32)
        cf = tl.floor(pos)
        f1 = pos - cf
        c1 = cf.to(tl.int64)
    if D > 2:
        pos = (tl.load(x_ptr + rows * D + 2, mask=mask, other=0.0).to(tl.float64) * scale + 0.5).to(tl.float32)
        cf = tl.floor(pos)
        f2 = pos - cf
        c2 = cf.to(tl.int64)
    if D > 3:
        pos = (tl.load(x_ptr + rows * D + 3, mask=mask, other=0.0).to(tl.float64) * scale + 0.5).to(tl.float32)
        cf = tl.floor(pos)
        f3 = pos - cf
        c3 = cf.to(tl.int64)
    feat = tl.arange(0, FP)
    fmask = mask[:, None] & (feat[None, :] < F)
    acc = tl.zeros([BLOCK, FP], tl.float32)
    for corner in tl.static_range(1 << D):
        if corner & 1:
            w = f0
            k0 = c0 + 1
        else:
            w = 1.0 - f0
            k0 = c0
        if (corner >> 1) & 1:
            w = w * f1
            k1 = c1 + 1
        else:
            w = w * (1.0 - f1)
            k1 = c1
        if (corner >> 2) & 1:
            w = w * f2
            k2 = c2 + 1
        else:
            w = w * (1.0 - f2)
            k2 = c2
        if (corner >> 3) & 1:
            w = w * f3
            k3 = c3 + 1
        else:
            w = w * (1.0 - f3)
            k3 = c3
        if HASHED:
            # XOR of the full int64 products has tcnn's uint32 hash as its low 32 bits, and the hashed
            # table size (2^log2_hashmap_size) divides 2^32, so tcnn's `% size` is this mask.
            idx = (k0 ^ (k1 * p1) ^ (k2 * p2) ^ (k3 * p3)) & (size - 1)
        else:
            # The upper corner may reach res (the +0.5 shift), so the index may pass the table end; tcnn
            # wraps it with `% size`. It stays below 2 * size (see make_grid): one conditional subtraction,
            # not an int64 division.
            idx = k0 + res * (k1 + res * (k2 + res * k3))
            idx = tl.where(idx >= size, idx - size, idx)
        entry = (offset + idx) * F
        vals = tl.load(table_ptr + entry[:, None] + feat[None, :], mask=fmask, other=0.0)
        acc += w[:, None] * vals.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * (L * F) + level * F + feat[None, :], acc, mask=fmask)


def _backward_kernel(
    x_ptr, table_ptr, grad_out_ptr, grad_table_ptr, grad_x_ptr, scale_ptr, int_ptr,
    n_points, level_start, int_stride,
    D: tl.constexpr, F: tl.constexpr, FP: tl.constexpr, L: tl.constexpr, HASHED: tl.constexpr,
    NEED_TABLE: tl.constexpr, NEED_X: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad_out [N, L * F] f32 -> atomic adds into grad_table [entries * F] f32 and grad_x [N, D] f32."""
    level = level_start + tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n_points
    scale = tl.load(scale_ptr + level).to(tl.float64)
    res = tl.load(int_ptr + level)
    offset = tl.load(int_ptr + int_stride + level)
    size = tl.load(int_ptr + 2 * int_stride + level)
    p1 = tl.load(int_ptr + 3 * int_stride + 1)
    p2 = tl.load(int_ptr + 3 * int_stride + 2)
    p3 = tl.load(int_ptr + 3 * int_stride + 3)
    pos = (tl.load(x_ptr + rows * D, mask=mask, other=0.0).to(tl.float64) * scale + 0.5).to(tl.float32)
    cf = tl.floor(pos)
    f0 = pos - cf
    c0 = cf.to(tl.int64)
    f1 = tl.zeros([BLOCK], tl.float32)
    c1 = tl.zeros([BLOCK], tl.int64)
    f2 = f1
    c2 = c1
    f3 = f1
    c3 = c1
    if D > 1:
        pos = (tl.load(x_ptr + rows * D + 1, mask=mask, other=0.0).to(tl.float64) * scale + 0.5).to(tl.float32)
        cf = tl.floor(pos)
        f1 = pos - cf
        c1 = cf.to(tl.int64)
    if D > 2:
        pos = (tl.load(x_ptr + rows * D + 2, mask=mask, other=0.0).to(tl.float64) * scale + 0.5).to(tl.float32)
        cf = tl.floor(pos)
        f2 = pos - cf
        c2 = cf.to(tl.int64)
    if D > 3:
        pos = (tl.load(x_ptr + rows * D + 3, mask=mask, other=0.0).to(tl.float64) * scale + 0.5).to(tl.float32)
        cf = tl.floor(pos)
        f3 = pos - cf
        c3 = cf.to(tl.int64)
    feat = tl.arange(0, FP)
    fmask = mask[:, None] & (feat[None, :] < F)
    g = tl.load(grad_out_ptr + rows[:, None] * (L * F) + level * F + feat[None, :], mask=fmask, other=0.0)
    gx0 = tl.zeros([BLOCK], tl.float32)
    gx1 = gx0
    gx2 = gx0
    gx3 = gx0
    for corner in tl.static_range(1 << D):
        # a_d: the corner's factor along d; s_d: d(a_d)/d(frac_d) = +1 (upper) or -1 (lower corner).
        if corner & 1:
            a0 = f0
            s0 = 1.0
            k0 = c0 + 1
        else:
            a0 = 1.0 - f0
            s0 = -1.0
            k0 = c0
        if (corner >> 1) & 1:
            a1 = f1
            s1 = 1.0
            k1 = c1 + 1
        else:
            a1 = 1.0 - f1
            s1 = -1.0
            k1 = c1
        if (corner >> 2) & 1:
            a2 = f2
            s2 = 1.0
            k2 = c2 + 1
        else:
            a2 = 1.0 - f2
            s2 = -1.0
            k2 = c2
        if (corner >> 3) & 1:
            a3 = f3
            s3 = 1.0
            k3 = c3 + 1
        else:
            a3 = 1.0 - f3
            s3 = -1.0
            k3 = c3
        if HASHED:  # the forward kernel's indices
            idx = (k0 ^ (k1 * p1) ^ (k2 * p2) ^ (k3 * p3)) & (size - 1)
        else:
            idx = k0 + res * (k1 + res * (k2 + res * k3))
            idx = tl.where(idx >= size, idx - size, idx)
        entry = (offset + idx) * F
        if NEED_TABLE:
            w = a0 * a1 * a2 * a3
            tl.atomic_add(grad_table_ptr + entry[:, None] + feat[None, :], w[:, None] * g, mask=fmask)
        if NEED_X:
            vals = tl.load(table_ptr + entry[:, None] + feat[None, :], mask=fmask, other=0.0)
            dot = tl.sum(vals.to(tl.float32) * g, axis=1)  # dL/d(weight of this corner)
            gx0 += (s0 * (a1 * a2 * a3)) * dot
            gx1 += (s1 * (a0 * a2 * a3)) * dot
            gx2 += (s2 * (a0 * a1 * a3)) * dot
            gx3 += (s3 * (a0 * a1 * a2)) * dot
    if NEED_X:
        # d pos / d x = scale_l; levels add into the same row, hence atomics.
        scale32 = scale.to(tl.float32)
        tl.atomic_add(grad_x_ptr + rows * D, gx0 * scale32, mask=mask)
        if D > 1:
            tl.atomic_add(grad_x_ptr + rows * D + 1, gx1 * scale32, mask=mask)
        if D > 2:
            tl.atomic_add(grad_x_ptr + rows * D + 2, gx2 * scale32, mask=mask)
        if D > 3:
            tl.atomic_add(grad_x_ptr + rows * D + 3, gx3 * scale32, mask=mask)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """The jitted kernels for the current mode; ``triton.jit`` picks interpreter or compiler when it runs,
    so jitting here (not at import) lets one process import this module before setting TRITON_INTERPRET."""
    del interpret  # the cache key: triton.jit reads the same flag itself
    return triton.jit(_forward_kernel), triton.jit(_backward_kernel)


def _launch_shape(grid: TritonGrid, n_points: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK, FP): points per program and the features padded to a power of two."""
    block = min(_INTERPRET_BLOCK, triton.next_power_of_2(max(n_points, 1))) if interpret else _GPU_BLOCK
    return block, triton.next_power_of_2(grid.n_features)


def _check_tensors(x: Tensor, params: Tensor) -> None:
    if x.device != params.device:
        raise ValueError(f"x is on {x.device} but the hash grid on {params.device}; move both to one device")
    if not (x.is_cuda or interpreting()):
        raise ValueError(
            "backend='triton' needs x and the module on a CUDA device (or TRITON_INTERPRET=1 for CPU "
            "tensors); call .cuda() on both or use backend='torch'"
        )
    if params.dtype not in TABLE_DTYPES:
        raise ValueError(
            f"backend='triton' reads float32/float16/bfloat16 tables, got {params.dtype}; use backend='torch'"
        )


def forward(x: Tensor, params: Tensor, grid: TritonGrid) -> Tensor:
    """x [N, D] float32 contiguous, params [n_entries * F] -> [N, L * F] float32."""
    interpret = interpreting()
    fwd, _ = _kernels(interpret)
    n = x.shape[0]
    out = torch.empty(n, grid.n_levels * grid.n_features, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    scales, ints = _device_constants(grid, x.device)
    block, fp = _launch_shape(grid, n, interpret)
    for start, stop, hashed in grid.groups:
        fwd[(triton.cdiv(n, block), stop - start)](
            x, params, out, scales, ints, n, start, ints.shape[1],
            D=grid.n_dims, F=grid.n_features, FP=fp, L=grid.n_levels, HASHED=hashed, BLOCK=block,
        )
    return out


def backward(
    x: Tensor, params: Tensor, grad_out: Tensor, grid: TritonGrid, need_table: bool, need_x: bool
) -> tuple[Tensor | None, Tensor | None]:
    """grad_out [N, L * F] float32 contiguous -> (grad_x [N, D] f32 | None, grad_params [n_params] f32 | None)."""
    interpret = interpreting()
    _, bwd = _kernels(interpret)
    n = x.shape[0]
    grad_table = torch.zeros(params.shape, dtype=torch.float32, device=x.device) if need_table else None
    grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
    if n == 0 or not (need_table or need_x):
        return grad_x, grad_table
    scales, ints = _device_constants(grid, x.device)
    block, fp = _launch_shape(grid, n, interpret)
    # A pointer argument must be a tensor even where a constexpr flag disables its use.
    dummy = grad_out
    for start, stop, hashed in grid.groups:
        bwd[(triton.cdiv(n, block), stop - start)](
            x, params, grad_out, grad_table if need_table else dummy, grad_x if need_x else dummy,
            scales, ints, n, start, ints.shape[1],
            D=grid.n_dims, F=grid.n_features, FP=fp, L=grid.n_levels, HASHED=hashed,
            NEED_TABLE=need_table, NEED_X=need_x, BLOCK=block,
        )
    return grad_x, grad_table


class TritonHashGridFunction(torch.autograd.Function):
    """x [N, D], params [n_params] -> [N, L * F] in params' dtype; saves only x and params.

    First order only (``once_differentiable``: a second backward raises instead of silently giving 0; the
    torch backend supports it).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, params: Tensor, grid: TritonGrid) -> Tensor:
        _check_tensors(x, params)
        x32 = x.to(torch.float32).contiguous()
        ctx.save_for_backward(x32, params)
        ctx.grid = grid
        ctx.x_dtype = x.dtype
        return forward(x32, params.contiguous(), grid).to(params.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, params = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_out.to(torch.float32).contiguous()
        grad_x, grad_table = backward(x, params.contiguous(), g, ctx.grid, need_table, need_x)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        if grad_table is not None:
            grad_table = grad_table.to(params.dtype)
        return grad_x, grad_table, None


def encode(x: Tensor, params: Tensor, grid: TritonGrid) -> Tensor:
    """x [N, D] in [0, 1], params [n_params] (tcnn layout) -> [N, L * F] in params' dtype."""
    return TritonHashGridFunction.apply(x, params, grid)
