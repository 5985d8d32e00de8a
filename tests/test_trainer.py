"""The training loop on the toy world: what each update trains, exact resume after SIGKILL, bad states."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from helpers.runs import run_generate_in_subprocess

from fourdfy.api import generate
from fourdfy.build import build_trainer
from fourdfy.checkpoint import list_checkpoints, load_latest_checkpoint
from fourdfy.config import compose_run_config
from fourdfy.guidance.base import GuidanceOut
from fourdfy.kinds import ParamGroup

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["preset=smoke", "schedule.stage_lengths=[10,10,10]", "trainer.checkpoint_every=5"]


def _trainer(cfg, run_dir, guidances=None, callbacks=None):
    return build_trainer(cfg, run_dir, guidances=guidances, callbacks=callbacks)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def test_dynamic_grid_changes_only_on_video_steps(tmp_path):
    cfg = compose_run_config(SMOKE)
    trainer = _trainer(cfg, tmp_path)
    kinds_seen = set()
    for _ in range(30):
        dyn, static = _snapshot(trainer.groups[ParamGroup.DYNAMIC]), _snapshot(trainer.groups[ParamGroup.STATIC])
        scalars = trainer.step()
        kinds_seen.add(scalars["kind"])
        groups = trainer.groups
        dyn_changed = any(not torch.equal(a, b) for a, b in zip(dyn, groups[ParamGroup.DYNAMIC], strict=True))
        static_changed = any(not torch.equal(a, b) for a, b in zip(static, groups[ParamGroup.STATIC], strict=True))
        assert dyn_changed == (scalars["kind"] == "vid"), scalars
        assert static_changed, scalars
        if scalars["stage"] == 3:
            lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
            assert lrs["static"] == cfg.schedule.lr_static_stage3 == 1e-3  # demo_cpu's value, inherited by smoke
            assert lrs["dynamic"] == cfg.schedule.lr_dynamic
    assert kinds_seen == {"3d", "img", "vid"}




@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_generate_in_subprocess(straight, SMOKE, kill_after=None) == 0
    assert run_generate_in_subprocess(killed, SMOKE, kill_after=17) == -signal.SIGKILL
    assert not (killed / "DONE").exists()
    newest = list_checkpoints(killed / "checkpoints")[-1].name
    assert newest == "ckpt_000000015.pt"  # killed between the checkpoints at 15 and 20
    assert run_generate_in_subprocess(killed, SMOKE, kill_after=None) == 0
    a, _ = load_latest_checkpoint(straight / "checkpoints")
    b, _ = load_latest_checkpoint(killed / "checkpoints")
    assert a["iteration"] == b["iteration"] == 30
    for key in ("field", "background"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert torch.equal(a["guidance"]["img"]["buffer_images"], b["guidance"]["img"]["buffer_images"])


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = compose_run_config(SMOKE)
    trainer = _trainer(cfg, tmp_path)
    for _ in range(10):
        trainer.step()
        if trainer.iteration % 5 == 0:
            trainer.save()
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # a torn write
    fresh = _trainer(cfg, tmp_path)
    with pytest.warns(UserWarning, match="corrupted"):
        assert fresh.try_resume()
    assert fresh.iteration == 5


class _NaNGuidance:
    n_views, native_size, is_video = 4, (16, 16), False

    def __call__(self, renders, prompt, cameras, times, step):
        return GuidanceOut(renders.sum() * float("nan"))

    def render_size(self, step):
        return self.native_size

    def batch_size(self, step):
        return self.n_views

    def reset_optimizer(self):
        pass

    def finetune_step(self, renders, prompt, cameras, step, latents=None):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_non_finite_guidance_is_skipped_and_counted(tmp_path):
    cfg = compose_run_config(SMOKE + ["schedule.stage_lengths=[3,0,0]"])
    trainer = _trainer(cfg, tmp_path, guidances={"3d": _NaNGuidance()})
    before = _snapshot(p for g in trainer.groups.values() for p in g)
    scalars = trainer.step()
    after = [p for g in trainer.groups.values() for p in g]
    assert scalars["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


class _SizeSpyGuidance(_NaNGuidance):
    """Asks for 8² renders before step 2 and 12×16 after (as MVDream switches 64² -> 256²); records shapes."""

    def __init__(self):
        self.shapes = []

    def render_size(self, step):
        return (8, 8) if step.stage_step < 2 else (12, 16)

    def __call__(self, renders, prompt, cameras, times, step):
        self.shapes.append((step.iteration, tuple(renders.shape)))
        return GuidanceOut(renders.mean())


class _FinetuneSpyGuidance(_NaNGuidance):
    """A finite loss; records each finetune_step call and hands a marker tensor over as its latents."""

    def __init__(self):
        self.calls = []
        self.marker = torch.full((1,), 7.0)

    def __call__(self, renders, prompt, cameras, times, step):
        return GuidanceOut(renders.mean(), latents=self.marker)

    def finetune_step(self, renders, prompt, cameras, step, latents=None):
        self.calls.append((step.iteration, tuple(renders.shape), renders.requires_grad, latents is self.marker))
        return {"finetuned": 1.0}


@pytest.mark.parametrize("kind", ["3d", "vid"])
def test_every_kind_of_prior_gets_its_finetune_step_with_the_latents_of_its_call(tmp_path, kind):
    # Not only the image prior: a 3D or video prior with trainable state must train too.
    stages = "[2,0,0]" if kind == "3d" else "[0,0,2]"
    extra = [] if kind == "3d" else ["schedule.stage3_video_only=true"]
    cfg = compose_run_config(SMOKE + [f"schedule.stage_lengths={stages}", *extra])
    spy = _FinetuneSpyGuidance()
    if kind == "vid":
        spy.n_views, spy.is_video = cfg.trainer.n_frames, True
    trainer = _trainer(cfg, tmp_path, guidances={kind: spy})
    scalars = [trainer.step(), trainer.step()]
    n = spy.n_views
    assert spy.calls == [(0, (n, 16, 16, 3), False, True), (1, (n, 16, 16, 3), False, True)]
    assert all(s[f"{kind}/finetuned"] == 1.0 for s in scalars)


def test_renders_have_the_size_the_guidance_asks_for_at_each_step(tmp_path):
    cfg = compose_run_config(SMOKE + ["schedule.stage_lengths=[4,0,0]"])
    spy = _SizeSpyGuidance()
    trainer = _trainer(cfg, tmp_path, guidances={"3d": spy})
    for _ in range(4):
        trainer.step()
    assert spy.shapes == [(0, (4, 8, 8, 3)), (1, (4, 8, 8, 3)), (2, (4, 12, 16, 3)), (3, (4, 12, 16, 3))]


def test_finished_run_is_not_redone_and_incompatible_resume_is_refused(tmp_path, caplog):
    cfg = compose_run_config(["preset=smoke"])
    generate(cfg, tmp_path)
    assert (tmp_path / "DONE").exists() and (tmp_path / "renders" / "orbit.mp4").stat().st_size > 0
    generate(cfg, tmp_path)
    assert "already finished" in caplog.text
    other = compose_run_config(["preset=smoke", "schedule.p_3d=0.3"])
    (tmp_path / "DONE").unlink()
    with pytest.raises(ValueError, match="different config"):
        generate(other, tmp_path)


def test_schedule_without_a_guidance_for_its_kinds_is_refused(tmp_path):
    cfg = compose_run_config(SMOKE)
    with pytest.raises(ValueError, match=r"draws \['vid'\] updates but no guidance"):
        _trainer(cfg, tmp_path, guidances={"3d": _NaNGuidance(), "img": _NaNGuidance()})


def test_environment_is_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
