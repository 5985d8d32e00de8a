"""Real jobs on the local SLURM cluster (scripts/slurm_local.sh): submitit and a Hydra sweep.

These check the whole path the sweeps use: sbatch -> slurmd -> srun -> the venv python -> a result
read back, with job states coming from `sacct` (the stand-in in scripts/sacct when there is no
accounting database). Skipped only when SLURM is not installed (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from submitit.slurm.slurm import SlurmInfoWatcher

# States submitit treats as "not finished yet" (submitit/core/core.py, InfoWatcher.is_done).
_UNFINISHED = {"READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED"}
# Generous: the node has 2 CPUs shared with other users, so a job may wait in the queue.
_JOB_TIMEOUT_S = 240.0
# After a job's result exists, SLURM needs only seconds to mark it finished; a state stuck for this
# long means `sacct` is not answering (submitit then says UNKNOWN forever).
_STATE_TIMEOUT_S = 60.0


def _payload(n: int) -> dict[str, object]:
    """Runs inside the SLURM job: a small sum plus what the job saw of its environment."""
    return {
        "sum_sq": sum(i * i for i in range(n)),
        "python": sys.executable,
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "hf_offline": os.environ.get("HF_HUB_OFFLINE"),
    }


def _states_until_finished(watcher: SlurmInfoWatcher, job_id: str) -> list[str]:
    """Polls `sacct` (through submitit's watcher) until the job leaves the unfinished states.

    `job.result()` returns as soon as the result pickle exists, while SLURM may still report the
    job RUNNING or COMPLETING for a moment, hence the poll. Returns every state seen, in order.
    """
    seen: list[str] = []
    deadline = time.monotonic() + _STATE_TIMEOUT_S
    while time.monotonic() < deadline:
        state = watcher.get_state(job_id, mode="force")
        if not seen or seen[-1] != state:
            seen.append(state)
        if state.upper() not in _UNFINISHED:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} unfinished {_STATE_TIMEOUT_S} s after its result; states: {seen}")


@pytest.mark.slurm
def test_submitit_job_completes_with_real_state(
    slurm_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # sbatch writes slurm-N.out into the current directory
    # pytest imports this file from tests/, which the job's python cannot import: send the
    # function by value instead of by module reference.
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
        executor.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1, name="fourdfy-test")
        n = 50
        job = executor.submit(_payload, n)
    finally:
        cloudpickle.unregister_pickle_by_value(module)

    deadline = time.monotonic() + _JOB_TIMEOUT_S
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.5)
    if not job.done():
        job.cancel(check=False)
        pytest.fail(f"SLURM job {job.job_id} gave no result within {_JOB_TIMEOUT_S} s (state {job.state})")
    result = job.result()
    states = _states_until_finished(job.watcher, job.job_id)

    assert result["sum_sq"] == n * (n - 1) * (2 * n - 1) // 6  # closed form: 40425
    assert result["python"] == sys.executable  # the job ran in this venv
    assert result["job_id"] == job.job_id
    assert result["hf_offline"] == "1"  # the submitter's environment reached the job
    # Without a working sacct submitit reports UNKNOWN forever; every state must be a real one.
    assert "UNKNOWN" not in states, states
    assert job.state == "COMPLETED", states


_APP = '''\
import json
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> int:
    record = {
        "x": cfg.x,
        "y": cfg.x ** 3,
        "python": sys.executable,
        "array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
    }
    Path(HydraConfig.get().runtime.output_dir, "result.json").write_text(json.dumps(record))
    return record["y"]


if __name__ == "__main__":
    main()
'''


@pytest.mark.slurm
def test_hydra_submitit_slurm_multirun(slurm_cluster: str, tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text("x: 0\n")
    (tmp_path / "app.py").write_text(_APP)
    sweep_dir = tmp_path / "multirun"
    cmd = [
        sys.executable, "app.py", "-m", "hydra/launcher=submitit_slurm", f"hydra.sweep.dir={sweep_dir}",
        "hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
        "x=1,2",
    ]
    # cwd=tmp_path: sbatch writes slurm-N.out there, not into the repository.
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=_JOB_TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Bypassing sacct error" not in proc.stderr  # submitit got states from sacct

    records = {}
    for num in (0, 1):
        path = sweep_dir / str(num) / "result.json"
        assert path.is_file(), f"missing {path}; stderr:\n{proc.stderr}"
        record = json.loads(path.read_text())
        records[record["x"]] = record
    assert sorted(records) == [1, 2]
    assert [records[x]["y"] for x in (1, 2)] == [1, 8]  # x**3 by hand
    assert all(r["python"] == sys.executable for r in records.values())
    # One 2-task SLURM array, not two local processes.
    array_ids = {r["array_job_id"] for r in records.values()}
    assert len(array_ids) == 1 and None not in array_ids, records
    assert sorted(r["array_task_id"] for r in records.values()) == ["0", "1"]

    watcher = SlurmInfoWatcher(delay_s=0)
    (array_id,) = array_ids
    for task in ("0", "1"):
        states = _states_until_finished(watcher, f"{array_id}_{task}")
        assert "UNKNOWN" not in states and states[-1] == "COMPLETED", states
