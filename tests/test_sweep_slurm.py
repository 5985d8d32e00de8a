"""Sweeps on the local SLURM cluster (scripts/slurm_local.sh) through hydra-submitit-launcher.

- The Table-2 sweep: `python run.py -m variant=<6 rows> prompts=toy2 hydra/launcher=slurm ...` on the toy world
  with a very short schedule: 12 jobs as one SLURM array; then `python -m ablations.collect` reads it back.
- A hyperparameter sweep (issue #14): `schedule.p_3d=0.3,0.7 seed=0,1` gives 4 directories, one per
  configuration; launching the identical sweep again trains nothing and exits 0.
- sbatch's error for a partition that does not exist reaches the user.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from ablations.table2 import VARIANTS, sweep_overrides

REPO = Path(__file__).resolve().parents[1]
TOY2 = ("a red ball bouncing on a blue box", "a yellow cube spinning")
BALL = "a_red_ball_bouncing_on_a_blue_box"
# The tag of the Table-2 test's runs: the settings its command line changes from preset=smoke (fourdfy/identity.py;
# trainer.log_every is resume-safe, so it is not part of it).
TABLE2_TAG = "schedule.stage_lengths=[2,2,2],trainer.checkpoint_every=2"
# Generous: 12 jobs on 2 shared CPUs (each job imports torch/diffusers and renders the toy data sets).
SWEEP_TIMEOUT_S = 1500


def _env() -> dict[str, str]:
    # OMP_NUM_THREADS=1: one thread per job, so two array tasks share the node's 2 CPUs without oversubscribing.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _kinds(run_dir: Path) -> list[tuple[int, int, str]]:
    """(iteration, stage, update kind) of every logged iteration (trainer.log_every=1)."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [(r["iteration"], r["stage"], r["kind"]) for r in map(json.loads, lines)]


@pytest.mark.slurm
@pytest.mark.slow
def test_toy_table2_sweep_on_slurm_is_collected(slurm_cluster: str, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    args = sweep_overrides("toy2", slurm=True, extra=[
        "preset=smoke", f"hydra.sweep.dir={sweep_dir}",
        "schedule.stage_lengths=[2,2,2]", "trainer.checkpoint_every=2", "trainer.log_every=1",
        "hydra.launcher.timeout_min=20", "hydra.launcher.mem_gb=2", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.array_parallelism=2",
    ])
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"

    run_dirs = sorted(p.parent for p in sweep_dir.glob("smoke/*/*/*/seed0/DONE"))  # the tag holds [ ]: no glob
    assert len(run_dirs) == 12 and {d.parent.name for d in run_dirs} == {TABLE2_TAG}, run_dirs
    # One SLURM array of 12 tasks (hydra-submitit-launcher sets hydra.job.id to submitit's job id).
    ids = [str(OmegaConf.load(d / ".hydra" / "hydra.yaml").hydra.job.id) for d in run_dirs]
    assert len({i.split("_")[0] for i in ids}) == 1 and sorted(int(i.split("_")[1]) for i in ids) == list(range(12))

    # Each job ran its variant: the update kinds its schedule allows (paper §4.3), read from the training log.
    for variant in VARIANTS:
        for prompt_dir in (sweep_dir / "smoke" / variant).iterdir():
            kinds = _kinds(prompt_dir / TABLE2_TAG / "seed0")
            config = OmegaConf.load(prompt_dir / TABLE2_TAG / "seed0" / "config.yaml")
            # no_image_guidance is stage 3 alone, for stage 3's length (paper §4.3: it skips stages 1-2)
            assert len(kinds) == (2 if variant == "no_image_guidance" else 6) and config.variant.name == variant
            if variant == "no_image_guidance":
                assert {(s, k) for _, s, k in kinds} == {(3, "vid")}
            if variant == "no_3d":
                assert "3d" not in {k for _, _, k in kinds}
            if variant == "no_vsd":
                assert "img" not in {k for _, _, k in kinds}
            if variant == "no_hybrid":
                assert {k for _, s, k in kinds if s == 3} == {"vid"}
            if variant in ("full", "no_vsd", "no_hybrid", "hexplane"):
                assert {k for _, s, k in kinds if s == 1} == {"3d"}
            if variant == "hexplane":
                assert config.field.kind == "hexplane"

    proc = subprocess.run([sys.executable, "-m", "ablations.collect", str(sweep_dir)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "12 runs: 12 finished, 0 failed, 0 unfinished, 0 missing" in proc.stdout
    table = pd.read_csv(sweep_dir / "table2.csv")
    assert list(table["variant"]) == list(VARIANTS)
    assert (table["expected"] == 2).all() and (table["finished"] == 2).all()
    runs = pd.read_csv(sweep_dir / "runs.csv")
    assert sorted(runs["prompt"].unique()) == sorted(TOY2) and (runs["status"] == "finished").all()
    for key in ("psnr", "ssim", "depth_error", "motion_error"):
        assert table[key].notna().all(), key
        means = runs.groupby("variant")[key].mean()
        for _, row in table.iterrows():
            assert row[key] == pytest.approx(means[row["variant"]], rel=1e-9)
    # The values come from (and were saved to) each run's metrics.json.
    for _, run in runs.iterrows():
        saved = json.loads((Path(run["path"]) / "metrics.json").read_text())["eval"]["gt"]["values"]
        assert saved["psnr"] == pytest.approx(run["psnr"], rel=1e-12)
    for name in ("table2.md", "table2.tex", "table2.png"):
        assert (sweep_dir / name).stat().st_size > 0


@pytest.mark.slurm
@pytest.mark.slow
def test_a_hyperparameter_sweep_gets_one_directory_per_config_and_a_relaunch_trains_nothing(
        slurm_cluster: str, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "outputs"
    command = [sys.executable, str(REPO / "run.py"), "-m", "preset=smoke", "schedule.p_3d=0.3,0.7", "seed=0,1",
               "hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.timeout_min=20",
               "hydra.launcher.mem_gb=2", "hydra.launcher.array_parallelism=2"]
    proc = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=SWEEP_TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    done = sorted(p.parent.relative_to(sweep_dir).as_posix() for p in sweep_dir.rglob("DONE"))
    assert done == [f"smoke/full/{BALL}/schedule.p_3d={p}/seed{s}" for p in (0.3, 0.7) for s in (0, 1)]
    for run in done:
        cfg = OmegaConf.load(sweep_dir / run / "config.yaml")
        assert f"schedule.p_3d={cfg.schedule.p_3d}/seed{cfg.seed}" in run  # each job in its own directory
    stamps = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("ckpt_*.pt")}
    logs = {p: p.read_text() for p in sweep_dir.rglob("log.jsonl")}
    first_jobs = set((sweep_dir / ".submitit").iterdir())

    again = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=SWEEP_TIMEOUT_S, check=False)
    assert again.returncode == 0, again.stderr[-5000:]
    new_jobs = set((sweep_dir / ".submitit").iterdir()) - first_jobs
    job_logs = [log.read_text() for job in new_jobs for log in job.glob("*_log.out")]
    assert len(job_logs) == 4, sorted(str(job) for job in new_jobs)  # 4 jobs ran again ...
    assert all("already finished (DONE exists); nothing to do" in log for log in job_logs), job_logs  # ... to say so
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("ckpt_*.pt")} == stamps
    assert {p: p.read_text() for p in sweep_dir.rglob("log.jsonl")} == logs


@pytest.mark.slurm
def test_unknown_partition_fails_with_sbatch_error(slurm_cluster: str, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    proc = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "-m", "preset=smoke", "prompts=toy2", "hydra/launcher=slurm",
         "hydra.launcher.partition=no_such_partition", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert re.search(r"sbatch: error: .*invalid partition", proc.stderr, re.I), proc.stderr[-3000:]
    assert not list(sweep_dir.rglob(".hydra"))  # nothing ran
