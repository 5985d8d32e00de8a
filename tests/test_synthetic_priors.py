"""The closed-form priors: the ideal denoiser against brute force, and SDS on it."""

from __future__ import annotations

import math

import pytest
import torch

from fourdfy.guidance.noise import scaled_linear_alphas_cumprod
from fourdfy.render.cameras import cameras_from_spherical
from fourdfy.render.trajectories import orbit_cameras
from fourdfy.synthetic.priors import (
    ToyDataConfig,
    ToyVideoConfig,
    ToyVideoPrior,
    build_image_banks,
    camera_directions,
    camera_log_kernel,
    eps_from_x0,
    ideal_denoiser,
    render_scene,
)
from fourdfy.synthetic.scenes import SCENES, get_scene

pytestmark = pytest.mark.numerics  # floats against references: .ci/run reruns these on other SIMD kernels


def _brute_force_posterior_mean(z, alpha_bar, data, log_prior=None):
    """E[x0 | z] by Bayes' rule written out with Gaussian densities in float64, one datum at a time."""
    z, data = z.double(), data.double()
    out = []
    for b in range(z.shape[0]):
        weights = []
        for i in range(data.shape[0]):
            diff = z[b] - math.sqrt(alpha_bar) * data[i]
            log_lik = -float(diff @ diff) / (2 * (1 - alpha_bar))
            log_p = 0.0 if log_prior is None else float(log_prior[b, i])
            weights.append(log_lik + log_p)
        w = torch.tensor(weights, dtype=torch.float64)
        w = torch.exp(w - w.max())
        w = w / w.sum()
        out.append((w[:, None] * data).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("t", [50, 400, 900])
def test_ideal_denoiser_equals_brute_force_posterior_mean(t):
    gen = torch.Generator().manual_seed(t)
    data = torch.rand(7, 12, generator=gen) * 2 - 1
    z = torch.randn(3, 12, generator=gen)
    alpha_bar = float(scaled_linear_alphas_cumprod()[t])
    log_prior = torch.randn(3, 7, generator=gen)
    for lp in (None, log_prior):
        got = ideal_denoiser(z, alpha_bar, data, lp)
        want = _brute_force_posterior_mean(z, alpha_bar, data, lp)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_single_datum_is_returned_exactly():
    datum = torch.tensor([[0.3, -0.7, 0.1]])
    z = torch.randn(5, 3)
    for t in (10, 500, 999):
        x0 = ideal_denoiser(z, float(scaled_linear_alphas_cumprod()[t]), datum)
        assert torch.equal(x0, datum.expand(5, -1))


def test_no_overflow_at_low_noise():
    # plain exp(−‖z − √ᾱ x‖²/2(1−ᾱ)) underflows to 0/0 here; the log-sum-exp form must not
    data = torch.rand(4, 3072) * 2 - 1
    z = data[2:3] + 0.01 * torch.randn(1, 3072)
    x0 = ideal_denoiser(z, float(scaled_linear_alphas_cumprod()[2]), data)
    assert torch.isfinite(x0).all()
    torch.testing.assert_close(x0, data[2:3])


def test_eps_from_x0_inverts_the_forward_process():
    x0, eps = torch.randn(2, 5), torch.randn(2, 5)
    ab = 0.37
    z = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    torch.testing.assert_close(eps_from_x0(z, x0, ab), eps)


def test_sds_step_on_the_ideal_denoiser_moves_a_render_towards_the_data():
    gen = torch.Generator().manual_seed(0)
    data = torch.rand(5, 48, generator=gen) * 2 - 1
    x = (data[1:2] + 0.5 * torch.randn(1, 48, generator=gen)).requires_grad_(True)
    opt = torch.optim.SGD([x], lr=0.2)
    ab_table = scaled_linear_alphas_cumprod()
    distance = lambda: float(((x.detach() - data) ** 2).sum(-1).min())  # noqa: E731
    start = distance()
    for _ in range(200):
        t = int(torch.randint(20, 980, (), generator=gen))
        ab = float(ab_table[t])
        noise = torch.randn(x.shape, generator=gen)
        z = math.sqrt(ab) * x.detach() + math.sqrt(1 - ab) * noise
        grad = (1 - ab) * (eps_from_x0(z, ideal_denoiser(z, ab, data), ab) - noise)  # SDS, w = 1 − ᾱ
        opt.zero_grad()
        x.grad = grad
        opt.step()
    assert distance() < 0.25 * start, (start, distance())


def test_camera_kernel_is_a_gaussian_in_angle():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    ang = math.radians(10.0)
    b = torch.tensor([[1.0, 0.0, 0.0], [math.cos(ang), math.sin(ang), 0.0]])
    log_k = camera_log_kernel(a, b, tau_deg=5.0)
    torch.testing.assert_close(log_k, torch.tensor([[0.0, -(10.0**2) / (2 * 25.0)]]), atol=1e-3, rtol=0)


def test_unknown_toy_prompt_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        get_scene("a panda dancing")
    for scene in SCENES:
        assert scene.prompt in str(err.value)


@pytest.mark.parametrize("scene", SCENES, ids=lambda s: s.prompt)
def test_scenes_are_solid_inside_empty_outside_and_move(scene):
    far = torch.tensor([[0.95, 0.95, 0.95]])
    density, rgb = scene(far, torch.zeros(1))
    assert float(density) < 1e-3 and rgb.shape == (1, 3)
    pts = torch.rand(4000, 3) * 2 - 1
    d0, _ = scene(pts, torch.zeros(4000))
    d1, _ = scene(pts, torch.ones(4000) * 0.5)
    assert float(d0.max()) > 50  # something solid
    assert (d0 - d1).abs().max() > 10  # and it moves


def test_image_banks_hold_every_image_time_time_major(tmp_path, monkeypatch):
    monkeypatch.setenv("FOURDFY_CACHE", str(tmp_path))
    cfg = ToyDataConfig(elevations_deg=[15.0], azimuth_step_deg=120.0, n_samples=16, image_times=[0.0, 0.5])
    (bank,) = build_image_banks(8, cfg, [0.0])
    ring = orbit_cameras(3, elevation=15.0, distance=cfg.distance, fovy_deg=cfg.fovy_deg)
    ball = SCENES[0]
    assert bank.images[ball.prompt].shape == (6, 8 * 8 * 3) and bank.directions.shape == (6, 3)
    for k, t in enumerate(cfg.image_times):  # entries time-major: index = time_index · n_cameras + camera
        rgb = render_scene(ball, ring, torch.full((3,), t), 8, cfg)["rgb"]
        assert torch.allclose(bank.images[ball.prompt][3 * k : 3 * k + 3], (rgb * 2 - 1).reshape(3, -1), atol=1e-6)
    assert not torch.equal(bank.images[ball.prompt][:3], bank.images[ball.prompt][3:])  # the ball moved
    with pytest.raises(ValueError, match="image_times"):
        build_image_banks(8, ToyDataConfig(image_times=[]), [0.0])


def test_camera_agnostic_video_prior_on_chosen_azimuths(tmp_path, monkeypatch):
    """camera_tau_deg=None: the clip kernel is the start-time Gaussian alone, whatever the camera (Zeroscope has
    no camera input); clip_azimuths_deg: the clips are filmed from exactly those azimuths at every elevation."""
    monkeypatch.setenv("FOURDFY_CACHE", str(tmp_path))
    data = ToyDataConfig(n_samples=8)
    common = dict(size=4, n_frames=2, clip_azimuths_deg=[-30.0, 30.0], clip_elevations_deg=[10.0],
                  clip_starts=[0.0, 0.25])
    agnostic = ToyVideoPrior(ToyVideoConfig(camera_tau_deg=None, **common), data)
    ring = cameras_from_spherical(10.0, torch.tensor([-30.0, 30.0]), data.distance, data.fovy_deg)
    assert torch.allclose(agnostic.clip_dirs, camera_directions(ring).repeat(2, 1), atol=1e-6)
    assert agnostic.clip_starts.tolist() == [0.0, 0.0, 0.25, 0.25]
    front, back = orbit_cameras(1, elevation=0.0), orbit_cameras(1, elevation=30.0, azimuth_start=170.0)
    times = torch.tensor([0.1])
    k_front = agnostic._log_kernel(front, times, agnostic.clip_dirs, agnostic.clip_starts)
    k_back = agnostic._log_kernel(back, times, agnostic.clip_dirs, agnostic.clip_starts)
    tau = ToyVideoConfig().time_tau
    expected = torch.tensor([[-(0.1**2), -(0.1**2), -(0.15**2), -(0.15**2)]]) / (2 * tau**2)
    assert torch.equal(k_front, k_back) and torch.allclose(k_front, expected, rtol=1e-5)
    # A camera-conditioned prior on the same clips does tell the two cameras apart.
    aware = ToyVideoPrior(ToyVideoConfig(camera_tau_deg=25.0, **common), data)
    assert not torch.allclose(aware._log_kernel(front, times, aware.clip_dirs, aware.clip_starts),
                              aware._log_kernel(back, times, aware.clip_dirs, aware.clip_starts))
    with pytest.raises(ValueError, match="clip_azimuths_deg"):
        ToyVideoPrior(ToyVideoConfig(**{**common, "clip_azimuths_deg": []}), data)
