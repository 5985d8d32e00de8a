"""Requeue safety on the local SLURM cluster: an interrupted job resumes and ends bitwise as if never stopped.

One toy-world job (`run.py -m ... hydra/launcher=slurm`, 60 iterations, a checkpoint every 5) is
interrupted after its iteration-10 checkpoint, in one of two ways:

- ``timelimit``: SIGUSR2, the signal SLURM sends `signal_delay_s` before the time limit (`--signal=USR2@…`).
  submitit calls hydra-submitit-launcher's `checkpoint` (which resubmits the same job) and requeues it with
  `scontrol requeue`, at most `max_num_timeout` times.
- ``requeue``: `scontrol requeue` from outside (what preemption with PreemptMode=REQUEUE does). submitit
  ignores the SIGTERM; SLURM kills the job KillWait (30 s here) later. The test kills the job's python
  process as soon as it has logged that SIGTERM, i.e. what SLURM does when KillWait ends, so that the kill
  lands mid-run on a short schedule instead of after the job has finished.

SLURM delays a requeued job's start (BeginTime = now + the launch credential's lifetime, ~2 min); the test
releases it with `scontrol update JobId=… StartTime=now+1`, never `StartTime=now`. The requeue revokes the job's
launch credential with a time stamp in whole seconds, and slurmd refuses a launch whose credential is not newer
(slurmd: "Job … already killed, do not launch batch job"; slurmctld: "Killing non-startable batch JobId=…: Job
credential revoked"): a release within the requeue's second ended the job FAILED without a second run, and the
sweep with submitit's "has not produced any output (state: FAILED)". Begin time = the release's second + 1 is
later than the revocation's second (one clock, this machine's), so the restart always launches. The restarted
job runs in the same run directory and fourdfy.api.generate resumes from the newest checkpoint. Its final
checkpoint must equal, tensor for tensor (torch.equal), the one of an uninterrupted local run of the same config,
started alongside.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.runs import flatten_state

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["preset=smoke", "schedule.stage_lengths=[10,10,40]", "trainer.checkpoint_every=5"]
TOTAL = 60  # iterations of OVERRIDES' schedule
INTERRUPT_AFTER = 10  # interrupt once this checkpoint exists
MARKER = f"ckpt_{INTERRUPT_AFTER:09d}.pt.sha256"  # a checkpoint's hash file is written last
TIMEOUT_S = 900.0  # generous: the node's 2 CPUs are shared


def _env() -> dict[str, str]:
    # Same thread count in the SLURM job (sbatch exports the environment) and the reference run.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _wait(condition, what: str, timeout: float = TIMEOUT_S, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Reference:
    """The uninterrupted run: `run.py` locally, started at once, awaited when first needed."""

    def __init__(self, run_dir: Path, log: Path):
        self.run_dir = run_dir
        self._log = open(log, "w")  # noqa: SIM115 (closed in wait)
        self._proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *OVERRIDES, f"hydra.run.dir={run_dir}"],
                                      cwd=run_dir.parent, env=_env(), stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self) -> Path:
        rc = self._proc.wait(timeout=TIMEOUT_S)
        self._log.close()
        assert rc == 0, Path(self._log.name).read_text()[-3000:]
        return self.run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    root = tmp_path_factory.mktemp("reference")
    ref = Reference(root / "run", root / "run.log")
    yield ref
    if ref._proc.poll() is None:  # a failing test must not leave it running
        ref._proc.kill()
        ref._proc.wait()


def _scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def _run_dir_with_marker(sweep_dir: Path) -> Path | None:
    """The job's run directory once it holds checkpoint INTERRUPT_AFTER; where below the sweep directory is
    conf/config.yaml's hydra.sweep.subdir, so it is found, not spelt out here."""
    found = sorted(sweep_dir.glob(f"**/checkpoints/{MARKER}"))
    return found[0].parent.parent if found else None


def _job_id(sweep_dir: Path) -> str | None:
    folder = sweep_dir / ".submitit"
    names = [p.name for p in folder.iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name)] if folder.is_dir() else []
    return (sorted(n for n in names if "_" in n) or names or [None])[0]


def _job_python_pid(job_id: str) -> int:
    """The pid of the job's `python -m submitit.core._submit` (the cluster is this machine)."""
    out = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[1:]:
        pid = int(line.split()[0])
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        # srun's own command line names the module too: take the python interpreter that runs it.
        if b"submitit.core._submit" in cmdline and Path(cmdline[0].decode()).name.startswith("python"):
            return pid
    raise AssertionError(f"no submitit python process among the pids of job {job_id}:\n{out}")




def _assert_bitwise_equal(a: Path, b: Path) -> None:
    sa = dict(flatten_state(torch.load(a, map_location="cpu", weights_only=False)))
    sb = dict(flatten_state(torch.load(b, map_location="cpu", weights_only=False)))
    assert sa.keys() == sb.keys()
    assert any(k.startswith("/field/") for k in sa)
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sb[key]), f"{key} differs"
        else:
            assert value == sb[key], f"{key}: {value!r} != {sb[key]!r}"


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("how", ["timelimit", "requeue"])
def test_interrupted_slurm_job_resumes_bitwise(slurm_cluster: str, tmp_path: Path, reference: Reference,
                                               how: str) -> None:
    sweep_dir = tmp_path / "multirun"
    command = [sys.executable, str(REPO / "run.py"), "-m", *OVERRIDES, "hydra/launcher=slurm",
               f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.timeout_min=20", "hydra.launcher.mem_gb=2",
               "hydra.launcher.max_num_timeout=3"]
    log = open(tmp_path / "sweep.log", "w")  # noqa: SIM115
    sweep = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    job_id = None
    try:
        run_dir = _wait(lambda: _run_dir_with_marker(sweep_dir), f"checkpoint {INTERRUPT_AFTER}", poll=0.05)
        job_id = _wait(lambda: _job_id(sweep_dir), "the job's submitit folder")
        assert not (run_dir / "DONE").exists()
        job_log = sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.out"
        if how == "timelimit":
            subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        else:
            pid = _job_python_pid(job_id)
            subprocess.run(["scontrol", "requeue", job_id], check=True)
            _wait(lambda: "Bypassing signal SIGTERM" in job_log.read_text(), "submitit to log the SIGTERM")
            os.kill(pid, signal.SIGKILL)
        _wait(lambda: _scontrol_job(job_id).get("JobState") == "PENDING", "the requeued job to be pending")
        # +1 s: a launch in the second of the requeue would be refused (revoked credential; module docstring).
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+1"], check=True)
        rc = sweep.wait(timeout=TIMEOUT_S)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
            if job_id is not None:
                subprocess.run(["scancel", job_id], check=False)
        log.close()
    assert rc == 0, (tmp_path / "sweep.log").read_text()[-3000:]

    assert _scontrol_job(job_id)["Restarts"] == "1"
    out = job_log.read_text()
    if how == "timelimit":
        assert "Caught signal SIGUSR2" in out and "Calling checkpoint method" in out and "Requeued job" in out
    resumed = [int(n) for n in re.findall(r"resumed .* at iteration (\d+)", out)]
    assert len(resumed) == 1 and INTERRUPT_AFTER <= resumed[0] < TOTAL, out[-3000:]
    assert (run_dir / "DONE").exists()

    ref_dir = reference.wait()
    final = f"checkpoints/ckpt_{TOTAL:09d}.pt"
    _assert_bitwise_equal(run_dir / final, ref_dir / final)
    assert (run_dir / "metrics.json").read_text() == (ref_dir / "metrics.json").read_text()

    if how == "timelimit":  # launched again, a finished run does nothing and says so
        stamp = (run_dir / final).stat().st_mtime_ns
        again = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                               timeout=TIMEOUT_S, check=False)
        assert again.returncode == 0, again.stderr[-3000:]
        logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_log.out"))
        assert "already finished (DONE exists); nothing to do" in logs
        assert (run_dir / final).stat().st_mtime_ns == stamp
