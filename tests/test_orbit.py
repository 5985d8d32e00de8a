"""Evaluation trajectories (fourdfy/render/trajectories.py), render_views, eval/orbit.py (rendering a run's
checkpoint) and the toy world's ground-truth metrics (fourdfy/synthetic/metrics.py).

Trajectories are checked against the authors' recipe written out by hand; renders against a direct
Renderer call; metrics against numbers computed here from the analytic scenes.
"""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from eval import orbit
from fourdfy.build import build_field
from fourdfy.checkpoint import save_checkpoint
from fourdfy.config import RunConfig, compose_run_config
from fourdfy.render.cameras import cameras_from_spherical
from fourdfy.render.trajectories import EVAL_CAMERA, authors_path, orbit_path
from fourdfy.render.views import WHITE, render_views
from fourdfy.render.volume import Renderer, RendererConfig
from fourdfy.rundir import RunDir
from fourdfy.synthetic import metrics as gt_metrics
from fourdfy.synthetic.priors import ToyDataConfig, render_scene
from fourdfy.synthetic.scenes import get_scene

REPO = Path(__file__).resolve().parents[1]
BALL = "a red ball bouncing on a blue box"
CUBE = "a yellow cube spinning"


def make_run(run_dir: Path, cfg: RunConfig, iteration: int, seed: int = 0) -> None:
    """A run directory as the trainer leaves it: config.yaml, fingerprint, one checkpoint (random field)."""
    RunDir(run_dir).prepare(cfg)
    torch.manual_seed(seed)
    field, background = build_field(cfg.field)
    save_checkpoint(run_dir / "checkpoints", iteration,
                    {"iteration": iteration, "field": field.state_dict(), "background": background.state_dict()})


# ----------------------------------------------------------------------------------------------
# Trajectories


def test_the_evaluation_camera_is_the_authors_eval_camera() -> None:
    # data.eval_camera_distance: 3.0, data.eval_fovy_deg: 40 (authors' stage configs), elevation 15 (threestudio).
    assert (EVAL_CAMERA.elevation_deg, EVAL_CAMERA.distance, EVAL_CAMERA.fovy_deg) == (15.0, 3.0, 40.0)
    assert (orbit.OrbitConfig().elevation_deg, orbit.OrbitConfig().distance, orbit.OrbitConfig().fovy_deg) == (
        15.0, 3.0, 40.0)
    assert gt_metrics.GTMetricsConfig().camera == EVAL_CAMERA


def test_authors_trajectory_matches_the_official_124_views() -> None:
    cams, times = authors_path(64)
    # By hand from uncond.py (motion_smooth, num_frames 16 × factor 4): per loop 16 views held at the start
    # azimuth, then 15 views of linspace(start, start − 90, 16)[1:] (6° steps).
    expected_az: list[float] = []
    for start in (360.0, 270.0, 180.0, 90.0):
        expected_az += [start] * 16 + [start - 6.0 * j for j in range(1, 16)]
    expected_t = [k / 63 for k in range(62)] * 2
    assert len(cams) == 124 == len(times)
    np.testing.assert_allclose(cams.azimuth.numpy(), expected_az, atol=1e-4)
    np.testing.assert_allclose(times.numpy(), expected_t, atol=1e-6)
    assert cams.elevation.unique().tolist() == [15.0]
    assert torch.allclose(cams.fovy, torch.full((124,), math.radians(40.0)))
    # Camera centres on the eval sphere: 3·(cos e cos a, cos e sin a, sin e).
    e, a = math.radians(15.0), np.radians(expected_az)
    centres = 3.0 * np.stack([math.cos(e) * np.cos(a), math.cos(e) * np.sin(a), np.full_like(a, math.sin(e))], -1)
    np.testing.assert_allclose(cams.c2w[:, :3, 3].numpy(), centres, atol=1e-5)


def test_orbit_trajectory_advances_time_along_the_azimuth_orbit() -> None:
    cams, times = orbit.trajectory(orbit.OrbitConfig(n_frames=10))
    np.testing.assert_allclose(cams.azimuth.numpy(), [36.0 * k for k in range(10)], atol=1e-5)
    np.testing.assert_allclose(times.numpy(), [k / 9 for k in range(10)], atol=1e-6)
    assert float(cams.distance[0]) == 3.0 and cams.elevation.unique().tolist() == [15.0]


def test_authors_frame_count_follows_time_steps() -> None:
    cams, times = orbit.trajectory(orbit.OrbitConfig(trajectory="authors", authors_time_steps=16))
    assert len(cams) == len(times) == 2 * 16 - 4  # 4 loops × (4 held + 3 rotating)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"trajectory": "spiral"}, "trajectory"), ({"n_frames": 0}, "n_frames"), ({"size": 0}, "size"),
    ({"authors_time_steps": 30}, "authors_time_steps"), ({"n_samples": 0}, "n_samples"),
])
def test_orbit_config_errors_name_the_field(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"OrbitConfig.{key}"):
        orbit.OrbitConfig(**kwargs).validate()


def test_render_views_renders_each_view_at_its_own_time() -> None:
    seen: list[float] = []

    def recording_field(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.extend(t.unique().tolist())
        return torch.zeros(x.shape[0]), torch.zeros(x.shape[0], 3)

    cams, times = orbit_path(4)
    out = render_views(recording_field, Renderer(RendererConfig(n_samples=4)), cams, times, 5, WHITE, chunk=1)
    assert sorted(set(seen)) == pytest.approx(times.tolist())
    assert out["rgb"].shape == (4, 5, 5, 3) and out["depth"].shape == (4, 5, 5)
    assert torch.equal(out["rgb"], torch.ones(4, 5, 5, 3))  # empty field on white


# ----------------------------------------------------------------------------------------------
# Rendering a run


@pytest.fixture(scope="module")
def smoke_cfg() -> RunConfig:
    return compose_run_config(["preset=smoke"])


def test_render_run_equals_a_direct_render_of_the_checkpoint(tmp_path: Path, smoke_cfg: RunConfig) -> None:
    make_run(tmp_path / "run", smoke_cfg, iteration=5)
    cfg = orbit.OrbitConfig(n_frames=3, size=8, n_samples=12)
    render = orbit.render_run(tmp_path / "run", cfg)

    torch.manual_seed(0)  # the same weights make_run saved
    field, _ = build_field(smoke_cfg.field)
    field.eval()
    cams = cameras_from_spherical(15.0, torch.tensor([0.0, 120.0, 240.0]), 3.0, 40.0)
    direct = Renderer(RendererConfig(n_samples=12, radius=smoke_cfg.renderer.radius)).render(
        field, cams, torch.tensor([0.0, 0.5, 1.0]), 8, 8, background=WHITE, train=False)
    assert render.iteration == 5
    assert render.rgb.shape == (3, 8, 8, 3)
    torch.testing.assert_close(render.rgb, direct["rgb"])
    torch.testing.assert_close(render.depth, direct["depth_normalized"])

    rgb_path, depth_path = orbit.write_orbit(render, tmp_path / "out" / "eval.mp4", fps=5)
    assert iio.imread(rgb_path).shape == (3, 8, 8, 3)
    assert depth_path.name == "eval_depth.mp4" and depth_path.is_file()
    assert not list((tmp_path / "out").glob(".*tmp*"))  # atomic: no temporary file left


def test_render_run_restores_the_annealed_density_blob(tmp_path: Path) -> None:
    cfg = compose_run_config(["preset=smoke", "schedule.stage_lengths=[2,2,4]", "schedule.blob_anneal_steps=4",
                              "schedule.blob_std_stage3_end=5.0", "field.heads.blob_std=0.5"])
    make_run(tmp_path / "run", cfg, iteration=8)
    _, field, _, _ = orbit.load_run_checked(tmp_path / "run")
    # The last step (iteration 7) is 3 steps into stage 3: 0.5 + 3/4 · (5.0 − 0.5) = 3.875.
    assert field.blob_std == pytest.approx(3.875)


def test_orbit_errors_name_the_path(tmp_path: Path, smoke_cfg: RunConfig, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        orbit.render_run(tmp_path / "nowhere")
    RunDir(tmp_path / "fresh").prepare(smoke_cfg)  # started, no checkpoint yet
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "fresh" / "checkpoints")):
        orbit.render_run(tmp_path / "fresh")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("prompt: x\nseed: 0\nlearning_rate: 0.1\n")  # another project's schema
    with pytest.raises(ValueError, match=f"{other / 'config.yaml'} does not match the current run schema"):
        orbit.render_run(other)
    assert orbit.main([str(tmp_path / "fresh")]) == 2
    assert "holds no valid checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Ground-truth metrics


def _scene_at(prompt: str, t_fixed: float | None = None):
    scene = get_scene(prompt)
    if t_fixed is None:
        return scene
    return lambda x, t: scene(x, torch.full_like(t, t_fixed))


SMALL = gt_metrics.GTMetricsConfig(n_views=3, times=[0.0, 1.0], motion_azimuths=[0.0, 90.0], motion_steps=3,
                                   size=16, n_samples=32, gt_n_samples=32)


def test_the_true_scene_scores_perfectly() -> None:
    m = gt_metrics.field_metrics(_scene_at(BALL), BALL, SMALL)
    assert m["psnr"] == pytest.approx(120.0)  # mse 0 -> the 1e-12 floor
    assert m["ssim"] == pytest.approx(1.0)
    assert m["depth_error"] == 0.0 and m["motion_error"] == 0.0
    assert m["gt_error"] == pytest.approx(1e-6 / 3)  # rgb RMSE at the 120 dB floor, nothing else


def test_a_frozen_scene_has_right_look_at_t0_and_the_motion_error_of_the_true_motion() -> None:
    m = gt_metrics.field_metrics(_scene_at(BALL, 0.0), BALL, SMALL)
    data = ToyDataConfig(n_samples=32)
    cams = cameras_from_spherical(15.0, torch.tensor([0.0, 90.0] * 3, dtype=torch.float64), 3.0, 40.0)
    gt = render_scene(get_scene(BALL), cams, torch.tensor([0.0] * 2 + [0.5] * 2 + [1.0] * 2), 16, data)["rgb"]
    g = gt.reshape(3, 2, 16, 16, 3)
    # A field that never moves: its change since t = 0 is zero, so the error is the true change.
    true_change_rms = float(((g[1:] - g[:1]) ** 2).mean().sqrt())
    assert m["motion_error"] == pytest.approx(true_change_rms, rel=1e-5)
    assert m["psnr_t0"] == pytest.approx(120.0)
    assert m["psnr_t1"] < 40.0 and m["motion_rmse_t0"] == 0.0


def test_psnr_ssim_and_depth_of_a_wrong_scene_match_a_hand_computation() -> None:
    m = gt_metrics.field_metrics(_scene_at(CUBE), BALL, SMALL)
    data = ToyDataConfig(n_samples=32)
    cams = cameras_from_spherical(15.0, torch.tensor([0.0, 120.0, 240.0], dtype=torch.float64), 3.0, 40.0)
    sq, ssims, depth = [], [], []
    for t in (0.0, 1.0):
        tt = torch.full((3,), t)
        pred, gt = render_scene(get_scene(CUBE), cams, tt, 16, data), render_scene(get_scene(BALL), cams, tt, 16, data)
        sq.append(((pred["rgb"] - gt["rgb"]).double() ** 2).mean().item())
        ssims += [structural_similarity(p.double().numpy(), g.double().numpy(), channel_axis=-1, data_range=1.0)
                  for p, g in zip(pred["rgb"], gt["rgb"], strict=True)]
        mask = gt["opacity"] > 0.5
        depth.append((pred["depth"] - gt["depth"]).abs()[mask])
    assert m["psnr"] == pytest.approx(10 * math.log10(1 / np.mean(sq)), rel=1e-5)
    assert m["ssim"] == pytest.approx(np.mean(ssims), rel=1e-6)
    assert m["depth_error"] == pytest.approx(float(torch.cat(depth).mean()), rel=1e-5)
    # The combined error: the plain mean of appearance RMSE, depth error and motion error.
    rgb_rmse = math.sqrt(np.mean(sq))
    assert m["rgb_rmse"] == pytest.approx(rgb_rmse, rel=1e-5)
    assert m["gt_error"] == pytest.approx((rgb_rmse + float(torch.cat(depth).mean()) + m["motion_error"]) / 3,
                                          rel=1e-5)
    assert m["psnr"] < 25.0


def test_gt_settings_come_from_the_run_eval_config(smoke_cfg: RunConfig) -> None:
    cfg = gt_metrics.GTMetricsConfig.from_eval(smoke_cfg.eval)
    ev = smoke_cfg.eval
    assert (cfg.n_views, cfg.times, cfg.size, cfg.n_samples) == (ev.orbit_views, list(ev.times), ev.size, ev.n_samples)
    assert cfg.motion_azimuths == [k * 360.0 / ev.grid_views for k in range(ev.grid_views)]


def test_gt_metrics_refuse_bad_settings_and_non_toy_prompts() -> None:
    with pytest.raises(ValueError, match="GTMetricsConfig.size"):
        gt_metrics.GTMetricsConfig(size=4).validate()
    with pytest.raises(ValueError, match="GTMetricsConfig.times"):
        gt_metrics.GTMetricsConfig(times=[1.5]).validate()
    with pytest.raises(ValueError, match="not a toy-world scene"):
        gt_metrics.field_metrics(_scene_at(BALL), "a panda dancing", SMALL)
