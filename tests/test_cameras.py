"""Cameras: look-at convention, MVDream's camera input (checked against MVDream's own numbers), sampling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from fourdfy.render.cameras import (
    Cameras,
    CameraSamplingConfig,
    cameras_from_spherical,
    look_at_c2w,
    mvdream_camera,
    sample_cameras,
    sample_video_camera,
)
from fourdfy.render.trajectories import orbit_cameras

pytestmark = pytest.mark.numerics  # floats against references: .ci/run reruns these on other SIMD kernels

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
MVDREAM_CAMERAS = TESTDATA / "mvdream" / "cameras.json"


@pytest.fixture(scope="module")
def mvdream_json() -> dict:
    if not MVDREAM_CAMERAS.exists():
        pytest.skip(f"shared testdata missing: {MVDREAM_CAMERAS} (clone shared/ beside the repo)")
    return json.loads(MVDREAM_CAMERAS.read_text())


# ---------------------------------------------------------------- look-at convention


def test_look_at_matches_the_convention_written_out_by_hand():
    # elevation 30°, azimuth 60°, distance 2: centre = 2·(cos30 cos60, cos30 sin60, sin30)
    # = (0.8660254, 1.5, 1.0). Columns: right = (-sin a, cos a, 0) = (-0.8660254, 0.5, 0);
    # back (= -forward = centre/|centre|) = (cos e cos a, cos e sin a, sin e) = (0.4330127, 0.75, 0.5);
    # up = back × right = (-sin e cos a, -sin e sin a, cos e) = (-0.25, -0.4330127, 0.8660254).
    c2w = look_at_c2w(30.0, 60.0, 2.0)[0].double()
    expected = torch.tensor(
        [
            [-0.8660254038, -0.25, 0.4330127019, 0.8660254038],
            [0.5, -0.4330127019, 0.75, 1.5],
            [0.0, 0.8660254038, 0.5, 1.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(c2w, expected, atol=1e-6, rtol=0)


def test_look_at_is_a_proper_rotation_looking_at_origin():
    elev = torch.tensor([0.0, 15.0, -40.0, 89.0, -89.0, 30.0])
    azim = torch.tensor([0.0, 90.0, 200.0, -170.0, 33.0, 359.0])
    dist = torch.tensor([1.0, 2.5, 3.0, 0.5, 4.0, 2.0])
    c2w = look_at_c2w(elev, azim, dist).double()
    rot = c2w[:, :3, :3]
    torch.testing.assert_close(
        rot.transpose(1, 2) @ rot, torch.eye(3, dtype=torch.float64).expand(6, 3, 3), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(6, dtype=torch.float64), atol=1e-6, rtol=0)
    centre = c2w[:, :3, 3]
    torch.testing.assert_close(centre.norm(dim=-1), dist.double(), atol=1e-6, rtol=0)
    # The camera looks along its local -z, i.e. world direction -c2w[:, :3, 2]; it must point at the origin.
    torch.testing.assert_close(-rot[:, :, 2], -centre / centre.norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)
    assert torch.all(rot[:, 2, 0].abs() < 1e-6), "right axis must be horizontal (world up is +z)"
    assert torch.all(rot[:, 2, 1] > 0), "camera up must have a positive world-z component"


@pytest.mark.parametrize("elevation", [90.0, -90.0, 95.0])
def test_look_at_rejects_the_poles(elevation):
    with pytest.raises(ValueError, match="elevation_deg"):
        look_at_c2w(elevation, 0.0, 2.0)


def test_look_at_rejects_non_positive_distance():
    with pytest.raises(ValueError, match="distance"):
        look_at_c2w(10.0, 0.0, 0.0)


# ---------------------------------------------------------------- MVDream camera (shared/testdata)


def _ours_as_mvdream(elevation: float, mvdream_azimuths: list[float], distance: float) -> torch.Tensor:
    # MVDream's get_camera(e, a) is our c2w at azimuth a - 90°, translation normalised
    # (shared/testdata/mvdream/cameras.json).
    azim = torch.tensor(mvdream_azimuths, dtype=torch.float64) - 90.0
    return mvdream_camera(look_at_c2w(elevation, azim, distance)).double()


@pytest.mark.parametrize("distance", [1.0, 2.7])
def test_mvdream_get_camera_entries(mvdream_json, distance):
    entries = mvdream_json["get_camera"]
    assert len(entries) >= 10
    # get_camera(blender_coord=False) stays in MVDream's Y-up OpenGL world: M_gl = flip_yz^-1 · M_blender.
    flip_yz_inv = torch.linalg.inv(torch.tensor(mvdream_json["flip_yz"], dtype=torch.float64))
    for entry in entries:
        call = entry["call"]
        n, start, span = call["num_frames"], call["azimuth_start"], call["azimuth_span"]
        # get_camera's azimuths: np.arange(start, span + start, span / n).
        azimuths = np.arange(start, span + start, span / n).tolist()
        assert azimuths == pytest.approx(entry["azimuths_deg"])
        ours = _ours_as_mvdream(call["elevation"], azimuths, distance)
        if not call["blender_coord"]:
            ours = (flip_yz_inv @ ours.reshape(-1, 4, 4)).reshape(-1, 16)
        expected = torch.tensor(entry["flat16"], dtype=torch.float64)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            ours.reshape(-1, 4, 4),
            torch.tensor(entry["matrices_4x4"], dtype=torch.float64),
            atol=1e-6,
            rtol=0,
        )


def test_mvdream_create_camera_to_world_entries(mvdream_json):
    flip_yz = torch.tensor(mvdream_json["flip_yz"], dtype=torch.float64)
    entries = mvdream_json["create_camera_to_world_matrix_opengl"]
    assert len(entries) >= 5
    for entry in entries:
        # Unit distance: MVDream's centres lie on the unit sphere.
        ours = look_at_c2w(entry["elevation"], entry["azimuth"] - 90.0, 1.0)[0].double()
        blender = torch.tensor(entry["blender_4x4"], dtype=torch.float64)
        torch.testing.assert_close(ours, blender, atol=1e-6, rtol=0)
        # The Y-up OpenGL matrix is the Blender one with the world change undone:
        # M_gl = flip_yz^-1 · M_blender.
        opengl = torch.tensor(entry["matrix_4x4"], dtype=torch.float64)
        torch.testing.assert_close(torch.linalg.inv(flip_yz) @ ours, opengl, atol=1e-6, rtol=0)


def test_mvdream_normalize_camera_entries(mvdream_json):
    for entry in mvdream_json["normalize_camera"]:
        inp = torch.tensor(entry["input_flat16"], dtype=torch.float64).reshape(-1, 4, 4)
        before = inp.clone()
        out = mvdream_camera(inp)
        torch.testing.assert_close(
            out, torch.tensor(entry["output_flat16"], dtype=torch.float64), atol=1e-6, rtol=0
        )
        assert torch.equal(inp, before), "mvdream_camera must not modify its input"


def test_mvdream_io_camera_entries(mvdream_json):
    io = mvdream_json["io_camera"]
    ours = torch.cat(
        [
            _ours_as_mvdream(
                c["elevation"],
                np.arange(
                    c["azimuth_start"],
                    c["azimuth_span"] + c["azimuth_start"],
                    c["azimuth_span"] / c["num_frames"],
                ).tolist(),
                3.0,
            )
            for c in io["calls"]
        ]
    )
    torch.testing.assert_close(
        ours, torch.tensor(io["values_flat16"], dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_orbit_cameras_give_mvdream_cameras_at_shifted_azimuth(mvdream_json):
    # orbit_cameras(4, elevation=15, azimuth_start=-90) = get_camera(4, 15, azimuth_start=0).
    cams = orbit_cameras(4, elevation=15.0, distance=3.0, azimuth_start=-90.0)
    expected = torch.tensor(mvdream_json["get_camera"][0]["flat16"], dtype=torch.float64)
    assert mvdream_json["get_camera"][0]["call"]["azimuth_start"] == 0
    torch.testing.assert_close(mvdream_camera(cams.c2w).double(), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- Cameras container


def test_cameras_indexing_cat_len_to():
    cams = orbit_cameras(6)
    assert len(cams) == 6
    one = cams[2]
    assert (
        len(one) == 1 and torch.equal(one.c2w[0], cams.c2w[2]) and one.azimuth.item() == pytest.approx(120.0)
    )
    assert len(cams[-1]) == 1 and cams[-1].azimuth.item() == pytest.approx(300.0)
    part = cams[1:4]
    assert len(part) == 3 and torch.equal(part.azimuth, cams.azimuth[1:4])
    picked = cams[torch.tensor([0, 5])]
    assert torch.equal(picked.distance, cams.distance[[0, 5]])
    joined = Cameras.cat([cams[:2], cams[2:]])
    for name in ("c2w", "fovy", "elevation", "azimuth", "distance"):
        assert torch.equal(getattr(joined, name), getattr(cams, name))
    moved = cams.to("cpu")
    assert moved.c2w.device.type == "cpu" and torch.equal(moved.c2w, cams.c2w)
    with pytest.raises(IndexError):
        cams[6]
    with pytest.raises(ValueError, match="fovy"):
        Cameras(
            c2w=cams.c2w,
            fovy=cams.fovy[:2],
            elevation=cams.elevation,
            azimuth=cams.azimuth,
            distance=cams.distance,
        )
    with pytest.raises(ValueError, match="empty"):
        Cameras.cat([])


def test_orbit_cameras_defaults_are_the_evaluation_camera():
    cams = orbit_cameras(8)
    torch.testing.assert_close(cams.azimuth, torch.arange(8, dtype=torch.float32) * 45.0)
    torch.testing.assert_close(cams.elevation, torch.full((8,), 15.0))
    torch.testing.assert_close(cams.distance, torch.full((8,), 3.0))
    torch.testing.assert_close(cams.fovy, torch.full((8,), math.radians(40.0)))
    # Centre of azimuth 90 camera: 3·(0, cos15°, sin15°).
    torch.testing.assert_close(
        cams.c2w[2, :3, 3],
        torch.tensor([0.0, 3 * math.cos(math.radians(15)), 3 * math.sin(math.radians(15))]),
        atol=1e-6,
        rtol=0,
    )
    part = orbit_cameras(3, azimuth_start=10.0, azimuth_span=90.0)
    torch.testing.assert_close(part.azimuth, torch.tensor([10.0, 40.0, 70.0]))


# ---------------------------------------------------------------- sampling config and sampling


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"elevation_range": (30.0, 0.0)}, "elevation_range"),
        ({"elevation_range": (0.0, 90.0)}, "elevation_range"),
        ({"elevation_range": (-90.0, 10.0)}, "elevation_range"),
        ({"azimuth_range": (10.0, -10.0)}, "azimuth_range"),
        ({"distance_range": (3.0, 2.5)}, "distance_range"),
        ({"distance_range": (0.0, 2.5)}, "distance_range"),
        ({"fovy_range": (0.0, 60.0)}, "fovy_range"),
        ({"fovy_range": (15.0, 180.0)}, "fovy_range"),
        ({"fovy_range": (60.0, 15.0)}, "fovy_range"),
        ({"sphere_uniform_fraction": 1.5}, "sphere_uniform_fraction"),
    ],
)
def test_sampling_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CameraSamplingConfig(**kwargs).validate()


def test_sampling_config_defaults_are_the_papers():
    cfg = CameraSamplingConfig()
    assert cfg.elevation_range == (0.0, 30.0)
    assert cfg.sphere_uniform_fraction == 0.5
    assert cfg.azimuth_range == (-180.0, 180.0)
    assert cfg.distance_range == (2.5, 3.0)
    assert cfg.fovy_range == (15.0, 60.0)


def test_sample_cameras_share_everything_but_azimuth():
    cfg = CameraSamplingConfig()
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        cams = sample_cameras(4, cfg, gen)
        assert len(cams) == 4
        for name in ("elevation", "distance", "fovy"):
            values = getattr(cams, name)
            assert torch.all(values == values[0]), name
        assert 0.0 <= cams.elevation[0] <= 30.0
        assert 2.5 <= cams.distance[0] <= 3.0
        assert math.radians(15) - 1e-6 <= cams.fovy[0] <= math.radians(60) + 1e-6
        assert torch.all((cams.azimuth >= -180.0) & (cams.azimuth < 180.0))
        torch.testing.assert_close(
            cams.azimuth[1:] - cams.azimuth[:-1], torch.full((3,), 90.0), atol=1e-4, rtol=0
        )
        # c2w really is the camera at those angles.
        torch.testing.assert_close(
            cams.c2w, look_at_c2w(cams.elevation, cams.azimuth, cams.distance), atol=1e-5, rtol=0
        )


def test_sample_cameras_draws_only_from_the_generator_and_reproduces():
    cfg = CameraSamplingConfig()
    global_state = torch.get_rng_state()
    a = sample_cameras(4, cfg, torch.Generator().manual_seed(11))
    b = sample_cameras(4, cfg, torch.Generator().manual_seed(11))
    c = sample_cameras(4, cfg, torch.Generator().manual_seed(12))
    assert torch.equal(torch.get_rng_state(), global_state), "sampling touched torch's global RNG"
    assert torch.equal(a.c2w, b.c2w) and torch.equal(a.fovy, b.fovy)
    assert not torch.equal(a.c2w, c.c2w)
    # Exactly 5 numbers are drawn per call: the stream position after a call is known (resume relies on it).
    gen = torch.Generator().manual_seed(5)
    sample_cameras(4, cfg, gen)
    ref = torch.Generator().manual_seed(5)
    torch.rand(5, generator=ref, dtype=torch.float64)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=ref))


def test_sample_video_camera_is_one_camera_repeated():
    cfg = CameraSamplingConfig()
    video = sample_video_camera(16, cfg, torch.Generator().manual_seed(7))
    single = sample_cameras(1, cfg, torch.Generator().manual_seed(7))
    assert len(video) == 16
    assert torch.equal(video.c2w, single.c2w.expand(16, 4, 4))
    assert torch.equal(video.azimuth, single.azimuth.expand(16))


def _elevation_samples(cfg: CameraSamplingConfig, n: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return np.array([sample_cameras(1, cfg, gen).elevation.item() for _ in range(n)])


@pytest.mark.parametrize("as_in_code", [True, False])
def test_elevation_distribution_is_the_half_degree_half_sphere_mixture(as_in_code):
    cfg = CameraSamplingConfig(sphere_range_as_in_code=as_in_code)
    samples = _elevation_samples(cfg, 3000, seed=0)
    # sin(e) bounds of the sphere-uniform half: threestudio maps degrees linearly, [0/90, 30/90];
    # the exact version uses [sin 0°, sin 30°] = [0, 0.5].
    s0, s1 = (0.0, 1.0 / 3.0) if as_in_code else (0.0, 0.5)

    def mixture_cdf(e_deg: np.ndarray) -> np.ndarray:
        uniform_deg = np.clip(e_deg / 30.0, 0.0, 1.0)
        uniform_sin = np.clip((np.sin(np.radians(e_deg)) - s0) / (s1 - s0), 0.0, 1.0)
        return 0.5 * uniform_deg + 0.5 * uniform_sin

    result = stats.kstest(samples, mixture_cdf)
    assert result.pvalue > 1e-3, result
    # Against the other variant the test must fail: it can tell the two apart.
    s0, s1 = (0.0, 0.5) if as_in_code else (0.0, 1.0 / 3.0)
    assert stats.kstest(samples, mixture_cdf).pvalue < 1e-6


def test_azimuth_offset_is_uniform():
    gen = torch.Generator().manual_seed(1)
    cfg = CameraSamplingConfig()
    first = np.array([sample_cameras(4, cfg, gen).azimuth[0].item() for _ in range(1500)])
    # With 4 views spread over 360°, the first view's azimuth is uniform on [-180, -90).
    assert stats.kstest(first, stats.uniform(loc=-180.0, scale=90.0).cdf).pvalue > 1e-3


def test_cameras_from_spherical_rejects_bad_fov():
    with pytest.raises(ValueError, match="fovy_deg"):
        cameras_from_spherical(10.0, 0.0, 2.0, 180.0)
