"""The 4D field: shapes, defaults, gradients to both grids through the renderer, frozen dynamic grid."""

from __future__ import annotations

import pytest
import torch

from fourdfy.build import build_field
from fourdfy.fields.background import BackgroundConfig, BackgroundMLP, spherical_harmonics
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
    y = spherical_harmonics(d)
    gram = 4 * torch.pi * (y.T @ y) / d.shape[0]
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=0.03, rtol=0)
    assert BackgroundMLP()(d[:5].float()).shape == (5, 3)


def test_background_uses_the_authors_nine_sh_coefficients():
    # Issue #15 row 8: tcnn SphericalHarmonics degree 3 (neural_environment_map_background.py) = 9 terms, the
    # first 9 of degree 4's 16, band by band.
    d = torch.nn.functional.normalize(torch.randn(7, 3, dtype=torch.float64), dim=-1)
    assert spherical_harmonics(d, 3).shape == (7, 9)
    torch.testing.assert_close(spherical_harmonics(d, 3), spherical_harmonics(d, 4)[:, :9], rtol=0, atol=0)
    assert BackgroundConfig().sh_degree == 3
    assert BackgroundMLP().mlp[0].in_features == 9
    with pytest.raises(ValueError, match="field.background.sh_degree"):
        BackgroundMLP(BackgroundConfig(sh_degree=5))


def test_field_rejects_bad_shapes():
    field, _ = _field()
    with pytest.raises(ValueError, match="x must have shape"):
        field(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="t must have shape"):
        field(torch.zeros(4, 3), torch.zeros(5))


def test_hexplane_matches_the_hash_grids_parameter_count_within_5_percent():
    # Issue #15 row 10 / paper §4.3: the HexPlane ablation is memory-matched to the hash grids at paper size.
    from fourdfy.build import build_field
    from fourdfy.fields.field4d import FieldConfig, FieldKind

    def n_grid_params(kind: FieldKind) -> int:
        field, _ = build_field(FieldConfig(kind=kind))
        return sum(p.numel() for m in (field.static_encoding, field.dynamic_encoding) for p in m.parameters())

    hash_count = n_grid_params(FieldKind.hashgrid)
    hex_count = n_grid_params(FieldKind.hexplane)
    # Independently: tcnn layout of 16 levels, 2 features, 2^19 entries; planes 3·8·r² + 3·8·r·64 per scale.
    assert hex_count == sum(24 * r * r + 24 * r * 64 for r in (112, 224, 448, 896)) == 28_170_240
    assert hash_count == 28_074_608
    assert abs(hex_count / hash_count - 1) < 0.05


def test_the_equal_memory_demo_hexplane_matches_the_demo_dense_grids_within_5_percent():
    # Issue #20: the toy Table 2's equal-memory HexPlane row (README: variant=hexplane with
    # field.hexplane.resolutions=[37,74,148]) has the parameters of the dense grids the demo's full model uses.
    from fourdfy.build import build_field
    from fourdfy.config import compose_run_config

    def n_grid_params(overrides: list[str]) -> int:
        field, _ = build_field(compose_run_config(["preset=demo_cpu", *overrides]).field)
        return sum(p.numel() for m in (field.static_encoding, field.dynamic_encoding) for p in m.parameters())

    dense_count = n_grid_params([])
    hex_count = n_grid_params(["variant=hexplane", "field.hexplane.resolutions=[37,74,148]"])
    # Independently: dense 4 features × (12³ + 24³ + 48³) static, 4 × 16 times × (4³ + 8³ + 16³) dynamic;
    # planes 3·8·r² static and 3·8·16·r dynamic per scale r.
    assert dense_count == 4 * (12**3 + 24**3 + 48**3) + 4 * 16 * (4**3 + 8**3 + 16**3) == 803_584
    assert hex_count == sum(24 * r * r + 24 * 16 * r for r in (37, 74, 148)) == 789_432
    assert abs(hex_count / dense_count - 1) < 0.05
    # The preset's own HexPlane ([16, 32]) has 6% of that: the first toy Table 2 compared unequal memories.
    assert n_grid_params(["variant=hexplane"]) == sum(24 * r * r + 24 * 16 * r for r in (16, 32)) == 49_152
