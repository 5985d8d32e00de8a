"""Exports: camera paths, captions, depth colours, grid layout, atomic writes, meshes, the animated .glb,
training curves. Analytic toy scenes stand in for a trained field: their surfaces are known exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from fourdfy.config import RunConfig
from fourdfy.export import video
from fourdfy.export.curves import curves_callback, plot_curves, read_log, write_curves
from fourdfy.export.mesh import (
    EmptyMeshError,
    extract_mesh,
    extract_mesh_sequence,
    mesh_times,
    write_animated_glb,
    write_mesh_sequence,
)
from fourdfy.export.outputs import export_grid, export_meshes, export_videos, write_outputs
from fourdfy.export.video import (
    OutputFolderError,
    add_caption,
    colorize_depth,
    render_views_by_time,
    write_grid,
    write_video,
)
from fourdfy.render.cameras import cameras_from_spherical
from fourdfy.render.trajectories import fixed_view_path, orbit_path
from fourdfy.render.views import WHITE, render_views
from fourdfy.render.volume import Renderer, RendererConfig
from fourdfy.synthetic.scenes import SOLID_DENSITY, bouncing_ball, spinning_cube
from fourdfy.tracking import NullLogger

RENDERER = Renderer(RendererConfig(n_samples=24, radius=1.0))


def leftovers(folder: Path) -> list[str]:
    """Temporary files an export may have left behind (there must be none)."""
    return [p.name for p in folder.rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------- camera paths


def test_fixed_view_at_t1_equals_static_orbit_at_minus_90_degrees():
    # The spinning cube turns by +90° about z from t = 0 to t = 1 (and its plinth is square), so seeing
    # it at t = 1 from azimuth 0 is the same as seeing it at t = 0 from azimuth -90° = 270°, which is
    # frame 3 of a 4-frame static orbit: checks both paths' cameras and times.
    cams, times = fixed_view_path(3, azimuth=0.0)
    torch.testing.assert_close(times, torch.tensor([0.0, 0.5, 1.0]))
    fixed = render_views(spinning_cube, RENDERER, cams, times, 12, WHITE)["rgb"]
    static = render_views(spinning_cube, RENDERER, *orbit_path(4, time_advances=False), 12, WHITE)["rgb"]
    torch.testing.assert_close(fixed[2], static[3], atol=2e-3, rtol=0)
    assert (fixed[0] - fixed[2]).abs().max() > 0.1, "the fixed view must show the motion"
    _, orbit_times = orbit_path(5)
    torch.testing.assert_close(orbit_times, torch.linspace(0, 1, 5))


def test_views_by_time_cells_are_the_view_and_time_of_paper_fig1():
    grid = render_views_by_time(bouncing_ball, RENDERER, 3, 4, 10, WHITE)
    assert grid.shape == (3, 4, 10, 10, 3)
    # Row 2 is azimuth 240°, column 1 is t = 1/3: render that camera directly.
    cam = cameras_from_spherical(15.0, 240.0, 3.0, 40.0)
    direct = RENDERER.render(bouncing_ball, cam, torch.tensor([1 / 3]), 10, 10, background=WHITE, train=False)
    torch.testing.assert_close(grid[2, 1], direct["rgb"][0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- captions, depth, grid


def test_caption_band_sits_above_the_unchanged_enlarged_frames():
    frames = torch.rand(3, 16, 20, 3)
    out = add_caption(frames, "a red ball bouncing on a blue box")
    factor = math.ceil(video.CAPTION_MIN_WIDTH / 20)  # 13: 260 px wide
    assert out.dtype == np.uint8 and out.shape[0] == 3 and out.shape[2] == 20 * factor
    band = out.shape[1] - 16 * factor
    assert band > 0
    expected = video._to_uint8(frames).repeat(factor, axis=1).repeat(factor, axis=2)
    np.testing.assert_array_equal(out[:, band:], expected)
    text = out[0, :band]
    assert (text < 100).any(), "the prompt must be drawn (dark pixels)"
    assert (text == 255).all(axis=-1).mean() > 0.7, "on a white band"
    np.testing.assert_array_equal(out[0, :band], out[2, :band])  # the same caption on every frame
    # Wide frames are not enlarged; a long prompt wraps into more lines (a taller band).
    wide = add_caption(torch.rand(1, 8, 300, 3), "word " * 40)
    assert wide.shape[2] == 300 and wide.shape[1] - 8 > band


def test_colorize_depth_maps_near_to_the_top_and_far_to_the_bottom_of_the_colour_map():
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    depth = torch.tensor([[2.0, 4.0, 3.0, 3.0]])
    opacity = torch.tensor([[1.0, 1.0, 0.0, 0.5]])
    out = colorize_depth(depth, opacity, near=2.0, far=4.0, colormap="viridis", background=(1.0, 1.0, 1.0))
    torch.testing.assert_close(out[0, 0], torch.tensor(cmap(1.0)[:3]).float())
    torch.testing.assert_close(out[0, 1], torch.tensor(cmap(0.0)[:3]).float())
    torch.testing.assert_close(out[0, 2], torch.ones(3))  # empty space shows the background
    torch.testing.assert_close(out[0, 3], 0.5 * torch.tensor(cmap(0.5)[:3]).float() + 0.5)
    with pytest.raises(ValueError, match="colour map"):
        colorize_depth(depth, opacity, 2.0, 4.0, colormap="no_such_map")
    with pytest.raises(ValueError, match="far must be > near"):
        colorize_depth(depth, opacity, 4.0, 2.0)


def test_grid_png_places_view_v_time_t_in_row_v_column_t(tmp_path):
    grid = torch.rand(2, 3, 5, 4, 3)
    path = write_grid(grid, tmp_path / "grid.png", pad=2)
    image = iio.imread(path)
    assert image.shape == (2 * 7 + 2, 3 * 6 + 2, 3)
    y, x = 2 + 1 * 7, 2 + 2 * 6  # row 1, column 2
    np.testing.assert_array_equal(image[y : y + 5, x : x + 4], video._to_uint8(grid[1, 2]))
    assert (image[0:2] == 255).all(), "white gutter"
    captioned = iio.imread(write_grid(grid, tmp_path / "grid_c.png", pad=2, caption="a prompt"))
    factor = math.ceil(video.CAPTION_MIN_WIDTH / image.shape[1])
    band = captioned.shape[0] - image.shape[0] * factor
    np.testing.assert_array_equal(captioned[band::factor, ::factor], image)


# ---------------------------------------------------------------- video files


def test_mp4_and_gif_keep_frame_count_size_rate_and_colours(tmp_path):
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    frames = colours[:, None, None, :].expand(4, 18, 18, 3).contiguous()
    mp4 = write_video(frames, tmp_path / "v.mp4", fps=12)
    decoded = iio.imread(mp4)
    assert decoded.shape == (4, 18, 18, 3)
    assert iio.immeta(mp4)["fps"] == pytest.approx(12)
    np.testing.assert_allclose(decoded.reshape(4, -1, 3).mean(1), colours.numpy() * 255, atol=12)
    gif = iio.imread(write_video(frames, tmp_path / "v.gif", fps=10))
    np.testing.assert_array_equal(gif, video._to_uint8(frames))  # 4 colours: the palette is exact
    # Odd sizes (libx264 needs even ones) are padded with white, not refused or cropped.
    odd = iio.imread(write_video(frames[:, :17, :15], tmp_path / "odd.mp4", fps=12))
    assert odd.shape == (4, 18, 16, 3)
    with pytest.raises(ValueError, match=r"\.mp4 or \.gif"):
        write_video(frames, tmp_path / "v.avi")
    with pytest.raises(ValueError, match="fps"):
        write_video(frames, tmp_path / "v.mp4", fps=0)


def test_interrupted_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    frames = torch.rand(2, 8, 8, 3)
    path = write_video(frames, tmp_path / "orbit.gif", fps=5)
    before = path.read_bytes()

    def truncated_write(target, *args, **kwargs):
        Path(target).write_bytes(b"GIF89a half a file")
        raise KeyboardInterrupt  # as if the export were killed mid-write

    monkeypatch.setattr(video.iio, "imwrite", truncated_write)
    with pytest.raises(KeyboardInterrupt):
        write_video(torch.rand(2, 8, 8, 3), path, fps=5)
    assert path.read_bytes() == before
    with pytest.raises(KeyboardInterrupt):
        write_video(frames, tmp_path / "new.mp4", fps=5)
    assert not (tmp_path / "new.mp4").exists()
    assert leftovers(tmp_path) == []


def test_unwritable_output_folder_is_reported_with_its_name(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputFolderError, match=r"a_file/renders is not writable"):
        write_video(torch.rand(1, 8, 8, 3), blocker / "renders" / "orbit.mp4")
    with pytest.raises(OutputFolderError, match="not writable"):
        write_animated_glb([extract_mesh(spinning_cube, 0.0, 12, 30.0, 1.0)], blocker / "mesh.glb", fps=8)


def test_export_videos_writes_every_video_and_keeps_orbit_mp4_caption_free(tmp_path):
    cfg = RunConfig(prompt="a yellow cube spinning")
    ev = cfg.eval
    ev.video_frames, ev.extra_video_frames, ev.video_size, ev.n_samples, ev.fps = 4, 3, 12, 16, 10
    cfg.renderer.radius = 1.0
    written = export_videos(cfg, spinning_cube, tmp_path)
    assert sorted(written) == ["depth", "fixed_view", "orbit", "orbit_captioned", "orbit_gif", "static_orbit"]
    orbit = iio.imread(written["orbit"])
    assert orbit.shape == (4, 12, 12, 3), "orbit.mp4 is the CLIP/user-study input: no caption band"
    captioned = iio.imread(written["orbit_captioned"])
    assert captioned.shape[0] == 4 and captioned.shape[2] == 12 * math.ceil(video.CAPTION_MIN_WIDTH / 12)
    assert iio.imread(written["static_orbit"]).shape[0] == 3
    assert iio.imread(written["fixed_view"]).shape[0] == 3
    assert iio.imread(written["depth"]).shape == captioned.shape
    assert leftovers(tmp_path) == []
    grid = iio.imread(export_grid(cfg, spinning_cube, tmp_path))
    assert grid.shape[1] >= video.CAPTION_MIN_WIDTH


# ---------------------------------------------------------------- meshes


def test_spinning_cube_mesh_has_the_known_box_volume_and_face_colour():
    # Cube half-size 0.35 centred at z = 0.1 on a plinth of half-size (0.25, 0.25, 0.15) at z = -0.4: the
    # surface (density SOLID_DENSITY/2, sdf = 0) spans x, y in [-0.35, 0.35], z in [-0.55, 0.45].
    resolution = 64
    voxel = 2.0 / (resolution - 1)
    for t in (0.0, 1.0):  # a quarter turn later the square box has the same bounds
        mesh = extract_mesh(spinning_cube, t, resolution, SOLID_DENSITY / 2, box_radius=1.0)
        np.testing.assert_allclose(mesh.vertices.min(0), [-0.35, -0.35, -0.55], atol=voxel)
        np.testing.assert_allclose(mesh.vertices.max(0), [0.35, 0.35, 0.45], atol=voxel)
    half_turn = extract_mesh(spinning_cube, 0.5, resolution, SOLID_DENSITY / 2, box_radius=1.0)
    # At t = 0.5 the cube has turned 45°: its vertical edges reach 0.35·√2 = 0.495 along x.
    assert half_turn.vertices[:, 0].max() == pytest.approx(0.35 * math.sqrt(2), abs=2 * voxel)
    trimesh = pytest.importorskip("trimesh")
    solid = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    assert solid.is_watertight
    # Volume 0.7³ + 0.5·0.5·0.3 = 0.418; positive means the triangles face outwards.
    assert solid.volume == pytest.approx(0.7**3 + 0.5 * 0.5 * 0.3, rel=0.03)
    top = (mesh.vertices[:, 2] > 0.44) & (np.abs(mesh.vertices[:, :2]).max(1) < 0.25)
    assert top.sum() > 10
    np.testing.assert_allclose(mesh.colors[top], np.tile([[242, 191, 76]], (top.sum(), 1)), atol=1)  # +z face


def test_threshold_above_the_density_is_an_empty_mesh_error_and_writes_nothing(tmp_path):
    with pytest.raises(EmptyMeshError, match=r"peaks at .*below the mesh threshold 100"):
        extract_mesh_sequence(spinning_cube, 2, 16, 100.0, 1.0)
    cfg = RunConfig()
    cfg.eval.mesh_threshold, cfg.eval.mesh_resolution, cfg.eval.mesh_frames = 1e4, 16, 2
    with pytest.raises(EmptyMeshError, match="nothing was written"):
        export_meshes(cfg, bouncing_ball, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").rglob("*")) == []
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="threshold must be a finite density > 0"):
            extract_mesh(spinning_cube, 0.0, 16, bad, 1.0)
    with pytest.raises(ValueError, match="resolution must be an int >= 2"):
        extract_mesh(spinning_cube, 0.0, 1, 30.0, 1.0)
    with pytest.raises(ValueError, match="positive int"):
        mesh_times(0)
    cfg.eval.mesh_threshold, cfg.eval.mesh_formats = 30.0, ["stl"]
    with pytest.raises(ValueError, match=r"eval.mesh_formats.*got \['stl'\]"):
        export_meshes(cfg, bouncing_ball, tmp_path / "out")
    cfg.eval.mesh_formats, cfg.eval.mesh_fps = ["ply"], 0.0
    with pytest.raises(ValueError, match="eval.mesh_fps"):
        export_meshes(cfg, bouncing_ball, tmp_path / "out", sequence=False)


def test_animated_glb_reloads_with_one_frame_per_mesh_step_keys_and_the_ply_vertices(tmp_path):
    pygltflib = pytest.importorskip("pygltflib")
    trimesh = pytest.importorskip("trimesh")
    n_frames, fps = 3, 4.0
    meshes = extract_mesh_sequence(bouncing_ball, n_frames, 24, SOLID_DENSITY / 2, box_radius=1.0)
    assert [m.time for m in meshes] == [0.0, 0.5, 1.0]
    plys = write_mesh_sequence(meshes, tmp_path / "mesh", ("ply", "obj"), threshold=30.0)
    glb = write_animated_glb(meshes, tmp_path / "mesh.glb", fps=fps)
    assert [p.name for p in plys] == [f"frame_{k:03d}.{f}" for f in ("ply", "obj") for k in range(3)]
    index = json.loads((tmp_path / "mesh" / "frames.json").read_text())
    assert index["times"] == [0.0, 0.5, 1.0] and index["threshold"] == 30.0

    gltf = pygltflib.GLTF2().load(str(glb))
    blob = gltf.binary_blob()

    def read(accessor_index: int) -> np.ndarray:
        acc = gltf.accessors[accessor_index]
        view = gltf.bufferViews[acc.bufferView]
        dtype = {pygltflib.FLOAT: np.float32, pygltflib.UNSIGNED_INT: np.uint32}[acc.componentType]
        width = {"SCALAR": 1, "VEC3": 3}[acc.type]
        start = view.byteOffset + acc.byteOffset
        return np.frombuffer(blob, dtype, acc.count * width, start).reshape(acc.count, width)

    root = gltf.nodes[gltf.scenes[gltf.scene].nodes[0]]
    frames = [gltf.nodes[i] for i in root.children]
    assert len(frames) == n_frames
    np.testing.assert_allclose(root.rotation, [-math.sqrt(0.5), 0, 0, math.sqrt(0.5)])  # z-up -> y-up
    (animation,) = gltf.animations
    assert len(animation.channels) == n_frames
    for k, node in enumerate(frames):
        ply = trimesh.load(tmp_path / "mesh" / f"frame_{k:03d}.ply", process=False)
        primitive = gltf.meshes[node.mesh].primitives[0]
        positions = read(primitive.attributes.POSITION)
        assert len(positions) == len(ply.vertices) == len(meshes[k].vertices)
        np.testing.assert_allclose(positions, ply.vertices, atol=1e-6)
        np.testing.assert_allclose(read(primitive.attributes.COLOR_0) * 255, ply.visual.vertex_colors[:, :3],
                                   atol=1e-3)
        np.testing.assert_array_equal(read(primitive.indices).reshape(-1, 3), ply.faces)
        obj = trimesh.load(tmp_path / "mesh" / f"frame_{k:03d}.obj", process=False)
        assert len(obj.vertices) == len(ply.vertices)
        channel = next(c for c in animation.channels if c.target.node == root.children[k])
        sampler = animation.samplers[channel.sampler]
        assert channel.target.path == "scale" and sampler.interpolation == "STEP"
        np.testing.assert_allclose(read(sampler.input)[:, 0], np.arange(n_frames + 1) / fps)
        visible = read(sampler.output)[:, 0]
        # Frame k shows from key k to key k+1; the closing key keeps the last frame shown.
        expected = [float(j == k or (j == n_frames and k == n_frames - 1)) for j in range(n_frames + 1)]
        np.testing.assert_array_equal(visible, expected)
    # The ball moves: frames differ.
    assert not np.allclose(meshes[0].vertices.mean(0), meshes[2].vertices.mean(0), atol=0.05)
    # A shorter export removes the now stale frame files of the same format.
    write_mesh_sequence(meshes[:2], tmp_path / "mesh", ("ply",))
    assert not (tmp_path / "mesh" / "frame_002.ply").exists()
    assert (tmp_path / "mesh" / "frame_002.obj").exists()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- curves


def test_log_parsing_keeps_the_last_duplicate_and_skips_a_cut_line(tmp_path):
    lines = [
        {"iteration": 0, "stage": 1, "kind": "3d", "loss": 4.0, "loss/guidance": 3.0, "lr/static": 0.01},
        {"iteration": 10, "stage": 2, "kind": "img", "loss": 3.0, "loss/guidance": 2.0, "lr/static": 0.01},
        {"iteration": 20, "stage": 3, "kind": "vid", "loss": "nan", "loss/guidance": 1.0, "lr/static": 1e-4},
        # resumed from iteration 10: iterations 10 and 20 are logged again, and win
        {"iteration": 10, "stage": 2, "kind": "img", "loss": 2.5, "loss/guidance": 1.5, "lr/static": 0.01},
        {"iteration": 20, "stage": 3, "kind": "vid", "loss": 1.5, "loss/guidance": 1.0, "lr/static": 1e-4,
         "loss/sparsity": 0.5},
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"iteration": 30, "sta')
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        curves = read_log(path)
    assert curves.iterations == [0, 10, 20] and curves.stages == [1, 2, 3]
    assert curves.kinds == ["3d", "img", "vid"] and curves.loss == [4.0, 2.5, 1.5]
    assert curves.components["guidance"] == [3.0, 1.5, 1.0]
    assert math.isnan(curves.components["sparsity"][0]) and curves.components["sparsity"][2] == 0.5
    assert curves.lrs == {"static": [0.01, 0.01, 1e-4]}
    assert curves.loss_by_kind() == {"3d": ([0], [4.0]), "img": ([10], [2.5]), "vid": ([20], [1.5])}
    nan_line = tmp_path / "nan.jsonl"
    nan_line.write_text(json.dumps(lines[2]) + "\n")
    assert math.isnan(read_log(nan_line).loss[0])  # "nan" strings are read as NaN, not refused
    png = plot_curves(curves, tmp_path / "curves.png", title="a prompt")
    assert iio.imread(png).shape[:2] == (800, 700)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no logged iteration"):
        plot_curves(read_log(tmp_path / "empty.jsonl"), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(FileNotFoundError, match="no training log"):
        read_log(tmp_path / "missing.jsonl")
    with pytest.warns(UserWarning, match="unreadable"):  # exact stage starts from the schedule's lengths
        assert write_curves(tmp_path, stage_lengths=[5, 10, 10]) == tmp_path / "renders" / "curves.png"
    assert leftovers(tmp_path) == []


def test_curves_callback_redraws_every_n_iterations(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps({"iteration": 0, "stage": 1, "kind": "3d", "loss": 1.0}))
    trainer = SimpleNamespace(run_dir=tmp_path)
    callback = curves_callback(every=5)
    png = tmp_path / "renders" / "curves.png"
    callback(trainer, 3)  # the 4th iteration: not yet
    assert not png.exists()
    callback(trainer, 4)  # the 5th
    assert png.exists()
    with pytest.raises(ValueError, match="positive int"):
        curves_callback(every=0)


class SceneModule(torch.nn.Module):
    """A toy scene behind the nn.Module interface write_outputs expects of a trained field."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return spinning_cube(x, t)


def test_write_outputs_meshes_on_finish_and_survives_an_empty_mesh(tmp_path):
    cfg = RunConfig(prompt="a yellow cube spinning")
    cfg.guidance.backend = "real"  # skips the toy-world metrics (rendering them is not under test here)
    ev = cfg.eval
    ev.video_frames, ev.extra_video_frames, ev.video_size, ev.n_samples = 2, 2, 8, 8
    ev.grid_views, ev.grid_times = 1, 2
    ev.mesh_on_finish, ev.mesh_resolution, ev.mesh_frames, ev.mesh_threshold = True, 12, 2, SOLID_DENSITY / 2
    (tmp_path / "log.jsonl").write_text(json.dumps({"iteration": 0, "stage": 1, "kind": "3d", "loss": 1.0}))
    assert write_outputs(cfg, SceneModule(), tmp_path, NullLogger(), step=0) == {}
    renders = tmp_path / "renders"
    assert {"orbit.mp4", "grid.png", "curves.png", "mesh.glb"} <= {p.name for p in renders.iterdir()}
    assert len(list((renders / "mesh").glob("frame_*.ply"))) == 2
    ev.mesh_threshold = 10 * SOLID_DENSITY  # empty: warned about, the finished run is not failed
    (renders / "mesh.glb").unlink()
    with pytest.warns(UserWarning, match="meshes not written"):
        write_outputs(cfg, SceneModule(), tmp_path, NullLogger(), step=0)
    assert not (renders / "mesh.glb").exists()
