"""SIGUSR2 (SLURM's time-limit warning) saves the last completed iteration, then reaches the old handler.

No SLURM here: a child process runs fourdfy.api.generate with a SIGUSR2 handler installed beforehand that
stands in for submitit's (it records what is on disk, then exits with status 3, as submitit requeues and
exits). The test sends SIGUSR2 from outside once training has logged a row, like SLURM does; then a
restart in the same directory must end bitwise equal to an uninterrupted run. The context manager's
other cases (SIG_IGN, SIG_DFL, no pending signal, non-main thread, exceptions) are tested in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.runs import flatten_state

from fourdfy.api import generate
from fourdfy.build import build_trainer
from fourdfy.checkpoint import list_checkpoints, load_latest_checkpoint
from fourdfy.config import compose_run_config
from fourdfy.preemption import checkpoint_on_signal

REPO = Path(__file__).resolve().parents[1]
# checkpoint_every far past the end: the only checkpoints are the stage ends (20, 26, 36) and the signal's.
# log_every=1: the last log row is the last completed iteration.
OVERRIDES = ["preset=smoke", "schedule.stage_lengths=[20,6,10]", "trainer.checkpoint_every=1000",
             "trainer.log_every=1"]
STAGE_ENDS = (20, 26, 36)
EXIT_STATUS = 3  # what the stand-in for submitit's handler exits with
TIMEOUT_S = 300.0


@pytest.fixture
def usr2_handler() -> Iterator[None]:
    """Restores SIGUSR2's handler after a test that changes it."""
    before = signal.getsignal(signal.SIGUSR2)
    yield
    signal.signal(signal.SIGUSR2, before)


def _wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.001)


# ----------------------------------------------------------------------------------------------
# The context manager in-process


def test_signal_sets_the_flag_and_the_previous_handler_is_restored_on_exit(usr2_handler):
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    signal.signal(signal.SIGUSR2, previous)
    with checkpoint_on_signal(signal.SIGUSR2) as flag:
        assert flag.installed and signal.getsignal(signal.SIGUSR2) is not previous
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        _wait_for(lambda: flag.requested, "the flag")
        assert calls == []  # deferred: the previous handler has not run yet
        flag.hand_over()
        assert calls == [signal.SIGUSR2]
        assert not flag.requested and flag.installed  # it returned: ours is back for the next signal
        assert signal.getsignal(signal.SIGUSR2) is not previous
    assert calls == [signal.SIGUSR2]  # nothing pending at exit: not called again
    assert signal.getsignal(signal.SIGUSR2) is previous


def test_hand_over_restores_the_previous_handler_before_calling_it(usr2_handler):
    seen = []

    def previous(signum, frame):
        seen.append(signal.getsignal(signum))

    signal.signal(signal.SIGUSR2, previous)
    with checkpoint_on_signal(signal.SIGUSR2) as flag:
        os.kill(os.getpid(), signal.SIGUSR2)
        _wait_for(lambda: flag.requested, "the flag")
        flag.hand_over()
    assert seen == [previous]


def test_a_signal_after_the_last_check_is_handed_over_on_exit(usr2_handler):
    calls = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    with checkpoint_on_signal(signal.SIGUSR2) as flag:
        os.kill(os.getpid(), signal.SIGUSR2)
        _wait_for(lambda: flag.requested, "the flag")
    assert calls == [signal.SIGUSR2]


def test_an_exception_restores_the_previous_handler_and_propagates(usr2_handler):
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    signal.signal(signal.SIGUSR2, previous)
    with pytest.raises(RuntimeError, match="boom"), checkpoint_on_signal(signal.SIGUSR2):
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGUSR2) is previous and calls == []


def test_outside_the_main_thread_nothing_is_installed(usr2_handler):
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    result: dict[str, Any] = {}

    def body():
        try:
            with checkpoint_on_signal(signal.SIGUSR2) as flag:
                result["installed"] = flag.installed
                flag.hand_over()  # a no-op, not an error
        except Exception as error:  # noqa: BLE001 (reported to the main thread)
            result["error"] = error

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert result == {"installed": False}
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN


def test_default_previous_handler_terminates_the_process_at_hand_over():
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from fourdfy.preemption import checkpoint_on_signal

        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        with checkpoint_on_signal(signal.SIGUSR2) as flag:
            os.kill(os.getpid(), signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while not flag.requested and time.monotonic() < deadline:
                time.sleep(0.001)
            print("flagged", flag.requested, flush=True)
            flag.hand_over()
            print("survived", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == -signal.SIGUSR2, proc.stderr
    assert proc.stdout == "flagged True\n"


def test_ignored_signal_saves_a_checkpoint_and_training_carries_on(tmp_path, usr2_handler, caplog):
    cfg = compose_run_config(["preset=smoke", "schedule.stage_lengths=[4,2,2]",
                              "trainer.checkpoint_every=1000", "trainer.keep_checkpoints=10"])

    def send(trainer, iteration):
        if iteration == 1:
            os.kill(os.getpid(), signal.SIGUSR2)

    trainer = build_trainer(cfg, tmp_path, callbacks=[send])
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    trainer.train()
    assert trainer.iteration == 8
    # Iteration 1 completed when the signal came: checkpoint 2, then the stage ends 4, 6, 8 as usual.
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        f"ckpt_{i:09d}.pt" for i in (2, 4, 6, 8)]
    assert "caught SIGUSR2: saved a checkpoint at iteration 2" in caplog.text
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN


# ----------------------------------------------------------------------------------------------
# A whole run, signalled from outside


@dataclass
class Interrupted:
    """What the signalled child left behind, read before anything else touches its directory."""

    run_dir: Path
    returncode: int
    stdout: str
    log_iterations: list[int]  # iteration of each log.jsonl row
    checkpoints: list[str]  # checkpoint file names on disk
    marker: dict[str, Any] | None  # written by the stand-in handler


_CHILD = """
import json, os, signal, sys, time
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
from fourdfy.config import compose_run_config
from fourdfy.api import generate

run_dir = Path({run_dir!r})

def stand_in_for_submitit(signum, frame):
    ckpts = run_dir / "checkpoints"
    marker = {{"signum": signum, "files": sorted(p.name for p in ckpts.iterdir()) if ckpts.is_dir() else [],
              "installed_while_called": signal.getsignal(signum) is stand_in_for_submitit}}
    Path({marker!r}).write_text(json.dumps(marker))
    os._exit({status})

def handshake(trainer, iteration):
    # Pause training at iteration 2 until the parent has sent the signal: the save then lands at iteration 3
    # however loaded the machine is (without this the signal could arrive at a stage end, or after the end).
    if iteration == 2:
        Path({ready!r}).write_text("ready")
        for _ in range(1200):
            if Path({sent!r}).exists():
                break
            time.sleep(0.05)

signal.signal(signal.SIGUSR2, stand_in_for_submitit)
generate(compose_run_config({overrides!r}), run_dir, callbacks=[handshake])
"""


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    root = tmp_path_factory.mktemp("interrupted")
    run_dir, marker, out = root / "run", root / "marker.json", root / "stdout.txt"
    ready, sent = root / "ready", root / "sent"
    script = _CHILD.format(repo=str(REPO), tests=str(REPO / "tests"), run_dir=str(run_dir),
                           marker=str(marker), status=EXIT_STATUS, overrides=OVERRIDES,
                           ready=str(ready), sent=str(sent))
    log = run_dir / "log.jsonl"
    with open(out, "w") as stdout:
        child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=stdout,
                                 stderr=subprocess.STDOUT)
        try:
            # The child waits in its iteration-2 callback (the stand-in handler was installed long before).
            _wait_for(ready.exists, "the child's iteration-2 callback", timeout=TIMEOUT_S)
            child.send_signal(signal.SIGUSR2)
            sent.write_text("sent")
            returncode = child.wait(timeout=TIMEOUT_S)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    return Interrupted(
        run_dir=run_dir, returncode=returncode, stdout=out.read_text(),
        log_iterations=[json.loads(line)["iteration"] for line in log.read_text().splitlines()],
        checkpoints=[p.name for p in list_checkpoints(run_dir / "checkpoints")],
        marker=json.loads(marker.read_text()) if marker.exists() else None,
    )


def test_signal_saves_the_last_completed_iteration_then_calls_the_previous_handler(interrupted):
    assert interrupted.returncode == EXIT_STATUS, interrupted.stdout[-3000:]
    assert not (interrupted.run_dir / "DONE").exists()
    last = interrupted.log_iterations[-1]
    assert interrupted.log_iterations == list(range(last + 1))
    saved = last + 1  # a checkpoint's iteration is the next one to run
    assert saved == 3  # the child paused in its iteration-2 callback until the signal was sent
    # Neither a multiple of checkpoint_every nor a stage end: only the signal saves there.
    assert saved % 1000 != 0 and saved not in STAGE_ENDS, (
        "no checkpoint at the signal, only scheduled ones (or the signal came too late to tell)")
    assert interrupted.checkpoints == [f"ckpt_{saved:09d}.pt"]
    found = load_latest_checkpoint(interrupted.run_dir / "checkpoints")
    assert found is not None and found[0]["iteration"] == saved  # its hash verifies
    assert f"[fourdfy] caught SIGUSR2: saved a checkpoint at iteration {saved}; handing" in interrupted.stdout
    # The stand-in ran after the save (checkpoint and its hash, written last, on disk), as the installed one.
    assert interrupted.marker == {"signum": int(signal.SIGUSR2), "installed_while_called": True,
                                  "files": [f"ckpt_{saved:09d}.pt", f"ckpt_{saved:09d}.pt.sha256"]}


def test_restart_after_the_signal_ends_bitwise_like_an_uninterrupted_run(interrupted, tmp_path, usr2_handler,
                                                                          caplog):
    assert interrupted.returncode == EXIT_STATUS, interrupted.stdout[-3000:]
    cfg = compose_run_config(OVERRIDES)
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    shutil.copytree(interrupted.run_dir, resumed)
    generate(cfg, resumed)
    assert f"resumed {resumed} at iteration {interrupted.log_iterations[-1] + 1}" in caplog.text
    generate(cfg, straight)
    a, path_a = load_latest_checkpoint(resumed / "checkpoints")
    b, path_b = load_latest_checkpoint(straight / "checkpoints")
    assert path_a.name == path_b.name == f"ckpt_{STAGE_ENDS[-1]:09d}.pt"
    flat_a, flat_b = dict(flatten_state(a)), dict(flatten_state(b))
    assert flat_a.keys() == flat_b.keys() and any(k.startswith("/field/") for k in flat_a)
    for key, value in flat_a.items():  # field, background, optimizer, priors, generator and RNG states
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, flat_b[key]), f"{key} differs after the signal and restart"
        else:
            assert value == flat_b[key], f"{key}: {value!r} != {flat_b[key]!r}"
    assert (resumed / "metrics.json").read_text() == (straight / "metrics.json").read_text()
