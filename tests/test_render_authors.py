"""marching=authors (the authors' nerfacc marching): step and sample count, the box, a float64 quadrature at
the same points, α pruning and its bound, early stop, gradients, the EMA grid, checkpoints, config."""

from __future__ import annotations

import math

import pytest
import torch

from fourdfy.render.cameras import cameras_from_spherical
from fourdfy.render.rays import get_rays, ray_box_near_far
from fourdfy.render.trajectories import orbit_cameras
from fourdfy.render.volume import AuthorsMarchingConfig, MarchingMode, Renderer, RendererConfig

pytestmark = pytest.mark.numerics  # floats against references: .ci/run reruns these on other SIMD kernels

# 1.732·2·1/512, the authors' render_step_size for radius 1 (nerf_volume_renderer.py), written out.
AUTHORS_STEP = 0.00676562500


def authors(return_weights: bool = True, occupancy_grid: bool = False, **kw) -> Renderer:
    return Renderer(RendererConfig(marching=MarchingMode.authors, return_weights=return_weights,
                                   occupancy_grid=occupancy_grid, authors=AuthorsMarchingConfig(**kw)))


def blobs(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian blobs inside the box (σ up to 30) on a faint haze (σ = 0.8, α ≈ 0.0054 < 0.01 at the
    authors' step); colour varies with position; zero outside the box [-1, 1]³."""
    inside = (x.abs() <= 1).all(dim=-1).to(x.dtype)
    sigma = 30 * torch.exp(-((x - torch.tensor([0.2, -0.1, 0.1], dtype=x.dtype)) ** 2).sum(-1) / 0.05)
    sigma = sigma + 12 * torch.exp(-((x + torch.tensor([0.3, 0.2, 0.0], dtype=x.dtype)) ** 2).sum(-1) / 0.02)
    return (sigma + 0.8) * inside, torch.sigmoid(2 * x + t[:, None])


# ---------------------------------------------------------------- the box and the step


def test_ray_box_near_far_cases():
    o = torch.tensor([[0.0, 0.0, -5.0], [0.0, 2.0, -5.0], [0.0, 0.0, 0.0], [0.0, 0.0, -5.0], [-3.0, -3.0, -3.0],
                      [0.5, 0.5, 0.5]], dtype=torch.float64)
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [1.0, 1.0, 1.0],
                      [0.0, -1.0, 0.0]], dtype=torch.float64)
    d = torch.nn.functional.normalize(d, dim=-1)
    near, far = ray_box_near_far(o, d, 1.0)
    assert (near[0].item(), far[0].item()) == pytest.approx((4.0, 6.0)), "through the centre from 5 away"
    assert near[1] == far[1] == 0, "a ray at y = 2 misses the unit box"
    assert (near[2].item(), far[2].item()) == pytest.approx((0.0, 1.0)), "starting at the centre"
    assert near[3] == far[3] == 0, "box entirely behind the ray origin"
    # Corner to corner: enters at (-1,-1,-1), 2√3 from (-3,-3,-3), leaves at (1,1,1), 4√3 from it.
    assert (near[4].item(), far[4].item()) == pytest.approx((2 * math.sqrt(3), 4 * math.sqrt(3)))
    assert (near[5].item(), far[5].item()) == pytest.approx((0.0, 1.5)), "inside, off-centre, along -y"
    # Random rays: hits enter and leave on the surface (max |coordinate| = 1); a dense walk along each
    # ray finds points inside the box exactly on the hits, between near and far.
    gen = torch.Generator().manual_seed(0)
    o = torch.randn(300, 3, generator=gen, dtype=torch.float64) * 1.5
    d = torch.nn.functional.normalize(torch.randn(300, 3, generator=gen, dtype=torch.float64), dim=-1)
    near, far = ray_box_near_far(o, d, 1.0)
    hit = far > near
    assert 30 < hit.sum() < 280
    exit_points = (o + far[:, None] * d)[hit]
    torch.testing.assert_close(exit_points.abs().max(dim=-1).values, torch.ones(int(hit.sum()), dtype=torch.float64))
    outside = o.abs().max(dim=-1).values > 1
    entry = (o + near[:, None] * d)[hit & outside].abs().max(dim=-1).values
    torch.testing.assert_close(entry, torch.ones_like(entry))
    ts = torch.linspace(0, 8, 4001, dtype=torch.float64)
    walk_inside = ((o[:, None] + ts[None, :, None] * d[:, None]).abs() < 1 - 1e-9).all(dim=-1)  # [300, 4001]
    assert torch.equal(walk_inside.any(dim=1), hit)
    between = (ts[None] >= near[:, None]) & (ts[None] <= far[:, None])
    assert not torch.any(walk_inside & ~between)
    with pytest.raises(ValueError, match="half_size"):
        ray_box_near_far(o, d, 0.0)


def test_step_and_sample_count_on_a_central_chord():
    assert AuthorsMarchingConfig().step == pytest.approx(AUTHORS_STEP, rel=1e-12)
    # A 1x1 image from (3, 0, 0) looking along -x: the chord of the box is t in [2, 4]. Evaluation samples are
    # the midpoints (k + ½)·step from the camera. 2/step = 295.6, so the chord holds 295 or 296 of them with
    # the lattice's phase; here 295.5·step = 1.99924 < 2 <= 296.5·step = 2.00601 and 590.5·step = 3.99510 <
    # 4 <= 591.5·step: k = 296 ... 590, 295 samples.
    ks = [k for k in range(2000) if 2.0 <= (k + 0.5) * AUTHORS_STEP < 4.0]
    assert len(ks) == 295 and (ks[0], ks[-1]) == (296, 590)
    cams = cameras_from_spherical(0.0, 0.0, 3.0, 40.0)
    cams.c2w = cams.c2w.double()
    renderer = authors(alpha_threshold=0.0, early_stop_eps=0.0)
    out = renderer.render(lambda x, t: (0.01 * torch.ones_like(x[:, 0]), torch.ones_like(x)), cams,
                          torch.tensor([0.0]), 1, 1, train=False)
    expected = torch.tensor([(k + 0.5) * AUTHORS_STEP for k in ks], dtype=torch.float64)
    torch.testing.assert_close(out["t_samples"], expected, atol=1e-12, rtol=0)
    assert torch.equal(out["ray_indices"], torch.zeros(len(ks), dtype=torch.long))
    # Training: one jitter u ~ U[0, 1) per ray (the generator's first draw) shifts the lattice to
    # (k + ½ + u)·step; with this seed's u = 0.477 the chord holds 296 midpoints.
    jittered = renderer.render(lambda x, t: (0.01 * torch.ones_like(x[:, 0]), torch.ones_like(x)), cams,
                               torch.tensor([0.0]), 1, 1, generator=torch.Generator().manual_seed(4))
    u = float(torch.rand(1, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    shifted = [(k + 0.5 + u) * AUTHORS_STEP for k in range(2000)]
    expected = torch.tensor([t for t in shifted if 2.0 <= t < 4.0], dtype=torch.float64)
    assert len(expected) == 296 and u == pytest.approx(0.4771, abs=1e-4)
    torch.testing.assert_close(jittered["t_samples"], expected, atol=1e-12, rtol=0)
    # The corner-to-corner chord (2√3 = 3.4641) holds about 512 samples: the authors' num_samples_per_ray.
    assert 2 * math.sqrt(3) / AUTHORS_STEP == pytest.approx(512, abs=0.1)


# ---------------------------------------------------------------- against a float64 quadrature


def reference(field, cams, times, size, step, background):
    """Hand-written dense quadrature in float64: midpoints (k + ½)·step from each camera that lie in the box,
    δ = step, T by the running product of (1 − α)."""
    origins, dirs = get_rays(cams, size, size)
    origins, dirs = origins.reshape(-1, 3).double(), dirs.reshape(-1, 3).double()
    n_rays = origins.shape[0]
    k = torch.arange(int(8 / step), dtype=torch.float64)
    t = (k + 0.5) * step  # [K], the cameras are < 4 from the centre
    points = origins[:, None] + t[None, :, None] * dirs[:, None]  # [R, K, 3]
    in_box = (points.abs() <= 1).all(dim=-1)
    ray_times = times.double().repeat_interleave(size * size)
    sigma, rgb = field(points.reshape(-1, 3), ray_times.repeat_interleave(len(k)))
    sigma = sigma.reshape(n_rays, -1) * in_box
    alpha = 1 - torch.exp(-sigma * step)
    trans = torch.cumprod(torch.cat([torch.ones(n_rays, 1, dtype=torch.float64), 1 - alpha[:, :-1]], 1), 1)
    w = trans * alpha
    opacity = w.sum(1)
    colour = (w[..., None] * rgb.reshape(n_rays, -1, 3)).sum(1) + (1 - opacity)[:, None] * background.double()
    return colour, opacity, (w * t).sum(1), alpha, in_box


def test_authors_mode_equals_a_float64_quadrature_at_the_same_points():
    cams = orbit_cameras(2, elevation=20.0)
    times = torch.tensor([0.2, 0.7])
    background = torch.tensor([0.3, 0.6, 0.9])
    # All-occupied grid (before its first update), no α pruning, no early stop: every midpoint in the box.
    renderer = authors(occupancy_grid=True, alpha_threshold=0.0, early_stop_eps=0.0)
    assert renderer.occupancy.occupied.all()
    out = renderer.render(blobs, cams, times, 12, 12, background=background, train=False)
    colour, opacity, depth, _, in_box = reference(blobs, cams, times, 12, AUTHORS_STEP, background)
    assert len(out["t_samples"]) == int(in_box.sum()), "one sample per midpoint inside the box"
    # float32 renderer against float64: ~300 terms of float32 products, each relative error ~1e-7.
    torch.testing.assert_close(out["rgb"].reshape(-1, 3).double(), colour, atol=2e-5, rtol=0)
    torch.testing.assert_close(out["opacity"].reshape(-1).double(), opacity, atol=2e-5, rtol=0)
    torch.testing.assert_close(out["depth"].reshape(-1).double(), depth, atol=1e-4, rtol=0)
    assert float(opacity.max()) > 0.9 and float(opacity.min()) < 0.6  # rays through a blob and through haze only
    # Chunked rays give the same render.
    chunked = Renderer(RendererConfig(marching=MarchingMode.authors, chunk_rays=37, occupancy_grid=True,
                                      authors=AuthorsMarchingConfig(alpha_threshold=0.0, early_stop_eps=0.0)))
    again = chunked.render(blobs, cams, times, 12, 12, background=background, train=False)
    torch.testing.assert_close(again["rgb"], out["rgb"], atol=1e-6, rtol=0)


def test_alpha_pruning_drops_exactly_the_low_alpha_samples_within_the_pruned_optical_depth():
    """Coupling bound (as for the grid in test_occupancy_training.py): with independent hits of probability
    α_j, the full render is the colour of the first hit, the pruned one that of the first kept hit; they
    differ only if a pruned sample is hit, probability 1 − exp(−Σ_pruned τ_j); colours lie in [0, 1]."""
    cams = orbit_cameras(2, elevation=20.0)
    times = torch.tensor([0.0, 0.5])
    background = torch.tensor([1.0, 1.0, 1.0])
    renderer = authors(occupancy_grid=True, early_stop_eps=0.0)  # alpha_threshold 0.01 (the authors')
    assert renderer.alpha_threshold() == 0.0, "nerfacc clamps the threshold to the grid's mean, 0 before updates"
    state = renderer.state_dict()
    state["occupancy_values"] = torch.ones_like(state["occupancy_values"])  # mean 1 > 0.01: no clamp
    renderer.load_state_dict(state)
    assert renderer.alpha_threshold() == 0.01
    pruned = renderer.render(blobs, cams, times, 12, 12, background=background, train=False)
    full = authors(alpha_threshold=0.0, early_stop_eps=0.0).render(blobs, cams, times, 12, 12,
                                                                 background=background, train=False)
    _, _, _, alpha, in_box = reference(blobs, cams, times, 12, AUTHORS_STEP, background)
    alpha = alpha[in_box]  # packed like the full render: ray after ray, in order of t
    kept = alpha >= 0.01
    assert 0.01 < float(kept.float().mean()) < 0.5  # the blobs kept, most of the haze pruned

    def keys(render):  # (ray, lattice index k) of each sample: t = (k + ½)·step without jitter
        k = torch.round(render["t_samples"].double() / AUTHORS_STEP - 0.5).long()
        return render["ray_indices"] * 4096 + k

    renderer_kept = torch.isin(keys(full), keys(pruned))
    assert len(pruned["t_samples"]) == int(renderer_kept.sum())
    # float32 α = 1 − exp(−σ·step) is within ~1e-7 of float64's: only samples that close to 0.01 may differ.
    ambiguous = (alpha - 0.01).abs() < 1e-6
    assert int(ambiguous.sum()) <= 5
    assert torch.equal(renderer_kept[~ambiguous], kept[~ambiguous])

    tau_pruned = (-torch.log1p(-alpha) * ~renderer_kept).to(torch.float64)
    assert float(tau_pruned.max()) <= -math.log(1 - 0.01) + 1e-6, "every pruned sample has α < 0.01"
    per_ray = torch.zeros(2 * 12 * 12, dtype=torch.float64).index_add(0, full["ray_indices"], tau_pruned)
    bound = 1 - torch.exp(-per_ray)
    drgb = (full["rgb"] - pruned["rgb"]).abs().reshape(-1, 3).max(dim=1).values.double()
    assert torch.all(drgb <= bound + 1e-5)
    assert float(drgb.max()) > 1e-2, "the haze was pruned and it shows"


def test_early_stop_drops_samples_behind_transmittance_eps():
    cams = orbit_cameras(2)
    times = torch.zeros(2)
    full = authors(alpha_threshold=0.0, early_stop_eps=0.0).render(blobs, cams, times, 10, 10, train=False)
    stopped = authors(alpha_threshold=0.0, early_stop_eps=1e-4).render(blobs, cams, times, 10, 10, train=False)
    # Kept: exactly the samples whose transmittance before them, Π_{j<i}(1 − α_j), is >= 1e-4.
    _, _, _, alpha, in_box = reference(blobs, cams, times, 10, AUTHORS_STEP, torch.zeros(3))
    before = torch.cumprod(torch.cat([torch.ones(len(alpha), 1, dtype=torch.float64), 1 - alpha[:, :-1]], 1), 1)
    before = before[in_box]
    assert float((before.log() - math.log(1e-4)).abs().min()) > 1e-4, "no sample sits on eps"
    assert torch.equal(stopped["t_samples"], full["t_samples"][before >= 1e-4])
    trans = 1 - torch.zeros(200, dtype=torch.float64).index_add(0, full["ray_indices"], full["weights"].double())
    assert len(stopped["t_samples"]) < len(full["t_samples"]) - 100  # rays through a blob stop early
    # Every dropped sample sits behind transmittance < 1e-4, so all it could add is < 1e-4 per ray.
    torch.testing.assert_close(stopped["rgb"], full["rgb"], atol=1e-4 + 1e-6, rtol=0)
    assert float(trans.min()) < 1e-4, "some rays are opaque enough to stop early"


def test_gradients_reach_only_the_kept_samples():
    calls = []

    class Recording:
        def __call__(self, x, t):
            sigma, rgb = blobs(x, t)
            if torch.is_grad_enabled():
                sigma = sigma.requires_grad_()
                sigma.retain_grad()
            calls.append((torch.is_grad_enabled(), x.detach().clone(), sigma))
            return sigma, rgb

    renderer = authors(occupancy_grid=True, early_stop_eps=0.0)
    state = renderer.state_dict()
    state["occupancy_values"] = torch.ones_like(state["occupancy_values"])
    renderer.load_state_dict(state)
    out = renderer.render(Recording(), orbit_cameras(1), torch.zeros(1), 10, 10, train=False)
    assert [grad for grad, _, _ in calls] == [False, True], "α pass without grad, then the kept samples"
    (_, probe_x, probe_sigma), (_, kept_x, kept_sigma) = calls
    alpha = 1 - torch.exp(-probe_sigma * AUTHORS_STEP)
    assert torch.equal(kept_x, probe_x[alpha >= 0.01]) and len(kept_x) < len(probe_x)
    out["rgb"].sum().backward()
    assert kept_sigma.grad is not None and kept_sigma.grad.shape == (len(kept_x),)
    assert torch.all(kept_sigma.grad != 0), "every kept sample influences the image"
    assert probe_sigma.grad is None and not probe_sigma.requires_grad


# ---------------------------------------------------------------- the EMA grid


def test_ema_update_against_a_hand_computation():
    r, thr, decay, step = 4, 0.01, 0.95, AUTHORS_STEP
    renderer = authors(occupancy_grid=True, grid_resolution=r, grid_threshold=thr, grid_warmup=2)
    cell = torch.zeros(r, r, r)
    cell[1, 2, 3], cell[0, 0, 0], cell[3, 1, 1] = 10.0, 1.0, 0.5  # occ = 0.0677, 0.00677, 0.00338
    probes = []

    def cell_field(scale):
        def field(x, t):
            probes.append((x.clone(), t.clone()))
            i = torch.floor((x + 1) / 2 * r).long().clamp(0, r - 1)
            return scale * cell[i[:, 0], i[:, 1], i[:, 2]], torch.zeros_like(x)
        return field

    gen = torch.Generator().manual_seed(0)
    # Warm-up update: every cell probed once, one point inside itself, one time in [0.25, 0.75].
    renderer.update_occupancy(cell_field(1.0), torch.tensor([0.25, 0.5, 0.75]), iteration=0, generator=gen)
    x, t = probes[-1]
    assert x.shape == (r**3, 3)
    flat = torch.arange(r**3)
    own = torch.stack([flat // (r * r), (flat // r) % r, flat % r], dim=-1)
    assert torch.equal(torch.floor((x + 1) / 2 * r).long(), own), "each probe lies in its own cell"
    assert torch.all(t == t[0]) and 0.25 <= float(t[0]) <= 0.75
    values = cell * step
    torch.testing.assert_close(renderer.occupancy.values, values)
    # mean = (10 + 1 + 0.5)·step/64 = 0.001216 < 0.01: the threshold drops to the mean, so all three count.
    assert renderer.occupancy.values.mean() < thr
    assert torch.equal(renderer.occupancy.occupied, cell > 0)

    # After the warm-up: 16 uniform cells plus the occupied ones (3 < 16: all of them), the field now 4x.
    probes.clear()
    before = renderer.occupancy.values.clone()
    renderer.update_occupancy(cell_field(4.0), torch.tensor([0.0, 1.0]), iteration=2, generator=gen)
    x, _ = probes[-1]
    assert x.shape == (16 + 3, 3)
    index = torch.floor((x + 1) / 2 * r).long()
    probed = torch.zeros(r, r, r, dtype=torch.bool)
    probed[index[:, 0], index[:, 1], index[:, 2]] = True
    assert probed[1, 2, 3] and probed[0, 0, 0] and probed[3, 1, 1], "every occupied cell is re-probed"
    expected = torch.where(probed, torch.maximum(before * decay, 4.0 * cell * step), before)
    torch.testing.assert_close(renderer.occupancy.values, expected)
    assert torch.equal(renderer.occupancy.occupied, expected > min(thr, float(expected.mean())))

    # A field gone to zero: probed cells decay by 0.95 per update and are otherwise left alone.
    probes.clear()
    before = renderer.occupancy.values.clone()
    renderer.update_occupancy(cell_field(0.0), torch.tensor([0.0]), iteration=3, generator=gen)
    changed = renderer.occupancy.values != before
    torch.testing.assert_close(renderer.occupancy.values[changed], before[changed] * decay)
    assert changed.sum() == 3, "only the 3 non-zero cells can change, and all were probed again"
    with pytest.raises(ValueError, match="iteration"):
        renderer.update_occupancy(cell_field(1.0), torch.tensor([0.0]))


def test_grid_skips_empty_cells_and_state_dict_round_trips():
    renderer = authors(occupancy_grid=True, early_stop_eps=0.0)
    gen = torch.Generator().manual_seed(1)
    renderer.update_occupancy(blobs, torch.tensor([0.0]), iteration=0, generator=gen)
    renderer.update_occupancy(blobs, torch.tensor([0.0]), iteration=256, generator=gen)
    grid = renderer.occupancy
    assert 0.01 < float(grid.occupied.float().mean()) < 0.5, "the blobs occupy part of the 32³ grid"
    cams, times = orbit_cameras(2), torch.zeros(2)
    out = renderer.render(blobs, cams, times, 10, 10, train=False)
    # Every sample rendered lies in an occupied cell.
    origins, dirs = get_rays(cams, 10, 10)
    points = origins.reshape(-1, 3)[out["ray_indices"]] + out["t_samples"][:, None] * dirs.reshape(-1, 3)[
        out["ray_indices"]]
    i = torch.floor((points + 1) / 2 * 32).long().clamp(0, 31)
    assert torch.all(grid.occupied[i[:, 0], i[:, 1], i[:, 2]])

    state = renderer.state_dict()
    assert set(state) == {"occupied", "occupancy_values"}
    fresh = authors(occupancy_grid=True, early_stop_eps=0.0)
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    assert torch.equal(fresh.occupancy.values, grid.values) and torch.equal(fresh.occupancy.occupied, grid.occupied)
    assert torch.equal(fresh.render(blobs, cams, times, 10, 10, train=False)["rgb"], out["rgb"])
    # Same generator state, same next update: the grid state is all a resume needs.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    renderer.update_occupancy(blobs, torch.tensor([0.0, 1.0]), iteration=272, generator=g1)
    fresh.update_occupancy(blobs, torch.tensor([0.0, 1.0]), iteration=272, generator=g2)
    assert torch.equal(fresh.occupancy.values, renderer.occupancy.values)

    uniform = Renderer(RendererConfig(occupancy_grid=True))
    with pytest.raises(ValueError, match="renderer.marching"):
        uniform.load_state_dict(state)
    with pytest.raises(ValueError, match="renderer.marching"):
        fresh.load_state_dict(uniform.state_dict())
    with pytest.raises(ValueError, match="grid_resolution"):
        authors(occupancy_grid=True, grid_resolution=8).load_state_dict(state)


def test_config_rejects_bad_values_and_composes_the_mode():
    for key, value in (("num_samples_per_ray", 0), ("box_radius", 0.0), ("alpha_threshold", 1.0),
                       ("early_stop_eps", -0.1), ("grid_resolution", 0), ("grid_threshold", -1.0),
                       ("grid_ema_decay", 1.5), ("grid_warmup", -1)):
        with pytest.raises(ValueError, match=f"renderer.authors.{key}"):
            RendererConfig(authors=AuthorsMarchingConfig(**{key: value})).validate()
    from fourdfy.config import compose_run_config

    cfg = compose_run_config(["renderer.marching=authors", "renderer.authors.num_samples_per_ray=256"])
    assert cfg.renderer.marching == MarchingMode.authors and cfg.renderer.authors.num_samples_per_ray == 256
    assert compose_run_config([]).renderer.marching == MarchingMode.uniform


def test_bench_marching_reports_both_modes():
    from bench.marching import run

    result = run(size=4, views=1, reps=1)
    for field in ("smoke", "solid"):
        modes = result[field]["modes"]
        assert set(modes) == {"uniform_128", "uniform_128_grid", "authors"}
        assert modes["uniform_128"]["time_ratio"] == 1.0
        assert modes["uniform_128"]["samples_per_ray"] == {"with_grad": 128.0, "no_grad": 0.0}
        assert 0 < modes["authors"]["samples_per_ray"]["with_grad"] <= modes["authors"]["samples_per_ray"]["no_grad"]
        assert all(0 <= m["max_abs_drgb"] <= 1 for m in modes.values())
