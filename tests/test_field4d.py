"""The 4D field: shapes, defaults, gradients to both grids through the renderer, frozen dynamic grid."""

from __future__ import annotations

import pytest
import torch

from fourdfy.build import build_field
from fourdfy.fields.background import BackgroundMLP, spherical_harmonics_deg3
from fourdfy.fields.field4d import FieldConfig
from fourdfy.fields.hashgrid import HashGridConfig
from fourdfy.render.trajectories import orbit_cameras
from fourdfy.render.volume import Renderer, RendererConfig

SMALL = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                       per_level_scale=2.0)


def _field(kind="hashgrid"):
    torch.manual_seed(0)
    return build_field(FieldConfig(kind=kind, static_grid=SMALL, dynamic_grid=SMALL))


def test_paper_defaults_build_the_paper_field():
    cfg = FieldConfig()
    grid = cfg.static_grid
    assert (grid.n_levels, grid.log2_hashmap_size, grid.base_resolution) == (16, 19, 16)
    field, _ = build_field(cfg)
    assert field.static_encoding.n_output_dims == 32 and field.dynamic_encoding.n_output_dims == 32
    assert field.static_encoding.level_resolutions[-1] == 4096
    linear = [m for m in field.density_head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias) for m in linear] == [(32, 64, None), (64, 1, None)]


def test_density_blob_and_box():
    field, _ = _field()
    x = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.9], [1.2, 0.0, 0.0]])
    density, rgb = field(x, torch.zeros(3))
    # raw features ~1e-4 at init: σ ≈ softplus(10·(1 − ‖x‖/0.5)); outside the box σ = 0
    expected = torch.nn.functional.softplus(torch.tensor([10.0, 10.0 * (1 - 0.9 / 0.5)]))
    torch.testing.assert_close(density[:2], expected, atol=1e-2, rtol=1e-3)
    assert density[2] == 0
    assert rgb.shape == (3, 3) and ((rgb > 0) & (rgb < 1)).all()


@pytest.mark.parametrize("kind", ["hashgrid", "hexplane", "dense"])
def test_gradients_reach_both_grids_when_t_varies_and_only_static_when_frozen(kind):
    field, _ = _field(kind)
    renderer = Renderer(RendererConfig(n_samples=16, radius=1.0))
    cams = orbit_cameras(2)
    times = torch.tensor([0.1, 0.8])
    out = renderer.render(field, cams, times, 8, 8, train=False)
    out["rgb"].sum().backward()
    groups = field.param_groups()
    for name in ("static", "dynamic", "heads"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[name]), name
    field.zero_grad(set_to_none=True)
    for p in groups["dynamic"]:
        p.requires_grad_(False)
    renderer.render(field, cams, times, 8, 8, train=False)["rgb"].sum().backward()
    assert all(p.grad is None for p in groups["dynamic"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["static"])


def test_background_sh_basis_is_orthonormal_on_the_sphere():
    # Monte-Carlo check of ∫ Y_i Y_j dΩ = δ_ij (the tcnn SH constants are orthonormal real SH)
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(400_000, 3, generator=gen, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    y = spherical_harmonics_deg3(d)
    gram = 4 * torch.pi * (y.T @ y) / d.shape[0]
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=0.03, rtol=0)
    assert BackgroundMLP()(d[:5].float()).shape == (5, 3)


def test_field_rejects_bad_shapes():
    field, _ = _field()
    with pytest.raises(ValueError, match="x must have shape"):
        field(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="t must have shape"):
        field(torch.zeros(4, 3), torch.zeros(5))
