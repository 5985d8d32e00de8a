"""The benchmarks' instruments: the naive hash-grid reference agrees with the encoding, bench.cpu --quick
prints the documented JSON, bench.gpu --tiny runs every kind with the occupancy grid and reports what it
skipped, and bench.gpu refuses a machine without CUDA with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cpu import main as cpu_main
from bench.cpu import naive_hashgrid
from bench.gpu import FIELD_CHECKPOINT_CHUNK_TINY, OCCUPANCY_RESOLUTION_TINY, bench_overrides, set_hashgrid_chunk
from bench.gpu import main as gpu_main
from fourdfy.build import build_field
from fourdfy.config import compose_run_config
from fourdfy.fields.hashgrid import HashGridEncoding

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], env_extra: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(
    ("dims", "features", "log2", "base", "scale"),
    [(3, 2, 12, 4, 1.5), (4, 2, 14, 2, 2.0), (3, 1, 10, 8, 1.3), (2, 4, 8, 16, 1.0)],
)
def test_naive_reference_matches_the_encoding(
    dims: int, features: int, log2: int, base: int, scale: float
) -> None:
    """Forward values and table gradients agree (mixed dense and hashed levels in the first three)."""
    enc = HashGridEncoding(dims, 5, features, log2, base, scale)
    gen = torch.Generator().manual_seed(dims * 10 + features)
    with torch.no_grad():
        enc.params.uniform_(-1.0, 1.0, generator=gen)
    x = torch.rand(300, dims, generator=gen)
    x[0] = 1.0  # the upper corner wraps around in dense levels
    x[1] = 0.0
    g = torch.randn(300, enc.n_output_dims, generator=gen)
    ours = enc(x)
    ours.backward(g)
    grad_ours = enc.params.grad.clone()
    enc.params.grad = None
    ref = naive_hashgrid(x, enc.params, enc)
    ref.backward(g)
    torch.testing.assert_close(ref, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.params.grad, grad_ours, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # builds the demo's toy priors: their data sets are rendered once per test session
def test_cpu_bench_quick_prints_json_with_the_expected_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert cpu_main(["--quick"]) == 0  # in-process: the subprocess would pay the imports again
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"machine", "encoding", "renderer", "toy_iteration", "occupancy"}
    for grid in ("3d", "4d"):
        entry = result["encoding"][grid]
        assert entry["ours_points_per_s"] > 0 and entry["naive_points_per_s"] > 0
        ratio = entry["ours_points_per_s"] / entry["naive_points_per_s"]
        assert entry["speedup"] == pytest.approx(ratio, rel=0.02)
        assert entry["max_abs_diff"] < 1e-4
    renderer = result["renderer"]
    assert renderer["rays_per_s"] > 0 and renderer["n_samples_per_ray"] == 32  # the demo preset's
    assert set(result["toy_iteration"]["seconds"]) == {"3d", "img", "vid"}
    assert result["toy_iteration"]["over_3d"]["3d"] == 1.0
    occupancy = result["occupancy"]
    assert occupancy["n_rays"] == 4 * 8 * 8 and occupancy["n_samples_per_ray"] == 32  # 4 views of 8² (quick)
    for case, backward in (("toy_scene", False), ("demo_field_init", True)):
        entry = occupancy[case]
        assert entry["backward"] is backward
        # Both scenes are mostly empty space (a ball on a box; a blob of radius ~0.5 in the √3 sphere):
        # the grid must skip some samples and keep some.
        assert 0.0 < entry["samples_kept"] < 1.0 and 0.0 < entry["occupied_cells"] < 1.0
        # speedup = t_dense / t_grid, and each rate is n_rays over its time (rounded to whole rays/s)
        ratio = entry["grid_rays_per_s"] / entry["dense_rays_per_s"]
        assert entry["speedup"] == pytest.approx(ratio, rel=0.02)
        assert 0.0 <= entry["max_abs_diff"] < float("inf")


def test_gpu_bench_tiny_runs_every_kind_with_the_occupancy_grid(capsys: pytest.CaptureFixture[str]) -> None:
    """The CPU smoke test of bench.gpu: every kind runs, with the grid built before timing."""
    assert gpu_main(["--tiny", "--iters", "1", "--warmup", "0"]) == 0  # in-process: saves the imports
    result = json.loads(capsys.readouterr().out)
    assert result["field_checkpoint_chunk"] == FIELD_CHECKPOINT_CHUNK_TINY
    grid = result["occupancy"]
    assert grid["grid"] is True and grid["resolution"] == OCCUPANCY_RESOLUTION_TINY
    assert grid["radius"] == pytest.approx(3**0.5, abs=1e-6) and grid["threshold"] == 0.01  # paper preset
    # The random-weight field's density blob (radius ~0.5) fills a small part of the cube [-√3, √3]³.
    assert 0.0 < grid["occupied_cells"] < 0.5 and grid["update_s"] > 0
    assert set(result["kinds"]) == {"3d", "img", "vid"}
    for kind, entry in result["kinds"].items():
        assert "error" not in entry, (kind, entry)
        # Cameras look at the blob, so some samples reach the field; most of each ray is empty space.
        assert 0.0 < entry["samples_kept"] < 1.0, (kind, entry["samples_kept"])
        assert entry["iteration_s"] > 0 and entry["floor_s"] > 0


def test_gpu_bench_runs_the_paper_preset_with_only_its_overrides() -> None:
    """bench.gpu's config is conf/preset/paper.yaml's (paper-size field, 56³ grid, 128 samples per ray);
    lowmem sets the priors' memory keys, --no-occupancy and --n-samples the renderer, and nothing else moves."""
    paper = compose_run_config(["preset=paper"])
    bench = compose_run_config(bench_overrides("paper", tiny=False, device="cuda"))
    assert bench.field == paper.field and bench.renderer == paper.renderer and bench.schedule == paper.schedule
    assert bench.guidance == paper.guidance and bench.trainer == paper.trainer
    assert bench.field.static_grid.log2_hashmap_size == 19 and bench.renderer.n_samples == 128
    lowmem = compose_run_config(bench_overrides("lowmem", tiny=False, device="cuda", occupancy=False, n_samples=64))
    for prior in (lowmem.guidance.mvdream, lowmem.guidance.sd_vsd, lowmem.guidance.zeroscope):
        assert prior.offload and prior.vae_gradient_checkpointing
    assert lowmem.guidance.zeroscope.vae_grad_frames == 4
    assert not lowmem.renderer.occupancy_grid and lowmem.renderer.n_samples == 64
    assert lowmem.field == paper.field and lowmem.schedule == paper.schedule


def test_set_hashgrid_chunk_changes_the_chunking_not_the_values() -> None:
    field, _ = build_field(compose_run_config(["preset=paper", "field.static_grid.log2_hashmap_size=10",
                                               "field.dynamic_grid.log2_hashmap_size=10"]).field)
    x, t = torch.rand(500, 3) - 0.5, torch.rand(500)
    with torch.no_grad():
        before = field(x, t)
        set_hashgrid_chunk(field, 64)
        after = field(x, t)
    assert field.static_encoding._plan.chunk_size == field.dynamic_encoding._plan.chunk_size == 64
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_bench_without_cuda_exits_nonzero_with_a_clear_message() -> None:
    proc = _run(["-m", "bench.gpu", "--preset", "paper"], {"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU is available" in proc.stderr and "--tiny" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_gpu_bench_rejects_unknown_kinds() -> None:
    proc = _run(["-m", "bench.gpu", "--kinds", "3d,audio"], {"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2 and "--kinds" in proc.stderr and "Traceback" not in proc.stderr
