"""Rays and the volume renderer: hand-computed compositing, analytic spheres, gradients, times, jitter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fourdfy.render.cameras import cameras_from_spherical
from fourdfy.render.rays import get_rays, ray_sphere_near_far
from fourdfy.render.trajectories import orbit_cameras
from fourdfy.render.volume import Renderer, RendererConfig, composite

pytestmark = pytest.mark.numerics  # floats against references: .ci/run reruns these on other SIMD kernels


def close(actual, expected, atol, rtol=0.0):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- rays


def test_rays_project_back_onto_their_pixel_centres():
    # Independent check: project a point on each ray with the textbook pinhole model
    # (world -> camera with the inverse c2w, u = W/2 + f·x/(-z), v = H/2 - f·y/(-z)).
    cams = cameras_from_spherical([20.0, -35.0], [40.0, 170.0], [2.5, 3.0], [50.0, 25.0])
    h, w = 6, 9
    origins, dirs = get_rays(cams, h, w)
    assert origins.shape == (2, h, w, 3) and dirs.shape == (2, h, w, 3)
    close(dirs.norm(dim=-1), torch.ones(2, h, w), atol=1e-6)
    points = origins + 1.7 * dirs
    w2c = torch.linalg.inv(cams.c2w.double())
    cam = torch.einsum("bij,bhwj->bhwi", w2c[:, :3, :3], points.double()) + w2c[:, None, None, :3, 3]
    focal = 0.5 * h / torch.tan(0.5 * cams.fovy.double())
    u = 0.5 * w + focal[:, None, None] * cam[..., 0] / (-cam[..., 2])
    v = 0.5 * h - focal[:, None, None] * cam[..., 1] / (-cam[..., 2])
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    close(u, (cols + 0.5).double().expand(2, h, w), atol=1e-4)
    close(v, (rows + 0.5).double().expand(2, h, w), atol=1e-4)
    assert torch.all(cam[..., 2] < 0), "camera looks along -z"
    close(origins, cams.c2w[:, None, None, :3, 3].expand(2, h, w, 3), atol=0.0)


def test_ray_orientation_row_zero_is_top_and_x_is_right():
    # Camera at azimuth -90° sits on -y looking along +y; its right is +x and up is +z.
    cams = cameras_from_spherical(0.0, -90.0, 3.0, 40.0)
    _, dirs = get_rays(cams, 5, 7)
    assert dirs[0, 0, 3, 2] > 0 > dirs[0, 4, 3, 2], "row 0 must look up (+z), the last row down"
    assert dirs[0, 2, 0, 0] < 0 < dirs[0, 2, 6, 0], "column 0 must look left (-x), the last column right"
    close(dirs[0, 2, 3], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)  # centre pixel of an odd image: forward
    # Vertical FoV: the centre column's first and last pixel centres subtend 2·atan((H/2 - 0.5)/focal).
    focal = 0.5 * 5 / math.tan(math.radians(20.0))
    angle = torch.arccos((dirs[0, 0, 3] * dirs[0, 4, 3]).sum())
    assert angle.item() == pytest.approx(2 * math.atan(2.0 / focal), abs=1e-5)


def test_ray_sphere_near_far_cases():
    o = torch.tensor([[0.0, 0.0, -5.0], [0.0, 2.0, -5.0], [0.0, 0.0, 0.0], [0.0, 0.0, -5.0], [0.0, 0.0, 0.5]])
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]])
    near, far = ray_sphere_near_far(o, d, 1.0)
    # Through the centre from 5 away: enters at 4, leaves at 6.
    assert (near[0].item(), far[0].item()) == pytest.approx((4.0, 6.0))
    assert near[1] == far[1], "a ray passing 2 from the centre misses a unit sphere"
    assert (near[2].item(), far[2].item()) == pytest.approx((0.0, 1.0)), "starting at the centre"
    assert near[3] == far[3], "sphere entirely behind the ray origin"
    assert (near[4].item(), far[4].item()) == pytest.approx((0.0, 0.5)), "starting inside, off-centre"
    # Random rays: the hit points lie on the sphere.
    gen = torch.Generator().manual_seed(0)
    o = torch.randn(200, 3, generator=gen, dtype=torch.float64) * 3
    d = torch.nn.functional.normalize(torch.randn(200, 3, generator=gen, dtype=torch.float64), dim=-1)
    near, far = ray_sphere_near_far(o, d, 1.5)
    hit = far > near
    assert 10 < hit.sum() < 200
    outside = o.norm(dim=-1) > 1.5
    close(
        (o + far[:, None] * d)[hit].norm(dim=-1),
        torch.full((int(hit.sum()),), 1.5, dtype=torch.float64),
        atol=1e-9,
    )
    entry = (o + near[:, None] * d)[hit & outside].norm(dim=-1)
    close(entry, torch.full_like(entry, 1.5), atol=1e-9)
    with pytest.raises(ValueError, match="radius"):
        ray_sphere_near_far(o, d, 0.0)


# ---------------------------------------------------------------- compositing by hand


class SlabField:
    """Density and colour piecewise constant in x (the hand-built ray runs along -x)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        px = x[:, 0]
        density = torch.where(px > 1.5, 0.0, torch.where(px > 0.5, 0.5, torch.where(px > -0.5, 2.0, 1.0)))
        red, green, blue = (
            torch.tensor([1.0, 0.0, 0.0]),
            torch.tensor([0.0, 1.0, 0.0]),
            torch.tensor([0.0, 0.0, 1.0]),
        )
        rgb = torch.where(
            (px > 0.5)[:, None], red, torch.where((px > -0.5)[:, None], green, blue)
        )  # x in (0.5, 1.5]: red; (-0.5, 0.5]: green; below: blue
        return density, rgb


def test_hand_built_ray_matches_hand_arithmetic():
    # A 1x1 image from a camera at (3, 0, 0) looking along -x: the ray is x = 3 - t. Bounding radius 2
    # -> near = 1, far = 5; 4 samples without jitter at the bin starts t = 1, 2, 3, 4 (x = 2, 1, 0, -1),
    # every δ = 1 (the last one reaches far = 5).
    #   sample  x   σ    colour  τ=σδ  α = 1 - e^-τ             T = e^-(Σ earlier τ)   w = T·α
    #   0       2   0    red     0     0                        1                      0
    #   1       1   0.5  red     0.5   1 - e^-0.5 = 0.39346934  1                      0.39346934
    #   2       0   2    green   2     1 - e^-2   = 0.86466472  e^-0.5 = 0.60653066    0.52444566
    #   3      -1   1    blue    1     1 - e^-1   = 0.63212056  e^-2.5 = 0.08208500    0.05188762
    # opacity = 0.39346934 + 0.52444566 + 0.05188762 = 0.96980262
    # rgb (black background) = (0.39346934, 0.52444566, 0.05188762)
    # depth = 2·0.39346934 + 3·0.52444566 + 4·0.05188762 = 0.78693868 + 1.57333698 + 0.20755048 = 2.56782614
    # With a white background every channel gains 1 - opacity = 0.03019738:
    # (0.42366672, 0.55464304, 0.08208500).
    cams = cameras_from_spherical(0.0, 0.0, 3.0, 40.0)
    renderer = Renderer(RendererConfig(n_samples=4, radius=2.0, return_weights=True))
    out = renderer.render(SlabField(), cams, torch.tensor([0.0]), 1, 1, train=False)
    close(out["t_samples"][0, 0, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]), atol=1e-5)
    close(out["weights"][0, 0, 0], torch.tensor([0.0, 0.39346934, 0.52444566, 0.05188762]), atol=3e-7)
    close(out["opacity"][0, 0, 0], torch.tensor(0.96980262), atol=3e-7)
    close(out["rgb"][0, 0, 0], torch.tensor([0.39346934, 0.52444566, 0.05188762]), atol=3e-7)
    close(out["depth"][0, 0, 0], torch.tensor(2.56782614), atol=2e-6)
    close(out["depth_normalized"][0, 0, 0], torch.tensor(2.56782614 / 0.96980262), atol=2e-6)
    white = renderer.render(
        SlabField(), cams, torch.tensor([0.0]), 1, 1, background=torch.ones(3), train=False
    )
    close(white["rgb"][0, 0, 0], torch.tensor([0.42366672, 0.55464304, 0.08208500]), atol=3e-7)


def test_composite_last_interval_reaches_far():
    # Uneven samples t = (0.5, 1.25), far = 2: δ = (0.75, 0.75). σ = (2, 4):
    # τ = (1.5, 3); α = (1 - e^-1.5, 1 - e^-3) = (0.77686984, 0.95021293); T = (1, e^-1.5 = 0.22313016);
    # w = (0.77686984, 0.21202116); opacity = 0.98889100;
    # colour (1 and 0.5): 0.77686984 + 0.5·0.21202116 = 0.77686984 + 0.10601058 = 0.88288042.
    out = composite(
        torch.tensor([[2.0, 4.0]]),
        torch.tensor([[[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]]),
        torch.tensor([[0.5, 1.25]]),
        torch.tensor([2.0]),
    )
    close(out["weights"][0], torch.tensor([0.77686984, 0.21202116]), atol=3e-7)
    close(out["opacity"][0], torch.tensor(0.98889100), atol=3e-7)
    close(out["rgb"][0], torch.full((3,), 0.88288042), atol=3e-7)
    # T_i = Π(1 - α_j) form, computed naively, agrees on random input.
    gen = torch.Generator().manual_seed(0)
    sigma = torch.rand(5, 7, generator=gen, dtype=torch.float64) * 3
    t = torch.sort(torch.rand(5, 7, generator=gen, dtype=torch.float64) * 2, dim=1).values
    far = torch.full((5,), 2.5, dtype=torch.float64)
    delta = torch.cat([t[:, 1:] - t[:, :-1], far[:, None] - t[:, -1:]], 1)
    alpha = 1 - torch.exp(-sigma * delta)
    trans = torch.stack([torch.prod(1 - alpha[:, :i], dim=1) for i in range(7)], dim=1)
    out = composite(sigma, torch.rand(5, 7, 3, generator=gen, dtype=torch.float64), t, far)
    close(out["weights"], trans * alpha, atol=1e-12)


# ---------------------------------------------------------------- analytic spheres


class SphereField(nn.Module):
    """Constant density inside |x| < radius, zero outside; colour a learnable constant; optional t-colour."""

    def __init__(self, radius: float, density: float, colour_from_time: bool = False):
        super().__init__()
        self.radius = radius
        self.log_density = nn.Parameter(torch.tensor(math.log(density)))
        self.colour_logit = nn.Parameter(torch.tensor([0.3, -0.2, 0.1]))
        self.colour_from_time = colour_from_time
        self.seen_times: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen_times.append(t.detach().clone())
        inside = (x.norm(dim=-1) < self.radius).to(x.dtype)
        density = inside * self.log_density.exp()
        if self.colour_from_time:
            rgb = t[:, None].expand(-1, 3)
        else:
            rgb = torch.sigmoid(self.colour_logit).expand(x.shape[0], 3)
        return density, rgb


def test_constant_density_sphere_opacity_is_one_minus_exp_sigma_chord():
    sigma, r0, n = 1.3, 0.8, 2048
    cams = cameras_from_spherical(10.0, 25.0, 3.0, 30.0)
    renderer = Renderer(RendererConfig(n_samples=n))
    out = renderer.render(SphereField(r0, sigma), cams, torch.tensor([0.5]), 9, 9, train=False)
    origins, dirs = get_rays(cams, 9, 9)
    o, d = origins.double(), dirs.double()
    # Chord of a ray at distance b from the centre: 2·sqrt(r0² − b²) (0 if it misses).
    b2 = (o * o).sum(-1) - (o * d).sum(-1) ** 2
    chord = 2 * torch.sqrt(torch.clamp(r0**2 - b2, min=0.0))
    expected = 1 - torch.exp(-sigma * chord)
    assert chord[0, 4, 4] == pytest.approx(2 * r0, abs=1e-6), "the centre pixel passes through the centre"
    # Quadrature error: at most one bin (Δ = 2·√3·.../n, about 0.0017 here) of thickness per boundary.
    bin_len = 2 * math.sqrt(3.0) / n
    tol = 2 * sigma * bin_len
    close(out["opacity"][0].double(), expected[0], atol=tol)
    assert out["opacity"][0, 4, 4].item() == pytest.approx(1 - math.exp(-sigma * 2 * r0), abs=tol)
    assert (chord[0] == 0).any(), "some corner rays should miss the sphere (and render opacity 0)"
    assert torch.all(out["opacity"][0][chord[0] == 0] == 0)


def test_opaque_sphere_centre_pixel_depth_is_distance_minus_radius():
    r0, distance, n = 0.5, 3.0, 512
    cams = cameras_from_spherical(20.0, -60.0, distance, 40.0)
    out = Renderer(RendererConfig(n_samples=n)).render(
        SphereField(r0, 1e4), cams, torch.tensor([0.0]), 5, 5, train=False
    )
    bin_len = 2 * math.sqrt(3.0) / n
    assert out["opacity"][0, 2, 2].item() == pytest.approx(1.0, abs=1e-6)
    # The first sample inside the sphere is at most one bin past the surface at distance - r0 = 2.5.
    depth = out["depth_normalized"][0, 2, 2].item()
    assert distance - r0 - 1e-4 <= depth <= distance - r0 + bin_len
    assert out["depth"][0, 2, 2].item() == pytest.approx(depth, abs=1e-5)  # opacity 1: both depths agree


# ---------------------------------------------------------------- gradients, times, jitter, background


def test_gradients_reach_the_field_parameters():
    field = SphereField(0.9, 0.8)
    cams = orbit_cameras(2)
    out = Renderer(RendererConfig(n_samples=24)).render(
        field, cams, torch.tensor([0.1, 0.9]), 8, 8, generator=torch.Generator().manual_seed(0)
    )
    (out["rgb"].sum() + out["opacity"].sum()).backward()
    for name, param in field.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, (
            name
        )


def test_composite_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(1)
    sigma = (torch.rand(3, 5, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    rgb = torch.rand(3, 5, 3, generator=gen, dtype=torch.float64).requires_grad_()
    t = torch.sort(torch.rand(3, 5, generator=gen, dtype=torch.float64), dim=1).values
    far = torch.full((3,), 1.2, dtype=torch.float64)

    def fn(s, c):
        out = composite(s, c, t, far)
        return out["rgb"], out["opacity"], out["depth"]

    assert torch.autograd.gradcheck(fn, (sigma, rgb))


def test_each_view_gets_its_own_time():
    field = SphereField(0.7, 1e4, colour_from_time=True)
    times = torch.tensor([0.1, 0.45, 0.8])
    cams = orbit_cameras(3)
    renderer = Renderer(RendererConfig(n_samples=64, chunk_rays=50))  # chunks straddle views
    out = renderer.render(field, cams, times, 5, 5, train=False)
    seen = torch.cat(field.seen_times).reshape(3, 5 * 5 * 64)
    close(seen, times[:, None].expand(3, 5 * 5 * 64), atol=0.0)
    # The field's colour is its time, so an opaque centre pixel shows each view's own time.
    close(out["rgb"][:, 2, 2], times[:, None].expand(3, 3), atol=1e-5)
    with pytest.raises(ValueError, match="times"):
        renderer.render(field, cams, torch.tensor([0.1, 0.2]), 5, 5, train=False)


def test_jitter_reproducible_from_the_generator_only():
    field = SphereField(0.9, 2.0)
    cams = orbit_cameras(2)
    times = torch.tensor([0.0, 1.0])
    cfg = RendererConfig(n_samples=16, return_weights=True)
    renderer = Renderer(cfg)

    def render(seed, chunk=None):
        r = (
            Renderer(RendererConfig(n_samples=16, return_weights=True, chunk_rays=chunk))
            if chunk
            else renderer
        )
        return r.render(field, cams, times, 6, 6, generator=torch.Generator().manual_seed(seed))

    global_state = torch.get_rng_state()
    a, b, c = render(0), render(0), render(1)
    assert torch.equal(torch.get_rng_state(), global_state), "jitter touched torch's global RNG"
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["t_samples"], b["t_samples"])
    assert not torch.equal(a["t_samples"], c["t_samples"])
    chunked = render(0, chunk=7)
    close(chunked["rgb"], a["rgb"], atol=1e-6)
    assert torch.equal(chunked["t_samples"], a["t_samples"])
    # Each jittered sample stays inside its own bin [near + iΔ, near + (i+1)Δ).
    origins, dirs = get_rays(cams, 6, 6)
    near, far = ray_sphere_near_far(origins, dirs, cfg.radius)
    bins = (a["t_samples"] - near[..., None]) / ((far - near) / 16)[..., None]
    idx = torch.arange(16, dtype=bins.dtype)
    assert torch.all(bins >= idx - 1e-4) and torch.all(bins < idx + 1 + 1e-4)
    assert (bins - idx).std() > 0.2, "offsets should be spread over the bin"
    # Evaluation renders are deterministic without a generator.
    e1 = renderer.render(field, cams, times, 6, 6, train=False)
    e2 = renderer.render(field, cams, times, 6, 6, train=False)
    assert torch.equal(e1["rgb"], e2["rgb"])


def test_background_options():
    field = SphereField(0.6, 1.0)
    cams = orbit_cameras(2)
    times = torch.zeros(2)
    kw = {"train": False}
    black = Renderer().render(field, cams, times, 7, 7, **kw)
    white = Renderer(RendererConfig(white_background=True)).render(field, cams, times, 7, 7, **kw)
    close(white["rgb"], black["rgb"] + (1 - black["opacity"])[..., None], atol=1e-6)
    per_view = torch.tensor([[0.2, 0.4, 0.6], [1.0, 0.0, 0.5]])
    coloured = Renderer().render(field, cams, times, 7, 7, background=per_view, **kw)
    close(
        coloured["rgb"], black["rgb"] + (1 - black["opacity"])[..., None] * per_view[:, None, None], atol=1e-6
    )

    def sky(directions):
        return (directions + 1) / 2

    env = Renderer().render(field, cams, times, 7, 7, background=sky, **kw)
    _, dirs = get_rays(cams, 7, 7)
    close(env["rgb"], black["rgb"] + (1 - black["opacity"])[..., None] * sky(dirs), atol=1e-6)
    assert (black["opacity"] < 0.5).any() and (black["opacity"] > 0.1).any()
    with pytest.raises(ValueError, match="background"):
        Renderer().render(field, cams, times, 7, 7, background=torch.ones(3, 3), **kw)


def test_bad_field_output_and_config_are_reported():
    cams = orbit_cameras(1)

    def bad_field(x, t):
        return x[:, 0:1].abs(), x.abs()  # density [N, 1] instead of [N]

    with pytest.raises(ValueError, match="density"):
        Renderer().render(bad_field, cams, torch.zeros(1), 4, 4, train=False)
    with pytest.raises(ValueError, match="renderer.n_samples"):
        Renderer(RendererConfig(n_samples=0))
    with pytest.raises(ValueError, match="renderer.chunk_rays"):
        RendererConfig(chunk_rays=0).validate()


# ---------------------------------------------------------------- occupancy grid (optional path)


class CountingSphere(SphereField):
    def __init__(self, radius: float, density: float):
        super().__init__(radius, density)
        self.n_queried = 0

    def forward(self, x, t):
        self.n_queried += x.shape[0]
        return super().forward(x, t)


def test_occupancy_grid_matches_dense_path_and_skips_empty_space():
    cams = orbit_cameras(3, elevation=25.0)
    times = torch.tensor([0.0, 0.5, 1.0])
    dense_field, grid_field = CountingSphere(0.6, 3.0), CountingSphere(0.6, 3.0)
    dense = Renderer(RendererConfig(n_samples=32))
    # Threshold 0 with density exactly 0 outside the sphere, and one cell of dilation: conservative.
    sparse = Renderer(RendererConfig(n_samples=32, occupancy_grid=True, occupancy_threshold=0.0))
    sparse.update_occupancy(grid_field, times)
    occupied = sparse.occupancy.occupied
    assert 0 < occupied.float().mean() < 0.2, "a small sphere should occupy a small part of the grid"
    # Every cell whose centre is inside the sphere is occupied.
    inside = sparse.occupancy.cell_centres().norm(dim=-1) < 0.6
    assert torch.all(occupied[inside])
    grid_field.n_queried = 0

    def run(renderer, field):
        return renderer.render(field, cams, times, 12, 12, generator=torch.Generator().manual_seed(4))

    a, b = run(dense, dense_field), run(sparse, grid_field)
    for key in ("rgb", "opacity", "depth"):
        close(b[key], a[key], atol=1e-4)
    assert a["opacity"].max() > 0.5
    assert grid_field.n_queried < 0.5 * dense_field.n_queried
    # Same gradients through the sparse path.
    a["rgb"].sum().backward()
    b["rgb"].sum().backward()
    close(grid_field.colour_logit.grad, dense_field.colour_logit.grad, atol=1e-4, rtol=1e-4)
    close(grid_field.log_density.grad, dense_field.log_density.grad, atol=1e-4, rtol=1e-4)
    # The grid is state to checkpoint: it round-trips.
    other = Renderer(RendererConfig(n_samples=32, occupancy_grid=True))
    assert other.occupancy.occupied.all(), "before any update, every cell counts as occupied"
    other.load_state_dict(sparse.state_dict())
    assert torch.equal(other.occupancy.occupied, occupied)
    with pytest.raises(ValueError, match="occupancy_resolution"):
        Renderer(RendererConfig(occupancy_grid=True, occupancy_resolution=8)).load_state_dict(
            sparse.state_dict()
        )
    with pytest.raises(ValueError, match="occupancy_grid=True"):
        dense.update_occupancy(dense_field, times)
