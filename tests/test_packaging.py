"""A non-editable install: the wheel holds the config tree and the user-study templates, and its entry points
train (the toy world) and build a study site without the repository.

The wheel is built without dependencies and installed with ``pip install --target`` into a folder; the test's
interpreter (whose environment has the dependencies) runs it from a folder outside the checkout, with only that
folder on PYTHONPATH, so nothing can be imported from the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_an_installed_wheel_trains_the_toy_world_and_builds_a_study(tmp_path: Path) -> None:
    dist, target, work = tmp_path / "dist", tmp_path / "site-packages", tmp_path / "work"
    work.mkdir()
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                  str(REPO)], tmp_path, dict(os.environ))
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("fourdfy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fourdfy/conf/config.yaml" in names and "fourdfy/conf/preset/smoke.yaml" in names
    assert "userstudy/templates/comparison.html" in names
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                      str(wheel)], tmp_path, dict(os.environ))
    assert installed.returncode == 0, installed.stderr[-3000:]

    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1"}
    probe = _run([sys.executable, "-c", "import fourdfy, userstudy; print(fourdfy.__file__, userstudy.__file__)"],
                 work, env)
    assert probe.returncode == 0 and str(REPO) not in probe.stdout and str(target) in probe.stdout, probe.stdout

    # `fourdfy-run` is fourdfy.main:main (pyproject's console script); -c calls it as the script would.
    trained = _run([sys.executable, "-c", "import sys; from fourdfy.main import main; sys.exit(main())",
                    "preset=smoke"], work, env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_dir,) = (work / "outputs" / "smoke" / "full").glob("*/default/seed0")
    assert (run_dir / "DONE").is_file() and (run_dir / "renders" / "orbit.mp4").is_file()

    videos = work / "baseline"
    videos.mkdir()
    (videos / "a_red_ball_bouncing_on_a_blue_box.mp4").write_bytes((run_dir / "renders" / "orbit.mp4").read_bytes())
    site = _run([sys.executable, "-m", "userstudy.build", "--ours", str(run_dir.parents[2]), "--baseline",
                 str(videos), "--out", str(work / "site")], work, env)
    assert site.returncode == 0, site.stderr[-3000:]
    assert (work / "site" / "index.html").is_file()
