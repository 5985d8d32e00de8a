"""One hybrid iteration of each kind with the real priors' code (tiny random weights), through the same
trainer as the toy world; its gradient reaches the field."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import build_tiny_guidances

from fourdfy.build import build_trainer
from fourdfy.config import compose_run_config
from fourdfy.kinds import ParamGroup


@pytest.fixture(scope="module")
def tiny_guidances(tmp_path_factory):
    return build_tiny_guidances(tmp_path_factory.mktemp("tiny_models"))


@pytest.mark.parametrize("kind", ["3d", "img", "vid"])
def test_one_iteration_of_each_kind_reaches_the_field(kind, tiny_guidances, tmp_path):
    n_frames = tiny_guidances["vid"].n_views
    cfg = compose_run_config(["preset=smoke", "schedule.stage_lengths=[1,1,1]", f"trainer.n_frames={n_frames}",
                              "renderer.n_samples=8"])
    cfg.prompt = "a panda dancing"
    cfg.trainer.lambda_sparsity = cfg.trainer.lambda_opacity_entropy = 0.0  # only the prior's gradient
    trainer = build_trainer(cfg, tmp_path, guidances=tiny_guidances)
    trainer.schedule.kind = lambda iteration, generator: kind  # force the update kind under test
    trainer.iteration = {"3d": 0, "img": 1, "vid": 2}[kind]
    before = [p.detach().clone() for p in trainer.groups[ParamGroup.STATIC]]
    dynamic_before = [p.detach().clone() for p in trainer.groups[ParamGroup.DYNAMIC]]
    scalars = trainer.step()
    assert scalars["kind"] == kind and scalars["skipped_steps"] == 0
    assert torch.isfinite(torch.tensor(scalars["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.groups[ParamGroup.STATIC], strict=True))
    dynamic_changed = any(not torch.equal(a, b) for a, b in zip(dynamic_before, trainer.groups[ParamGroup.DYNAMIC],
                                                                strict=True))
    assert dynamic_changed == (kind == "vid")
