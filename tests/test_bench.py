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
from bench.gpu import (
    FIELD_CHECKPOINT_CHUNK_TINY,
    PART_NAMES,
    PartTimer,
    bench_overrides,
    expected_kind_counts,
    markdown_table,
    occupancy_update_count,
    projected_hours,
)
from bench.gpu import main as gpu_main
from fourdfy.build import build_field
from fourdfy.config import compose_run_config
from fourdfy.fields.hashgrid import HashGridEncoding
from fourdfy.hybrid import ScheduleConfig
from fourdfy.kinds import UpdateKind

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
        # speedup is rounded to 0.01 (±0.005) and the rates to whole points/s: whatever the machine's speed
        assert entry["speedup"] == pytest.approx(ratio, rel=0.01, abs=0.0051)
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
        assert entry["speedup"] == pytest.approx(ratio, rel=0.01, abs=0.0051)  # rounded to 0.01, as above
        assert 0.0 <= entry["max_abs_diff"] < float("inf")


def test_gpu_bench_tiny_runs_every_kind_with_the_occupancy_grid(capsys: pytest.CaptureFixture[str]) -> None:
    """The CPU smoke test of bench.gpu: every kind runs, with the grid built before timing."""
    assert gpu_main(["--tiny", "--iters", "1", "--warmup", "0"]) == 0  # in-process: saves the imports
    result = json.loads(capsys.readouterr().out)
    assert result["field_checkpoint_chunk"] == FIELD_CHECKPOINT_CHUNK_TINY
    grid = result["occupancy"]
    # preset=paper marches as the authors (renderer.marching=authors): their 32³ EMA grid over the box [-1, 1]³.
    assert grid["grid"] is True and grid["marching"] == "authors" and grid["resolution"] == 32
    # The random-weight field's density blob (radius ~0.5) fills a small part of the box.
    assert 0.0 < grid["occupied_cells"] < 0.5 and grid["update_s"] > 0
    assert set(result["kinds"]) == {"3d", "img", "vid"}
    assert result["device"] == "cpu" and result["torch"] == torch.__version__ and result["date"].endswith("Z")
    assert "guidance.weights=random_tiny" in result["overrides"]
    for kind, entry in result["kinds"].items():
        assert "error" not in entry, (kind, entry)
        # Cameras look at the blob, so some samples reach the field, but far fewer than the authors' marching
        # places on a ray through the box (up to 512; 296 on a central chord): empty cells and α pruning skip them.
        assert 0.0 < entry["field_samples_per_ray"] < 296, (kind, entry["field_samples_per_ray"])
        assert entry["iteration_s"] > 0 and entry["floor_s"] > 0
        parts = entry["iteration_parts_s"]
        assert set(parts) == set(PART_NAMES), (kind, parts)
        for name in ("render_forward", "vae_encode_forward", "prior_forward", "field_backward", "optimiser"):
            assert parts[name] > 0, (kind, name)
        assert (parts["lora_finetune"] > 0) == (kind == "img")  # only VSD fine-tunes
    projection = result["projection"]
    assert projection["expected_counts"] == {"3d": 72500.0, "img": 37500.0, "vid": 25000.0}  # paper schedule
    iteration = {k: e["iteration_s"] for k, e in result["kinds"].items()}
    expected = (72500 * iteration["3d"] + 37500 * iteration["img"] + 25000 * iteration["vid"]) / 3600
    assert projection["hours_per_scene"] == pytest.approx(expected, abs=6e-4)  # rounded to 3 decimals
    assert 0 < projection["floor_hours_per_scene"] < projection["hours_per_scene"]


def test_gpu_bench_runs_the_paper_preset_with_only_its_overrides() -> None:
    """bench.gpu's config is conf/preset/paper.yaml's (paper-size field, 56³ grid, 128 samples per ray);
    lowmem sets the priors' memory keys, --no-occupancy and --n-samples the renderer, and nothing else moves."""
    paper = compose_run_config(["preset=paper"])
    bench = compose_run_config(bench_overrides("paper", tiny=False, device="cuda"))
    assert bench.field == paper.field and bench.renderer == paper.renderer and bench.schedule == paper.schedule
    assert str(bench.guidance.weights) == "random" and bench.trainer == paper.trainer
    bench.guidance.weights = paper.guidance.weights
    assert bench.guidance == paper.guidance
    assert compose_run_config(bench_overrides("paper_24gb", tiny=False, device="cuda")).preset.name == "paper_24gb"
    extra = compose_run_config(bench_overrides("paper", False, "cuda", extra=("guidance.zeroscope.offload=true",)))
    assert extra.guidance.zeroscope.offload and not paper.guidance.zeroscope.offload
    assert bench.field.static_grid.log2_hashmap_size == 19 and bench.renderer.n_samples == 128
    lowmem = compose_run_config(bench_overrides("lowmem", tiny=False, device="cuda", occupancy=False, n_samples=64))
    for prior in (lowmem.guidance.mvdream, lowmem.guidance.sd_vsd, lowmem.guidance.zeroscope):
        assert prior.offload and prior.vae_gradient_checkpointing
    assert lowmem.guidance.zeroscope.vae_grad_frames == 4
    assert not lowmem.renderer.occupancy_grid and lowmem.renderer.n_samples == 64
    assert lowmem.field == paper.field and lowmem.schedule == paper.schedule


def test_hashgrid_chunk_size_key_changes_the_chunking_not_the_values() -> None:
    small = ["field.static_grid.log2_hashmap_size=10", "field.dynamic_grid.log2_hashmap_size=10"]
    paper = compose_run_config(["preset=paper", *small]).field
    assert paper.static_grid.chunk_size == paper.dynamic_grid.chunk_size == 1 << 18  # the GPU preset's chunks
    field, _ = build_field(paper)
    chunked, _ = build_field(compose_run_config(["preset=paper", *small, "field.static_grid.chunk_size=64",
                                                 "field.dynamic_grid.chunk_size=64"]).field)
    chunked.load_state_dict(field.state_dict())
    assert chunked.static_encoding._plan.chunk_size == chunked.dynamic_encoding._plan.chunk_size == 64
    x, t = torch.rand(500, 3) - 0.5, torch.rand(500)
    with torch.no_grad():
        for a, b in zip(field(x, t), chunked(x, t), strict=True):
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


def test_expected_kind_counts_and_projected_hours_by_hand() -> None:
    # Paper: stage 1 all 3D (10,000); stage 2 half 3D, half IMG (25,000); stage 3 3D 1/2, IMG 1/4, VID 1/4 (100,000).
    paper = expected_kind_counts(ScheduleConfig())
    assert paper == {UpdateKind.MULTIVIEW: 10000 + 12500 + 50000, UpdateKind.IMAGE: 12500 + 25000,
                     UpdateKind.VIDEO: 25000}
    # p_3d = 0.25, p_img = 0.5 over [4, 8, 16]: 3D 4 + 8/4 + 16/4 = 10; IMG 8·3/4 + 16·3/8 = 12; VID 16·3/8 = 6.
    counts = expected_kind_counts(ScheduleConfig(stage_lengths=[4, 8, 16], p_3d=0.25, p_img=0.5))
    assert counts == {UpdateKind.MULTIVIEW: 10.0, UpdateKind.IMAGE: 12.0, UpdateKind.VIDEO: 6.0}
    # 10·2 s + 12·1 s + 6·4 s = 56 s.
    assert projected_hours({"3d": 2.0, "img": 1.0, "vid": 4.0}, counts) == pytest.approx(56 / 3600, rel=1e-12)
    assert projected_hours({"3d": 2.0, "img": 1.0}, counts) is None  # VID is drawn but was not timed
    no_video = expected_kind_counts(ScheduleConfig(stage_lengths=[4, 8, 0], p_3d=0.25, p_img=0.5))
    assert projected_hours({"3d": 2.0, "img": 1.0}, no_video) == pytest.approx((6 * 2 + 6 * 1) / 3600, rel=1e-12)


def test_occupancy_update_count_by_hand() -> None:
    # Iterations 4..39 of [10, 10, 20]: the first (4), multiples of 8 (8, 16, 24, 32), stage starts (10, 20).
    assert occupancy_update_count(ScheduleConfig(stage_lengths=[10, 10, 20]), warmup=4, every=8) == 7
    assert occupancy_update_count(ScheduleConfig(stage_lengths=[10, 10, 20]), warmup=40, every=8) == 0
    # authors' EMA grid: every 8 steps of each stage from its step 0: ceil(10/8) + ceil(10/8) + ceil(20/8) = 2+2+3
    assert occupancy_update_count(ScheduleConfig(stage_lengths=[10, 10, 20]), warmup=4, every=8, authors=True) == 7
    assert occupancy_update_count(ScheduleConfig(stage_lengths=[16, 0, 17]), warmup=4, every=8, authors=True) == 5


def test_part_timer_splits_an_iteration_at_its_marks() -> None:
    """Marks at known times (the CPU clock's values, set by hand) give each part as the difference."""
    timer = PartTimer(torch.device("cpu"))
    marks = {"step_start": [0.0], "render_start": [1.0], "render_end": [3.0], "prior_start": [3.5],
             "vae_start": [4.0, 6.0], "vae_end": [5.0, 6.5], "prior_end": [8.0], "renders_grad": [9.0],
             "optimiser_start": [12.0], "optimiser_end": [12.5], "step_end": [13.0]}
    timer.marks = {k: list(v) for k, v in marks.items()}
    assert timer.parts() == {"render_forward": 2.0, "vae_encode_forward": 1.5, "prior_forward": 3.0,
                             "vae_backward": 1.0, "field_backward": 3.0, "optimiser": 0.5,
                             "other": 13.0 - (2.0 + 1.5 + 3.0 + 1.0 + 3.0 + 0.5)}
    del timer.marks["renders_grad"]  # a skipped update (non-finite loss) has no backward
    assert timer.parts() is None


def test_markdown_table_has_a_row_per_kind() -> None:
    result = {"preset": "paper", "device": "NVIDIA H200", "date": "2026-12-01T10:00:00Z",
              "projection": {"hours_per_scene": 20.5, "floor_hours_per_scene": 3.1},
              "kinds": {"3d": {"n_views": 4, "render_size": [256, 256], "iteration_s": 0.5, "floor_s": 0.1,
                               "peak_memory_gib": 20.0, "iteration_parts_s": {"render_forward": 0.2}},
                        "vid": {"n_views": 16, "render_size": [160, 288], "error": "CUDA out of memory: x"}}}
    lines = markdown_table([result]).splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| paper | NVIDIA H200 | 2026-12-01 | 3d (4 × 256×256) | 0.5 | 0.1 | 20.0 | 0.2 |" in lines[2]
    assert lines[2].endswith("| 20.5 | 3.1 |") and "CUDA out of memory" in lines[3]
