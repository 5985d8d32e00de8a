"""run.py end to end, locally: run directories that never collide (issue #14).

- A new configuration after a finished run trains in its own directory (it used to print "already finished").
- Two processes started at once on one run: one trains, the other exits non-zero within seconds naming the
  holder; after the holder is SIGKILLed, a new launch resumes.
- A branching sweep of the stage-3 `guidance.synthetic.video.loss_weight` over 3 values from one stage-2
  checkpoint trains only stage-3 iterations per branch; the branch with the source's own value ends bitwise
  equal to the source; launched again it trains nothing; `ablations.collect` prints one row per value.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.runs import flatten_state

REPO = Path(__file__).resolve().parents[1]
BALL = "a_red_ball_bouncing_on_a_blue_box"
SMOKE = ["preset=smoke", "trainer.log_every=1"]  # stages 6 / 6 / 8: the end of stage 2 is iteration 12
STAGE2_END, TOTAL = 12, 20
TIMEOUT_S = 600


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _run_py(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S, check=False)


def _logged(run_dir: Path) -> list[tuple[int, int]]:
    return [(r["iteration"], r["stage"]) for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]


def _final_state(run_dir: Path) -> dict:
    path = run_dir / "checkpoints" / f"ckpt_{TOTAL:09d}.pt"
    return dict(flatten_state(torch.load(path, map_location="cpu", weights_only=False)))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished smoke run, launched as the README says: `python run.py preset=smoke` (from its folder)."""
    cwd = tmp_path_factory.mktemp("source")
    proc = _run_py(SMOKE, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = cwd / "outputs" / "smoke" / "full" / BALL / "default" / "seed0"
    assert (run_dir / "DONE").is_file()
    return run_dir


@pytest.mark.slow
def test_a_new_config_after_a_finished_run_trains_in_its_own_directory(source: Path) -> None:
    cwd = source.parents[5]
    proc = _run_py([*SMOKE, "schedule.p_3d=0.1", "guidance.synthetic.video.loss_weight=1.0"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already finished" not in proc.stdout
    new = source.parents[1] / "guidance.synthetic.video.loss_weight=1.0,schedule.p_3d=0.1" / "seed0"
    assert (new / "DONE").is_file() and _logged(new)[0] == (0, 1)
    again = _run_py(SMOKE, cwd)  # the first config still finds its own finished run
    assert again.returncode == 0 and "already finished (DONE exists); nothing to do" in again.stdout


@pytest.mark.slow
def test_two_processes_on_one_run_one_trains_the_other_fails_naming_it(tmp_path: Path) -> None:
    args = ["preset=smoke", "schedule.stage_lengths=[30,30,60]", "trainer.checkpoint_every=5"]
    run_dir = tmp_path / "outputs" / "smoke" / "full" / BALL / "schedule.stage_lengths=[30,30,60]" / "seed0"
    command = [sys.executable, str(REPO / "run.py"), *args]
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]  # noqa: SIM115 (closed below)
    procs = [subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT) for log in logs]
    try:
        start = time.monotonic()
        while all(p.poll() is None for p in procs) and time.monotonic() - start < TIMEOUT_S:
            time.sleep(0.1)
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        holder = procs[1 - loser]
        lost_after = time.monotonic() - start
        text = (tmp_path / f"p{loser}.log").read_text()
        assert procs[loser].returncode != 0, text[-3000:]
        assert re.search(rf"{re.escape(str(run_dir))} is in use by another process \(host \S+, pid {holder.pid}, "
                         r"since \S+; lock file", text), text[-3000:]
        assert holder.poll() is None, "the holder finished before the other process gave up"
        # Within seconds of starting: before the priors are built (python, torch and Hydra start-up included).
        assert lost_after < 60, lost_after

        checkpoint = run_dir / "checkpoints" / f"ckpt_{10:09d}.pt.sha256"
        while not checkpoint.exists() and holder.poll() is None:
            time.sleep(0.1)
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=60) == -signal.SIGKILL
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    assert not (run_dir / "DONE").exists()
    proc = _run_py(args, tmp_path)  # the dead holder's lock file blocks nothing
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = re.search(r"resumed .* at iteration (\d+)", proc.stdout)
    assert resumed is not None and int(resumed.group(1)) >= 10, proc.stdout[-2000:]
    assert (run_dir / "DONE").is_file()


@pytest.mark.slow
def test_a_branching_sweep_trains_stage_3_only_and_collects_one_row_per_value(source: Path,
                                                                              tmp_path: Path) -> None:
    sweep = [*SMOKE, f"init_from={source}", "init_at=stage2", "guidance.synthetic.video.loss_weight=0.1,0.3,1.0"]
    proc = _run_py(["-m", *sweep], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"from {source} at iteration {STAGE2_END}") == 3, proc.stdout[-3000:]
    prompt_dir = tmp_path / "outputs" / "smoke" / "full" / BALL
    tags = sorted(p.name for p in prompt_dir.iterdir())
    assert tags == ["default@stage2", "default@stage2,guidance.synthetic.video.loss_weight=0.1",
                    "default@stage2,guidance.synthetic.video.loss_weight=1.0"]
    for tag in tags:
        assert _logged(prompt_dir / tag / "seed0") == [(it, 3) for it in range(STAGE2_END, TOTAL)], tag
    # loss_weight=0.3 is the smoke preset's own value: that branch is the source's stage 3 again, bit for bit.
    same, reference = _final_state(prompt_dir / "default@stage2" / "seed0"), _final_state(source)
    assert same.keys() == reference.keys()
    for key, value in same.items():
        assert torch.equal(value, reference[key]) if isinstance(value, torch.Tensor) else value == reference[key], key

    stamps = {p: p.stat().st_mtime_ns for p in prompt_dir.rglob("ckpt_*.pt")}
    again = _run_py(["-m", *sweep], tmp_path)  # the same sweep again: every job finds its finished run
    assert again.returncode == 0 and again.stdout.count("already finished (DONE exists); nothing to do") == 3
    assert {p: p.stat().st_mtime_ns for p in prompt_dir.rglob("ckpt_*.pt")} == stamps

    table = subprocess.run([sys.executable, "-m", "ablations.collect", str(tmp_path / "outputs")], cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert table.returncode == 0, table.stderr[-3000:]
    lines = table.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| Method"))
    assert "| `loss_weight` |" in header, header
    column = header.split(" | ").index("`loss_weight`")
    rows = [line for line in lines[lines.index(header) + 2:] if line.startswith("| ")]
    rows = rows[:next((i for i, r in enumerate(rows) if r.startswith("| Method")), len(rows))]
    assert len(rows) == 3 and sorted(r.split(" | ")[column] for r in rows) == ["0.1", "0.3", "1.0"], table.stdout
    assert "3 runs: 3 finished" in table.stdout
