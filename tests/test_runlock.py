"""One process per run directory (fourdfy/runlock.py through RunDir.lock), the config check that comes before
DONE, and stage-end checkpoints that pruning keeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fourdfy.api import generate
from fourdfy.checkpoint import list_checkpoints, save_checkpoint
from fourdfy.config import compose_run_config
from fourdfy.rundir import LOCK_FILE, ConfigMismatchError, RunDir
from fourdfy.runlock import RunLockedError

REPO = Path(__file__).resolve().parents[1]


def test_a_second_holder_fails_at_once_naming_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    run = RunDir(tmp_path / "run")
    with run.lock() as held:
        assert (held.pid, held.slurm_job) == (os.getpid(), "40_3")
        assert json.loads((run.path / LOCK_FILE).read_text())["pid"] == os.getpid()
        start = time.monotonic()
        # flock belongs to an open file: a second open of the same file conflicts, even in this process.
        with pytest.raises(RunLockedError, match=rf"in use by another process \(host \S+, pid {os.getpid()}, "
                                                 r"SLURM job 40_3, since "), run.lock():
            pass
        assert time.monotonic() - start < 1.0
    with run.lock():  # released at the end of the block
        pass


def test_a_stale_lock_file_never_blocks(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "gone", "pid": 999999, "slurm_job": "7",
                                                  "since": "2020-01-01T00:00:00"}))
    with run.lock() as held:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == held.pid == os.getpid()


def test_a_sigkilled_holder_leaves_no_lock(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from fourdfy.rundir import RunDir
        with RunDir({str(tmp_path)!r}).lock():
            print("held", flush=True)
            time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {child.pid}"), RunDir(tmp_path).lock():
            pass
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        with RunDir(tmp_path).lock() as held:
            assert held.pid == os.getpid()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_another_config_is_refused_even_when_finished_listing_each_key(tmp_path: Path) -> None:
    cfg = compose_run_config(["preset=smoke"])
    run = RunDir(tmp_path)
    run.prepare(cfg)
    run.finish({"psnr": 1.0})
    other = compose_run_config(["preset=smoke", "schedule.p_3d=0.1", "guidance.synthetic.video.loss_weight=1.0"])
    with pytest.raises(ConfigMismatchError) as err:
        generate(other, tmp_path)
    message = str(err.value)
    assert "holds a run of a different config (finished)" in message
    assert "  guidance.synthetic.video.loss_weight: 0.3 -> 1.0\n  schedule.p_3d: 0.5 -> 0.1\n" in message
    # Resume-safe keys may change: the same run, and it is finished.
    assert generate(compose_run_config(["preset=smoke", "trainer.log_every=1", "device=cpu"]), tmp_path) == {
        "psnr": 1.0}


def test_a_directory_that_never_trained_is_not_restamped_with_another_config(tmp_path: Path) -> None:
    RunDir(tmp_path).prepare(compose_run_config(["preset=smoke"]))
    with pytest.raises(ConfigMismatchError, match=r"\(not finished\).*\n  seed: 0 -> 3"):
        RunDir(tmp_path).prepare(compose_run_config(["preset=smoke", "seed=3"]))


def test_pruning_keeps_the_newest_and_every_protected_checkpoint(tmp_path: Path) -> None:
    state = {"x": torch.zeros(1)}
    for it in (5, 6, 10, 12, 15, 20):
        save_checkpoint(tmp_path, it, state, keep=3, protected=(6, 12, 20))
    assert [int(p.name[5:14]) for p in list_checkpoints(tmp_path)] == [6, 12, 15, 20]
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == [
        f"ckpt_{i:09d}.pt.sha256" for i in (6, 12, 15, 20)]
