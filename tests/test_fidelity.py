"""Issue #15: one test per difference from the authors' runs that the trainer itself decides (the others:
test_timeline.py for the schedules, test_field4d.py for SH degree and HexPlane size, test_hybrid.py for the
no_image_guidance length, test_guidance_sd_vsd.py for train_lora, test_render_authors.py for the marching)."""

from __future__ import annotations

import math

import pytest
import torch

from fourdfy.build import build_trainer
from fourdfy.config import compose_run_config
from fourdfy.guidance.base import GuidanceOut
from fourdfy.losses import opacity_entropy_loss
from fourdfy.sampling import FrameBackgrounds, StepSampler

SMOKE = ["preset=smoke", "trainer.checkpoint_every=100"]


class _Spy:
    """A prior that records what the trainer hands it. n_views/batch per stage-local step as configured."""

    def __init__(self, n_views=4, is_video=False, batch=None, size=(8, 8)):
        self.n_views, self.is_video, self.native_size = n_views, is_video, size
        self.batch = batch or (lambda step: n_views)
        self.calls, self.resets = [], 0

    def __call__(self, renders, prompt, cameras, times, step):
        self.calls.append({"step": step, "n": renders.shape[0], "times": times.detach().cpu().clone(),
                           "elevation": cameras.elevation.detach().cpu().clone(),
                           "azimuth": cameras.azimuth.detach().cpu().clone(), "renders": renders.detach().clone()})
        return GuidanceOut(renders.mean())

    def render_size(self, step):
        return self.native_size

    def batch_size(self, step):
        return self.batch(step)

    def reset_optimizer(self):
        self.resets += 1

    def finetune_step(self, renders, prompt, cameras, step, latents=None):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_row1_entropy_clamps_opacity_to_1e3_as_the_authors():
    # threestudio/systems/fourdfy.py: opacity.clamp(1.0e-3, 1.0 - 1.0e-3) before binary_cross_entropy.
    p = 1e-3
    expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    got = opacity_entropy_loss(torch.zeros(2, 3, 3, dtype=torch.float64))
    assert float(got) == pytest.approx(expected, rel=1e-12)
    assert float(opacity_entropy_loss(torch.ones(1, 1, 1, dtype=torch.float64))) == pytest.approx(expected, rel=1e-12)


def test_row1_entropy_weight_follows_the_stage_local_step_in_the_trainer(tmp_path):
    # [2, 0.0, 1000.0, 3] on each stage's own step: 0 up to stage-local step 2, 1000 from 3.
    cfg = compose_run_config(SMOKE + ["schedule.stage_lengths=[4,4,0]",
                                      "trainer.lambda_opacity_entropy=[2,0.0,1000.0,3]"])
    trainer = build_trainer(cfg, tmp_path, guidances={"3d": _Spy(), "img": _Spy(n_views=1)})
    logged = [trainer.step().get("loss/opacity_entropy") for _ in range(8)]
    assert [v is not None for v in logged] == [False, False, False, True] * 2


def test_row2_and_3_eight_views_then_four_each_stage_on_its_own_clock(tmp_path):
    cfg = compose_run_config(SMOKE + ["schedule.stage_lengths=[3,3,0]", "schedule.p_3d=1.0"])
    spy = _Spy(batch=lambda step: 8 if step.stage == 1 and step.stage_step < 2 else 4)
    trainer = build_trainer(cfg, tmp_path, guidances={"3d": spy, "img": _Spy(n_views=1)})
    for _ in range(6):
        trainer.step()
    assert [c["n"] for c in spy.calls] == [8, 8, 4, 4, 4, 4]
    first = spy.calls[0]
    # Two independent groups of 4 views 90° apart (threestudio random_multiview: batch 8 = 2 × n_view 4).
    for group in (first["azimuth"][:4], first["azimuth"][4:]):
        gaps = torch.diff(group.double()) % 360
        # float32 azimuths below 540°: a spacing of 2^-14 ≈ 6e-5, so differences carry that much rounding
        torch.testing.assert_close(gaps, torch.full((3,), 90.0, dtype=gaps.dtype), rtol=0, atol=1.5e-4)
    assert first["elevation"][0] != first["elevation"][4]  # each group its own camera draw
    stage_steps = [(c["step"].stage, c["step"].stage_step) for c in spy.calls]
    assert stage_steps == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]


def test_row4_fresh_optimiser_at_each_stage_start(tmp_path):
    cfg = compose_run_config(SMOKE + ["schedule.stage_lengths=[3,3,3]"])
    trainer = build_trainer(cfg, tmp_path)
    steps = []
    for _ in range(9):
        trainer.step()
        state = trainer.optimizer.state[trainer.groups["heads"][0]]
        steps.append(int(state["step"]))
    assert steps == [1, 2, 3, 1, 2, 3, 1, 2, 3]  # AdamW's step count restarts: zero moments, bias correction anew
    off = build_trainer(compose_run_config(SMOKE + ["schedule.stage_lengths=[3,3,3]",
                                                    "schedule.reset_optimizer_at_stage_start=false"]), tmp_path / "off")
    for _ in range(9):
        off.step()
    assert int(off.optimizer.state[off.groups["heads"][0]]["step"]) == 9


def test_row4_resume_across_a_stage_boundary_is_bitwise_exact(tmp_path):
    cfg = compose_run_config(SMOKE + ["schedule.stage_lengths=[3,3,2]"])
    straight = build_trainer(cfg, tmp_path / "a")
    straight.train()
    cut = build_trainer(cfg, tmp_path / "b")
    for _ in range(3):  # to the end of stage 1; the stage-end checkpoint is written by train(), so save here
        cut.step()
    cut.save()
    resumed = build_trainer(cfg, tmp_path / "b")
    assert resumed.try_resume() and resumed.iteration == 3
    resumed.train()
    a, b = straight.state_dict(), resumed.state_dict()
    for name, tensor in a["field"].items():
        assert torch.equal(tensor, b["field"][name]), name
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, value in a["optimizer"]["state"].items():
        for name in value:
            assert torch.equal(torch.as_tensor(value[name]), torch.as_tensor(b["optimizer"]["state"][key][name]))


def test_row5_each_frame_of_a_video_step_draws_its_own_background():
    sampler = StepSampler(compose_run_config(SMOKE).cameras, n_frames=16, random_background_prob=0.5)
    module = torch.nn.Identity()
    bg = sampler.sample(16, True, module, torch.Generator().manual_seed(3)).background
    assert isinstance(bg, FrameBackgrounds)
    assert 0 < int(bg.solid.sum()) < 16  # at p = 0.5 some frames are solid, some show the module (seed 3)
    assert len({tuple(c.tolist()) for c in bg.colours}) == 16  # a colour per frame
    dirs = torch.nn.functional.normalize(torch.randn(16 * 5, 3), dim=-1)
    out = bg(dirs).reshape(16, 5, 3)
    for f in range(16):  # each frame: its own solid colour, or the module (identity here) on its own rays
        expected = bg.colours[f].expand(5, 3) if bg.solid[f] else dirs.reshape(16, 5, 3)[f]
        torch.testing.assert_close(out[f], expected, rtol=0, atol=0)
    # 3D/IMG steps keep one draw for the whole batch (the authors' renderer is called once per batch there).
    single = sampler.sample(4, False, module, torch.Generator().manual_seed(3)).background
    assert not isinstance(single, FrameBackgrounds)


def test_row9_static_stages_render_time_zero_and_stage_3_frame_times(tmp_path):
    cfg = compose_run_config(SMOKE + ["schedule.stage_lengths=[2,2,4]", "trainer.static_prior_time=null",
                                      "schedule.p_img=0.0", "schedule.p_3d=1.0"])
    spy = _Spy()
    video = _Spy(n_views=cfg.trainer.n_frames, is_video=True)
    trainer = build_trainer(cfg, tmp_path, guidances={"3d": spy, "vid": video})
    for _ in range(8):
        trainer.step()
    times = [c["times"] for c in spy.calls]
    assert all(torch.equal(t, torch.zeros(4)) for t in times[:4])  # stages 1-2: data.*.static: true
    assert all(0 < float(t[0]) < 1 and torch.equal(t, t[0].expand(4)) for t in times[4:])  # stage 3: a frame time
