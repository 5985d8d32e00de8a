"""CPU micro-benchmarks of the toy-world pipeline, printed as JSON; every figure comes with a ratio measured
in the same run, so results from different machines compare.

    python -m bench.cpu [--quick] [--out FILE]

1. ``encoding``: forward + backward (gradient w.r.t. the table) throughput in points/s of the paper's 3D
   and 4D hash grids (16 levels × 2 features, 2^19 entries, resolution 16 -> 4096), for
   `fourdfy.fields.hashgrid.HashGridEncoding` and for `naive_hashgrid` below (a loop over levels and
   corners with the same tiny-cuda-nn math, autograd for the backward), and their ``speedup`` (target
   >= 5). ``max_abs_diff`` checks the two agree.
2. ``renderer``: rays/s of `Renderer.render` forward + backward at the CPU demo's samples per ray
   (conf/preset/demo_cpu.yaml) on the demo's field, and ``field_share``: the fraction of that time spent in
   the field itself (field forward + backward on the renderer's sample points, measured alone).
3. ``toy_iteration``: seconds of one `Trainer.step()` per update kind on the CPU demo (synthetic priors),
   and ``over_3d``: each kind's time relative to the 3D step.
4. ``occupancy``: rays/s of `Renderer.render` with and without the occupancy grid (updated at 17 times over
   [0, 1], the trainer's default) at the demo's renderer settings, and their ``speedup``: on the demo's toy
   scene (a ball on a box, mostly empty space; analytic, so forward only, as in evaluation) and on the demo
   field at initialisation (its density blob; forward + backward, as in training). ``samples_kept`` is the
   fraction of samples the grid lets through (1 / samples_kept bounds the speed-up), ``max_abs_diff`` the
   largest rgb difference between the two renders.
``machine.matmul_gflops`` (a float32 1024³ matrix product) calibrates the machine.

Times are medians of repeated runs after a warm-up. Run with OMP_NUM_THREADS set to the cores you want
measured (the numbers in bench/README.md used 1 thread).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fourdfy.fields.hashgrid import HashGridEncoding, tcnn_grid_layout
from fourdfy.kinds import UPDATE_KINDS, UpdateKind

# tiny-cuda-nn's spatial hash primes (include/tiny-cuda-nn/encodings/grid.h, fast_hash).
TCNN_PRIMES = (1, 2654435761, 805459861, 3674653429)


def naive_hashgrid(x: Tensor, params: Tensor, enc: HashGridEncoding) -> Tensor:
    """Reference hash-grid encoding: x [N, D] in [0, 1] -> [N, L*F], one level and one corner at a time.

    tiny-cuda-nn semantics (grid.h): pos = scale_l·x + 0.5, cell = floor(pos), frac = pos − cell; corner
    c = cell + b weighted by Π_d (b_d ? frac_d : 1 − frac_d); dense levels index Σ_d c_d·res^d mod T,
    hashed ones XOR_d (c_d·P_d mod 2^32) mod T. pos is formed in float64 and rounded once, as tcnn's fmaf.
    Differentiable w.r.t. params by plain autograd.
    """
    n, dims = x.shape
    layout = tcnn_grid_layout(dims, enc.n_levels, enc.log2_hashmap_size, enc.base_resolution,
                              enc.per_level_scale)
    f = enc.n_features_per_level
    table = params.view(-1, f)
    outputs = []
    for level in range(enc.n_levels):
        size = layout.table_sizes[level]
        level_table = table[layout.level_offsets[level]: layout.level_offsets[level] + size]
        pos = (x.double() * layout.scales[level] + 0.5).to(x.dtype)
        cell = torch.floor(pos)
        frac = pos - cell
        cell = cell.long()
        res = layout.resolutions[level]
        acc = x.new_zeros(n, f)
        for corner in itertools.product((0, 1), repeat=dims):
            weight = x.new_ones(n)
            index = torch.zeros(n, dtype=torch.long)
            for d, b in enumerate(corner):
                c = cell[:, d] + b
                weight = weight * (frac[:, d] if b else 1.0 - frac[:, d])
                if layout.hashed[level]:
                    index = index ^ ((c * TCNN_PRIMES[d]) & 0xFFFFFFFF)
                else:
                    index = index + c * res**d
            acc = acc + weight[:, None] * level_table[index % size]
        outputs.append(acc)
    return torch.cat(outputs, dim=1)


def _median_time(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _interleaved_medians(fns: list[Callable[[], Any]], warmup: int, reps: int) -> list[float]:
    """Median seconds of each fn, timed in alternation so that load drifting on a shared machine hits all
    of them alike (their ratio is the robust figure)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def matmul_gflops(reps: int) -> float:
    """float32 1024³ matrix-product throughput: the machine's calibration figure."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    seconds = _median_time(lambda: a @ b, 1, reps)
    return 2 * 1024**3 / seconds / 1e9


def paper_grid(n_dims: int) -> HashGridEncoding:
    """The paper's hash grid (fourdfy.config.HashGridConfig defaults) on n_dims inputs."""
    from fourdfy.fields.hashgrid import HashGridConfig

    g = HashGridConfig()
    return HashGridEncoding(n_dims, g.n_levels, g.n_features_per_level, g.log2_hashmap_size,
                            g.base_resolution, g.per_level_scale)


def bench_encoding(n_points: int, reps: int, warmup: int = 1) -> dict[str, Any]:
    """Forward + backward points/s of ours and of the naive reference, 3D and 4D paper grids."""
    out: dict[str, Any] = {"n_points": n_points}
    gen = torch.Generator().manual_seed(0)
    for name, dims in (("3d", 3), ("4d", 4)):
        enc = paper_grid(dims)
        with torch.no_grad():  # values of the size of a trained grid, not the ±1e-4 initialisation
            enc.params.uniform_(-1.0, 1.0, generator=gen)
        x = torch.rand(n_points, dims, generator=gen)
        grad_out = torch.randn(n_points, enc.n_output_dims, generator=gen)

        def ours(enc: HashGridEncoding = enc, x: Tensor = x, g: Tensor = grad_out) -> None:
            enc.params.grad = None
            enc(x).backward(g)

        def naive(enc: HashGridEncoding = enc, x: Tensor = x, g: Tensor = grad_out) -> None:
            enc.params.grad = None
            naive_hashgrid(x, enc.params, enc).backward(g)

        t_ours, t_naive = _interleaved_medians([ours, naive], warmup, reps)
        with torch.no_grad():
            diff = float((enc(x) - naive_hashgrid(x, enc.params, enc)).abs().max())
        out[name] = {
            "ours_points_per_s": round(n_points / t_ours),
            "naive_points_per_s": round(n_points / t_naive),
            "speedup": round(t_naive / t_ours, 2),
            "max_abs_diff": diff,
        }
    return out


def _compose_demo(overrides: list[str]) -> Any:
    """The CPU demo's RunConfig, composed by Hydra exactly as run.py does."""
    from fourdfy.config import compose_run_config

    return compose_run_config(["preset=demo_cpu", *overrides])


def bench_renderer(cfg: Any, size: int, reps: int, warmup: int = 1) -> dict[str, Any]:
    """4 views of size² rendered forward + backward on the demo field; the field alone on the same points."""
    from fourdfy.build import build_field
    from fourdfy.render.trajectories import orbit_cameras
    from fourdfy.render.volume import Renderer

    torch.manual_seed(0)
    field, _ = build_field(cfg.field)
    renderer = Renderer(cfg.renderer)
    n_views = 4
    cameras = orbit_cameras(n_views)  # the evaluation camera: elevation 15°, distance 3, FoV 40°
    times = torch.zeros(n_views)
    gen = torch.Generator().manual_seed(0)

    def render() -> None:
        field.zero_grad(set_to_none=True)
        out = renderer.render(field, cameras, times, size, size, generator=gen, train=True)
        (out["rgb"].sum() + out["opacity"].sum()).backward()

    n_rays = n_views * size * size
    # The renderer's own sample points (recorded from one render), so the field alone sees the same,
    # spatially coherent, memory accesses: random points would be slower (cache misses).
    recorded: list[tuple[Tensor, Tensor]] = []

    def recording_field(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        recorded.append((x.detach(), t.detach()))
        return field(x, t)

    with torch.no_grad():
        renderer.render(recording_field, cameras, times, size, size, generator=gen, train=True)
    points = torch.cat([x for x, _ in recorded])
    point_times = torch.cat([t for _, t in recorded])

    def field_only() -> None:
        field.zero_grad(set_to_none=True)
        density, rgb = field(points, point_times)
        (density.sum() + rgb.sum()).backward()

    t_render, t_field = _interleaved_medians([render, field_only], warmup, reps)
    return {
        "n_samples_per_ray": cfg.renderer.n_samples,
        "n_rays": n_rays,
        "rays_per_s": round(n_rays / t_render),
        "field_share": round(t_field / t_render, 3),
    }


def _occupancy_case(scene: Any, renderer_cfg: Any, times: Tensor, grad: bool, size: int, reps: int,
                    warmup: int) -> dict[str, Any]:
    """One scene rendered (4 orbit views of size², view b at times[b]) with and without the grid."""
    import dataclasses

    from fourdfy.render.trajectories import orbit_cameras
    from fourdfy.render.volume import Renderer
    from fourdfy.trainer import TrainerConfig

    cameras = orbit_cameras(len(times))
    dense = Renderer(dataclasses.replace(renderer_cfg, occupancy_grid=False))
    sparse = Renderer(dataclasses.replace(renderer_cfg, occupancy_grid=True))
    sparse.update_occupancy(scene, torch.linspace(0.0, 1.0, TrainerConfig().occupancy_times))

    def render(renderer: Renderer, field: Any) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(0)
        return renderer.render(field, cameras, times, size, size, generator=gen)

    n_queried: list[int] = []
    rgbs: list[Tensor] = []
    for renderer in (dense, sparse):
        points: list[int] = []

        def counting(x: Tensor, t: Tensor, points: list[int] = points) -> tuple[Tensor, Tensor]:
            points.append(x.shape[0])
            return scene(x, t)

        with torch.no_grad():
            rgbs.append(render(renderer, counting)["rgb"])
        n_queried.append(sum(points))

    def run(renderer: Renderer) -> None:
        if not grad:
            with torch.no_grad():
                render(renderer, scene)
            return
        scene.zero_grad(set_to_none=True)
        result = render(renderer, scene)
        (result["rgb"].sum() + result["opacity"].sum()).backward()

    t_dense, t_sparse = _interleaved_medians([lambda: run(dense), lambda: run(sparse)], warmup, reps)
    n_rays = len(times) * size * size
    return {
        "backward": grad,
        "occupied_cells": round(float(sparse.occupancy.occupied.float().mean()), 4),
        "samples_kept": round(n_queried[1] / n_queried[0], 4),
        "dense_rays_per_s": round(n_rays / t_dense),
        "grid_rays_per_s": round(n_rays / t_sparse),
        "speedup": round(t_dense / t_sparse, 2),
        "max_abs_diff": float((rgbs[0] - rgbs[1]).abs().max()),
    }


def bench_occupancy(cfg: Any, size: int, reps: int, warmup: int = 1) -> dict[str, Any]:
    """Rays/s with and without the occupancy grid: the demo's toy scene (forward), its field (+ backward)."""
    from fourdfy.build import build_field
    from fourdfy.synthetic.scenes import get_scene

    torch.manual_seed(0)
    field, _ = build_field(cfg.field)
    n_views = 4
    return {
        "n_rays": n_views * size * size,
        "n_samples_per_ray": cfg.renderer.n_samples,
        "toy_scene": _occupancy_case(get_scene(cfg.prompt), cfg.renderer, torch.linspace(0.0, 1.0, n_views),
                                     False, size, reps, warmup),
        "demo_field_init": _occupancy_case(field, cfg.renderer, torch.zeros(n_views), True, size, reps, warmup),
    }


def bench_iterations(cfg: Any, reps: int) -> dict[str, Any]:
    """Seconds of Trainer.step() per update kind on the CPU demo (synthetic priors)."""
    from fourdfy.build import build_trainer

    cfg.trainer.progress_bar = False
    with tempfile.TemporaryDirectory(prefix="fourdfy-bench-") as run_dir:
        trainer = build_trainer(cfg, Path(run_dir))
        # First iteration of the stage where each kind occurs: that stage's learning rates and losses.
        ends = trainer.schedule.stage_ends
        first = {UpdateKind.MULTIVIEW: 0, UpdateKind.IMAGE: ends[0], UpdateKind.VIDEO: ends[1]}
        seconds: dict[str, float] = {}
        for kind in UPDATE_KINDS:
            trainer.schedule.kind = lambda i, gen, k=kind: k  # type: ignore[method-assign]

            def step(k: UpdateKind = kind) -> None:
                trainer.iteration = first[k]
                trainer.step()

            seconds[kind.value] = _median_time(step, 1, reps)
    return {
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "over_3d": {k: round(v / seconds["3d"], 2) for k, v in seconds.items()},
    }


def run(quick: bool) -> dict[str, Any]:
    reps = 1 if quick else 5
    warmup = 0 if quick else 1  # the toy iterations always warm up once (first-call set-up)
    start = time.perf_counter()
    cfg = _compose_demo([])
    result = {
        "quick": quick,
        "machine": {"torch_threads": torch.get_num_threads(), "matmul_gflops": round(matmul_gflops(reps), 1)},
        "encoding": bench_encoding(1 << 10 if quick else 1 << 15, reps, warmup),
        "renderer": bench_renderer(cfg, 8 if quick else 32, reps, warmup),
        "toy_iteration": bench_iterations(cfg, reps),
        "occupancy": bench_occupancy(cfg, 8 if quick else 32, reps, warmup),
    }
    result["total_s"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition (a smoke run)")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    text = json.dumps(run(args.quick), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
