"""Shared pytest setup: offline model hub and W&B for every test; the `slurm_cluster` fixture.

Set at import time, before any test module imports huggingface_hub or wandb: an online hub look-up
retries for ~46 s before failing on this network (ENVIRONMENT.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
# Triton's interpreter on machines without an NVIDIA driver (tests/test_hashgrid_triton.py). It must be set before
# anything imports triton: triton.language's own @jit helpers are built at import, in the mode of that moment,
# and a compiled-mode helper cannot be called from an interpreted kernel (a library imported by an earlier test
# module did import triton first in the whole suite). On a GPU machine the kernels compile as in production.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One toy-data cache per test session (inherited by subprocesses and SLURM jobs started by tests):
# hermetic, and each data set is still rendered only once.
os.environ.setdefault("FOURDFY_CACHE", tempfile.mkdtemp(prefix="fourdfy-test-cache-"))

_READY_STATES = {"idle", "mixed", "allocated", "completing"}


def require_slurm() -> str:
    """Skips when SLURM is not installed; fails (not skips) when it is installed but not running.

    Returns the node state reported by `sinfo`.
    """
    if shutil.which("sinfo") is None:
        pytest.skip("SLURM is not installed (no `sinfo` on PATH); start a local cluster as root with "
                    "`bash scripts/slurm_local.sh up`")
    proc = subprocess.run(
        ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30, check=False
    )
    states = proc.stdout.split()
    if proc.returncode != 0 or not _READY_STATES.intersection(states):
        pytest.fail(f"SLURM is installed but no node can run jobs (sinfo rc={proc.returncode}, "
                    f"states={states}, stderr={proc.stderr.strip()!r}); run `bash scripts/slurm_local.sh up`")
    return states[0]


@pytest.fixture
def slurm_cluster() -> str:
    """A running SLURM cluster (see scripts/slurm_local.sh); yields the node state."""
    return require_slurm()


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Tests marked `@pytest.mark.slurm` get the same check even without asking for the fixture.
    if item.get_closest_marker("slurm") is not None:
        require_slurm()
