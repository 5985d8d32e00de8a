"""`fourdfy export RUN_DIR`: re-exports from the last checkpoint of a real (smoke-sized) run, bad input.

One smoke run (Hydra-composed `preset=smoke`, trained by fourdfy.api.generate) is shared by the module;
the tests depend on its files, never on how well the toy world trained.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from eval import gt_metrics
from fourdfy.api import generate
from fourdfy.build import load_run
from fourdfy.cli import main
from fourdfy.config import compose_run_config
from fourdfy.export.mesh import density_grid, mesh_times

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = compose_run_config(["preset=smoke"])
    path = tmp_path_factory.mktemp("smoke_run")
    generate(cfg, path)
    return path


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp-" in p.name]


def test_a_finished_run_leaves_videos_grid_and_curves(run_dir):
    cfg, _, _, _ = load_run(run_dir)
    renders = run_dir / "renders"
    names = {p.name for p in renders.iterdir()}
    assert {"orbit.mp4", "orbit_captioned.mp4", "orbit.gif", "static_orbit.mp4", "fixed_view.mp4",
            "depth.mp4", "grid.png", "curves.png"} <= names
    assert "mesh.glb" not in names, "meshes are off at the end of a run by default (eval.mesh_on_finish)"
    ev = cfg.eval
    assert iio.imread(renders / "orbit.mp4").shape == (ev.video_frames, ev.video_size, ev.video_size, 3)
    assert iio.imread(renders / "static_orbit.mp4").shape[0] == ev.extra_video_frames
    assert leftovers(run_dir) == []


def test_export_rerenders_the_final_outputs_from_the_checkpoint_without_training(run_dir, tmp_path, capsys):
    before_ckpt, before_log = digest(run_dir / "checkpoints"), (run_dir / "log.jsonl").read_bytes()
    out = tmp_path / "out"
    assert main(["export", str(run_dir), "--video", "--grid", "--curves", "--out", str(out)]) == 0
    assert "at iteration 20" in capsys.readouterr().out  # smoke: stage lengths 6 + 6 + 8
    # The same field, camera paths and encoder as at the end of training: the same pictures.
    for name in ("orbit.mp4", "depth.mp4", "fixed_view.mp4", "grid.png"):
        np.testing.assert_allclose(iio.imread(out / name).astype(int), iio.imread(run_dir / "renders" / name),
                                   atol=2, err_msg=name)
    assert (out / "curves.png").exists() and not (out / "mesh.glb").exists()
    assert digest(run_dir / "checkpoints") == before_ckpt, "export must not train or checkpoint"
    assert (run_dir / "log.jsonl").read_bytes() == before_log
    assert leftovers(out) == []


def test_export_meshes_and_glb_from_the_checkpoint(run_dir, tmp_path):
    pygltflib = pytest.importorskip("pygltflib")
    trimesh = pytest.importorskip("trimesh")
    _, field, _, _ = load_run(run_dir)
    resolution, n_frames, fps = 20, 3, 5.0
    # A threshold that this field's density crosses at every meshed time, whatever the smoke run learnt.
    peaks = [float(density_grid(field, t, resolution, 1.0).max()) for t in mesh_times(n_frames)]
    threshold = 0.5 * min(peaks)
    out = tmp_path / "out"
    assert main(["export", str(run_dir), "--mesh", "--glb", "--out", str(out), "--threshold", str(threshold),
                 "--resolution", str(resolution), "--mesh-frames", str(n_frames), "--mesh-fps", str(fps),
                 "--format", "ply", "--format", "obj"]) == 0
    plys = sorted((out / "mesh").glob("frame_*.ply"))
    assert len(plys) == n_frames and len(list((out / "mesh").glob("frame_*.obj"))) == n_frames
    gltf = pygltflib.GLTF2().load(str(out / "mesh.glb"))
    root = gltf.nodes[gltf.scenes[gltf.scene].nodes[0]]
    assert len(root.children) == n_frames
    sampler = gltf.animations[0].samplers[0]
    acc = gltf.accessors[sampler.input]
    view = gltf.bufferViews[acc.bufferView]
    keys = np.frombuffer(gltf.binary_blob(), np.float32, acc.count, view.byteOffset + acc.byteOffset)
    np.testing.assert_allclose(keys, np.arange(n_frames + 1) / fps)
    for node_index, ply in zip(root.children, plys, strict=True):
        position = gltf.meshes[gltf.nodes[node_index].mesh].primitives[0].attributes.POSITION
        assert gltf.accessors[position].count == len(trimesh.load(ply, process=False).vertices)
    assert not (out / "orbit.mp4").exists(), "only the asked-for outputs"


def test_metrics_json_is_bit_for_bit_what_eval_gt_metrics_recomputes(run_dir, capsys):
    # One implementation (fourdfy/synthetic/metrics.py) at the run's eval settings: the numbers a run writes
    # when it ends and the numbers Table 2 recomputes from its last checkpoint are the same floats.
    saved = json.loads((run_dir / "metrics.json").read_text())
    recomputed = gt_metrics.run_metrics(run_dir)
    assert set(saved) == set(recomputed) | {"skipped_steps"}
    assert {"psnr", "ssim", "depth_error", "motion_error", "gt_error"} <= set(recomputed)

    def same(a: float, b: float) -> bool:
        return a == b or (math.isnan(a) and math.isnan(b))

    assert [k for k, v in recomputed.items() if not same(saved[k], v)] == []
    assert gt_metrics.main([str(run_dir), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [k for k, v in printed.items() if not same(saved[k], v)] == []


def test_bad_input_is_reported_in_one_clear_line(run_dir, tmp_path, capsys):
    def fails(args: list[str], message: str, status: int = 2) -> None:
        assert main(["export", *args]) == status
        err = capsys.readouterr().err
        assert err.startswith("fourdfy export: error:") and message in err, err
        assert err.count("\n") == 1, err

    fails([str(tmp_path / "nowhere")], "does not exist")
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(run_dir / "config.yaml", no_ckpt / "config.yaml")
    fails([str(no_ckpt), "--video"], "holds no valid checkpoint")
    assert sorted(p.name for p in no_ckpt.iterdir()) == ["config.yaml"], "a refused export creates nothing"
    out = tmp_path / "empty_mesh"
    fails([str(run_dir), "--mesh", "--glb", "--threshold", "1e9", "--resolution", "8", "--mesh-frames", "2",
           "--out", str(out)], "below the mesh threshold 1e+09", status=1)
    assert not out.exists(), "an empty mesh writes nothing"
    fails([str(run_dir), "--mesh", "--resolution", "1", "--out", str(out)], "resolution must be an int >= 2")
    fails([str(run_dir), "--glb", "--mesh-fps", "0", "--out", str(out)], "eval.mesh_fps")
    assert not out.exists(), "settings are checked before anything is written"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fails([str(run_dir), "--grid", "--out", str(blocker / "renders")], "is not writable", status=1)
    if not torch.cuda.is_available():
        fails([str(run_dir), "--grid", "--device", "cuda", "--out", str(out)], "--device cpu")
    assert not out.exists()


def test_export_of_a_folder_that_is_not_a_run_creates_nothing(tmp_path, capsys):
    """A mistyped RUN_DIR (an existing folder without config.yaml) is refused before renders/ is made."""
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    for args in ([], ["--curves"], ["--mesh", "--out", str(tmp_path / "meshes")]):
        assert main(["export", str(folder), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fourdfy export: error:") and err.count("\n") == 1, err
        assert "config.yaml" in err and "is not a fourdfy run directory" in err, err
    assert list(folder.iterdir()) == [] and not (tmp_path / "meshes").exists()


def test_console_script_entry_point(tmp_path):
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fourdfy"] == "fourdfy.cli:main"
    proc = subprocess.run([sys.executable, "-m", "fourdfy.cli", "export", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 2 and "is not a fourdfy run directory" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
