"""Deformation-based motion (field.dynamic=deformation): f(x, t) = f_static(x + Δ(x, t)).

Shapes; the static field read at the displaced point; progressive levels (the authors' rule, read on the run's
clock); which parameters gradients reach; parameter groups; the HexPlane refusal; the variant and presets
compose; a tiny training run through build_trainer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fourdfy.build import build_field, build_trainer
from fourdfy.clock import Clock, Stages
from fourdfy.config import compose_run_config
from fourdfy.errors import ConfigError
from fourdfy.fields.deformation import Deformation, DeformationConfig, ProgressiveLevels, active_levels, deformation_tv
from fourdfy.fields.dense import DenseGridConfig, DenseGridEncoding4D
from fourdfy.fields.field4d import DynamicKind, FieldConfig, FieldKind
from fourdfy.fields.hashgrid import HashGridConfig, HashGridEncoding
from fourdfy.kinds import ParamGroup
from fourdfy.render.trajectories import orbit_cameras
from fourdfy.render.volume import Renderer, RendererConfig

SMALL = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                       per_level_scale=2.0)
SMALL_DEFORMATION = DeformationConfig(grid=SMALL, start_level=2, hidden_dim=16,
                                      dense_resolutions=[3, 4, 6, 8], dense_time_resolution=4)


def _field(kind: str = "dense", blob_std=None):
    torch.manual_seed(0)
    cfg = FieldConfig(kind=kind, dynamic="deformation", static_grid=SMALL, dynamic_grid=SMALL,
                      dense=DenseGridConfig(resolutions=[4, 8], n_features=4), deformation=SMALL_DEFORMATION)
    return build_field(cfg, blob_std)[0]


def _points(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g) * 1.6 - 0.8, torch.rand(n, generator=g)


def _static_only(field, x: torch.Tensor, unit_read: torch.Tensor):
    """The heads on the static features read at ``unit_read``, the blob at the undisplaced x (authors)."""
    f = field.static_encoding(unit_read)
    bias = field.blob_density * (1.0 - x.norm(dim=-1) / field.blob_std)
    inside = ((x / field.box_radius).abs() <= 1).all(dim=-1)
    return F.softplus(field.density_head(f).squeeze(-1) + bias) * inside, torch.sigmoid(field.color_head(f))


class ConstantShift(nn.Module):
    """A stand-in deformation: the same Δ [3] for every point."""

    def __init__(self, shift: list[float]):
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(shift))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.shift.expand(x.shape[0], 3)


# ---------------------------------------------------------------- shapes and the static field read at x + Δ


@pytest.mark.parametrize("kind", ["dense", "hashgrid"])
def test_shapes_and_the_paper_size_network(kind):
    field = _field(kind)
    x, t = _points()
    density, rgb = field(x, t)
    assert density.shape == (64,) and rgb.shape == (64, 3) and (density >= 0).all()
    assert field.displacement(x, t).shape == (64, 3)
    assert field.dynamic_encoding is None
    paper = build_field(FieldConfig(dynamic="deformation"))[0].deformation
    assert paper.encoding.n_output_dims == 16 and paper.encoding.level_resolutions[:2] == [4, 6]
    linear = [(m.in_features, m.out_features, m.bias) for m in paper.network if isinstance(m, nn.Linear)]
    assert linear == [(16, 64, None), (64, 64, None), (64, 3, None)]  # VanillaMLP 64 x 2, no biases


@pytest.mark.parametrize("kind", ["dense", "hashgrid"])
def test_zero_displacement_is_the_static_field(kind):
    field = _field(kind)
    with torch.no_grad():
        field.deformation.network[-1].weight.zero_()
    x, t = _points()
    assert torch.equal(field.displacement(x, t), torch.zeros(64, 3))
    expected = _static_only(field, x, ((x + 1.0) * 0.5).clamp(0, 1))
    for got, want in zip(field(x, t), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same operations: bitwise equal


def test_the_static_field_is_read_at_the_displaced_point_clamped_to_the_box():
    field = _field("dense")
    field.deformation = ConstantShift([0.1, -0.05, 0.3])
    x, t = _points()
    unit = ((x + 1.0) * 0.5).clamp(0, 1)
    expected = _static_only(field, x, (unit + torch.tensor([0.1, -0.05, 0.3])).clamp(0, 1))
    for got, want in zip(field(x, t), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_grid_path_displaces_nothing():
    torch.manual_seed(0)
    field = build_field(FieldConfig(kind="dense"))[0]
    assert field.deformation is None
    x, t = _points()
    assert torch.equal(field.displacement(x, t), torch.zeros(64, 3))


# ---------------------------------------------------------------- progressive levels


@pytest.mark.parametrize("step, expected", [(0, 4), (499, 4), (500, 5), (999, 5), (1000, 6), (1499, 6), (1500, 7),
                                            (1999, 7), (2000, 8), (150_000, 8)])
def test_active_levels_follow_the_authors_rule(step, expected):
    # networks.py ProgressiveBandHashGrid.update_step with start_level 4, update_steps 500, n_levels 8
    assert active_levels(step, start_level=4, n_levels=8, update_steps=500) == expected


def test_levels_count_stage3_steps_on_the_run_clock():
    d = DeformationConfig()
    clock = Clock(Stages((10, 20, 3000)))
    levels = ProgressiveLevels(clock, d.start_level, d.grid.n_levels, d.update_steps, d.start_step)
    seen = {}
    for iteration in (0, 29, 30, 529, 530, 1529, 1530, 2030, 3029):
        clock.iteration = iteration
        seen[iteration] = levels.value()
    # stages 1-2: stage 3's step 0; stage 3 starts at iteration 30
    assert seen == {0: 4, 29: 4, 30: 4, 529: 4, 530: 5, 1529: 6, 1530: 7, 2030: 8, 3029: 8}


def _dense_deformation(active: int):
    torch.manual_seed(0)
    encoding = DenseGridEncoding4D([3, 4, 6, 8], n_features=2, time_resolution=4)
    return Deformation(encoding, 4, hidden_dim=16, n_hidden_layers=2, levels=lambda: active)


def test_levels_beyond_the_active_count_contribute_nothing_and_get_no_gradient():
    deformation = _dense_deformation(active=2)
    x, t = torch.rand(50, 3), torch.rand(50)
    before = deformation(x, t)
    with torch.no_grad():
        for level in (2, 3):
            deformation.encoding.volumes[level].uniform_(-5.0, 5.0)
    after = deformation(x, t)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    after.square().sum().backward()
    grads = [v.grad for v in deformation.encoding.volumes]
    assert all(g.abs().sum() > 0 for g in grads[:2]) and all(torch.equal(g, torch.zeros_like(g)) for g in grads[2:])
    with torch.no_grad():  # an active level does change Δ
        deformation.encoding.volumes[1].uniform_(-5.0, 5.0)
    assert not torch.allclose(deformation(x, t), before)


def test_hash_grid_levels_are_masked_by_their_table_entries():
    torch.manual_seed(0)
    encoding = HashGridEncoding(4, 4, 2, 12, 4, 2.0)
    deformation = Deformation(encoding, 4, hidden_dim=16, n_hidden_layers=2, levels=lambda: 3)
    deformation(torch.rand(200, 3), torch.rand(200)).square().sum().backward()
    first_masked = encoding.level_offsets[3] * 2  # flat index of level 3's first feature (F = 2)
    assert encoding.params.grad[:first_masked].abs().sum() > 0
    assert torch.equal(encoding.params.grad[first_masked:], torch.zeros(encoding.n_params - first_masked))


# ---------------------------------------------------------------- gradients and parameter groups


def test_param_groups_put_the_whole_deformation_network_in_dynamic():
    field = _field("dense")
    groups = field.param_groups()
    ids = {name: {id(p) for p in params} for name, params in groups.items()}
    assert ids[ParamGroup.DYNAMIC] == {id(p) for p in field.deformation.parameters()}
    assert ids[ParamGroup.DYNAMIC] >= {id(p) for p in field.deformation.network.parameters()}
    assert ids[ParamGroup.STATIC] == {id(p) for p in field.static_encoding.parameters()}
    assert sum(len(v) for v in ids.values()) == len({*ids[ParamGroup.STATIC], *ids[ParamGroup.DYNAMIC],
                                                     *ids[ParamGroup.HEADS]}) == len(list(field.parameters()))


def _render_backward(field):
    field.zero_grad(set_to_none=True)
    out = Renderer(RendererConfig(n_samples=16, radius=1.0)).render(field, orbit_cameras(2), torch.tensor([0.1, 0.8]),
                                                                    8, 8, train=False)
    out["rgb"].sum().backward()


def _has_grad(params) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("kind", ["dense", "hashgrid"])
def test_gradients_reach_the_deformation_alone_when_the_static_parts_are_frozen(kind):
    field = _field(kind)
    groups = field.param_groups()
    # Δ ≈ 1e-5 at initialisation: give it a visible size so its gradient is well above round-off
    with torch.no_grad():
        field.deformation.network[-1].weight.mul_(1e3)
    _render_backward(field)
    assert all(_has_grad(groups[g]) for g in ParamGroup)
    assert _has_grad(field.deformation.encoding.parameters()) and _has_grad(field.deformation.network.parameters())
    for name in (ParamGroup.STATIC, ParamGroup.HEADS):  # stage 3 of the authors: only the deformation moves
        for p in groups[name]:
            p.requires_grad_(False)
    _render_backward(field)
    assert _has_grad(groups[ParamGroup.DYNAMIC])
    assert all(p.grad is None for g in (ParamGroup.STATIC, ParamGroup.HEADS) for p in groups[g])


def test_deformation_tv_is_the_authors_tv_loss():
    d = torch.randn(3, 5, 4, 3, generator=torch.Generator().manual_seed(0))
    # utils/ops.py TVLoss on d.permute(3, 0, 1, 2): 3 · Σ mean_c of squared neighbour differences, by hand
    x = d.permute(3, 0, 1, 2)
    expected = 3 * sum(
        float(((x.narrow(axis, 1, x.shape[axis] - 1) - x.narrow(axis, 0, x.shape[axis] - 1)) ** 2).mean(0).sum())
        for axis in (1, 2, 3))
    assert float(deformation_tv(d)) == pytest.approx(expected, rel=1e-5)
    assert float(deformation_tv(d[:1])) == pytest.approx(  # one frame: no time term
        float(((d[:1, 1:] - d[:1, :-1]) ** 2).sum() + ((d[:1, :, 1:] - d[:1, :, :-1]) ** 2).sum()), rel=1e-5)


# ---------------------------------------------------------------- configuration


def test_deformation_on_a_hexplane_field_is_refused_naming_both_keys():
    cfg = FieldConfig(kind=FieldKind.hexplane, dynamic=DynamicKind.deformation)
    with pytest.raises(ValueError, match=r"field\.dynamic=deformation.*field\.kind=hexplane"):
        cfg.validate()
    with pytest.raises(ValueError, match=r"field\.kind=hexplane"):
        build_field(cfg)
    run = compose_run_config(["preset=demo_cpu", "variant=deformation", "field.kind=hexplane"])
    with pytest.raises(ConfigError, match=r"field\.dynamic=deformation.*field\.kind=hexplane"):
        run.validate()


def test_a_start_level_beyond_the_levels_in_use_is_refused():
    cfg = FieldConfig(kind="dense", dynamic="deformation", deformation=DeformationConfig(dense_resolutions=[4, 8]))
    with pytest.raises(ValueError, match=r"field\.deformation\.start_level must be in \[1, 2\]"):
        cfg.validate()


def test_the_variant_composes_with_the_cpu_demo_and_the_authors_recipe():
    demo = compose_run_config(["preset=demo_cpu", "variant=deformation"])
    demo.validate()
    assert (demo.variant.name, demo.field.kind, demo.field.dynamic) == ("deformation", "dense", "deformation")
    assert demo.schedule.lr_static_stage3 == 0.0
    paper = compose_run_config(["preset=paper_vc_deformation", "variant=deformation"])
    assert (paper.preset.name, paper.field.kind, paper.field.dynamic) == ("paper_vc_deformation", "hashgrid",
                                                                         "deformation")
    assert paper.guidance.video_prior == "videocrafter2" and paper.schedule.stage_lengths == [10000, 25000, 150000]
    assert paper.guidance.videocrafter2.loss_weight == 1.0 and paper.schedule.lr_dynamic == 0.001
    vc = compose_run_config(["preset=paper_vc"])
    assert (vc.preset.name, vc.field.dynamic, vc.schedule.stage_lengths[2]) == ("paper_vc", "grid", 200000)
    assert compose_run_config(["preset=paper_vc_deformation_low_vram"]).guidance.videocrafter2.vae_grad_frames == 1
    assert compose_run_config(["preset=paper_vc_low_vram"]).guidance.videocrafter2.vae_grad_frames is None


def test_a_tiny_toy_run_moves_only_the_deformation_in_stage_3(tmp_path):
    # 20 iterations: 4 + 4 of stages 1-2, 12 of stage 3 with video updates only (so the deformation trains)
    cfg = compose_run_config(["preset=smoke", "variant=deformation", "schedule.stage_lengths=[4,4,12]",
                              "schedule.stage3_video_only=true", "trainer.checkpoint_every=100"])
    snapshots = {}

    def snapshot(trainer, iteration):
        if iteration in (7, 19):
            snapshots[iteration] = {k: v.detach().clone() for k, v in trainer.field.state_dict().items()}

    trainer = build_trainer(cfg, tmp_path / "run", callbacks=[snapshot])
    trainer.train()
    assert trainer.iteration == 20 and trainer.skipped_steps == 0
    before, after = snapshots[7], snapshots[19]
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("deformation.", "density_head.", "color_head.")) for k in moved), moved
    assert any(k.startswith("deformation.") for k in moved)
