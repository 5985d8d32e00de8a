"""The two marching modes of the renderer on CPU, printed as JSON: ratios only, so machines compare.

    python -m bench.marching [--size 32] [--views 4] [--reps 3] [--out FILE]

Two random fields of Gaussian blobs (random size, density and colour inside the box [-1, 1]³, zero outside,
learnable amplitudes so a backward has something to reach): ``smoke`` (peak densities 2–30: thick media of
low density) and ``solid`` (the same blobs × 10: peak densities 20–300, near-opaque). Each is rendered from
``--views`` orbit cameras at ``--size``² by

- ``uniform_128``: marching=uniform, 128 samples through the bounding sphere, no grid (conf/preset/paper.yaml
  before issue #15's switch, without its grid);
- ``uniform_128_grid``: the same with the paper preset's 56³ grid over [-√3, √3]³, built at t = 0;
- ``authors``: marching=authors at its defaults (step 1.732·2/512, α pruning at 0.01, early stop 1e-4, the
  32³ EMA grid after the 17 updates of the authors' warm-up, iterations 0, 16, ..., 256);

and per mode the JSON gives ``samples_per_ray``: field evaluations per ray with grad (``with_grad``) and in
the authors' no-grad α pass (``no_grad``); ``time_ratio``: forward + backward time (training render, jitter
on) over uniform_128's, medians of ``--reps``; ``max_abs_drgb`` and ``mean_abs_drgb``: the evaluation
render (no jitter) against a 2048-sample dense uniform render of the same field.

What the authors' marching cannot show: a sample with σ·step < −ln(0.99), σ < 1.49 per unit length at
step 0.00677, is pruned however thick the medium (and the grid drops cells below min(0.01, mean)/step),
so low-density smoke differs from the dense render by up to its whole opacity; near-opaque fields do not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fourdfy.render.trajectories import orbit_cameras
from fourdfy.render.volume import MarchingMode, Renderer, RendererConfig


class SmokeField(nn.Module):
    """n_blobs Gaussian blobs: density Σ_b a_b·exp(−|x − c_b|²/(2 s_b²)), colour the density-weighted mean of
    the blobs' colours; zero outside the box [-1, 1]³."""

    def __init__(self, n_blobs: int = 12, seed: int = 0, density_scale: float = 1.0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.centres = torch.rand(n_blobs, 3, generator=gen) * 1.2 - 0.6
        self.scales = 0.05 + 0.15 * torch.rand(n_blobs, generator=gen)
        self.amplitude = nn.Parameter(density_scale * (2.0 + 28.0 * torch.rand(n_blobs, generator=gen)))
        self.colours = torch.rand(n_blobs, 3, generator=gen)
        self.calls: list[tuple[bool, int]] = []  # (grad enabled, points) per call

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((torch.is_grad_enabled(), x.shape[0]))
        d2 = ((x[:, None, :] - self.centres) ** 2).sum(-1)  # [N, B]
        per_blob = self.amplitude * torch.exp(-d2 / (2 * self.scales**2))
        density = per_blob.sum(-1) * (x.abs() <= 1).all(dim=-1)
        rgb = (per_blob[..., None] * self.colours).sum(1) / (per_blob.sum(-1, keepdim=True) + 1e-6)
        return density, rgb


def _renderers(field: SmokeField) -> dict[str, Renderer]:
    uniform = Renderer(RendererConfig(n_samples=128))
    grid = Renderer(RendererConfig(n_samples=128, occupancy_grid=True, occupancy_resolution=56))
    with torch.no_grad():
        grid.update_occupancy(field, torch.tensor([0.0]))
    authors = Renderer(RendererConfig(marching=MarchingMode.authors, occupancy_grid=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for iteration in range(0, authors.cfg.authors.grid_warmup + 1, 16):  # nerfacc: every n=16 steps
            authors.update_occupancy(field, torch.tensor([0.0]), iteration=iteration, generator=generator)
    return {"uniform_128": uniform, "uniform_128_grid": grid, "authors": authors}


def run(size: int = 32, views: int = 4, reps: int = 3) -> dict[str, Any]:
    result: dict[str, Any] = {"size": size, "views": views, "reference": "uniform, 2048 samples"}
    for name, scale in (("smoke", 1.0), ("solid", 10.0)):
        result[name] = _compare(SmokeField(density_scale=scale), size, views, reps)
    return result


def _compare(field: SmokeField, size: int, views: int, reps: int) -> dict[str, Any]:
    cams = orbit_cameras(views, elevation=20.0)
    times = torch.zeros(views)
    n_rays = views * size * size
    with torch.no_grad():
        reference = Renderer(RendererConfig(n_samples=2048, chunk_rays=1024)).render(
            field, cams, times, size, size, train=False)["rgb"]
    result: dict[str, Any] = {"modes": {}}
    seconds = {}
    for name, renderer in _renderers(field).items():
        with torch.no_grad():
            rgb = renderer.render(field, cams, times, size, size, train=False)["rgb"]
        diff = (rgb - reference).abs()
        field.calls.clear()
        runs = []
        for rep in range(reps + 1):  # the first is a warm-up
            field.zero_grad()
            start = time.perf_counter()
            out = renderer.render(field, cams, times, size, size, generator=torch.Generator().manual_seed(rep))
            out["rgb"].sum().backward()
            runs.append(time.perf_counter() - start)
        calls = field.calls[: len(field.calls) // (reps + 1)]  # one render's calls
        seconds[name] = statistics.median(runs[1:])
        result["modes"][name] = {
            "samples_per_ray": {
                "with_grad": round(sum(n for grad, n in calls if grad) / n_rays, 1),
                "no_grad": round(sum(n for grad, n in calls if not grad) / n_rays, 1),
            },
            "max_abs_drgb": round(float(diff.max()), 4),
            "mean_abs_drgb": round(float(diff.mean()), 5),
        }
    for name, entry in result["modes"].items():
        entry["time_ratio"] = round(seconds[name] / seconds["uniform_128"], 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.marching", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--views", type=int, default=4, help="orbit cameras")
    parser.add_argument("--reps", type=int, default=3, help="timed renders per mode (after one warm-up)")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    text = json.dumps(run(args.size, args.views, args.reps), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
