"""Checkpoint when the cluster warns that the job is about to stop, then let it stop as it would have.

SLURM sends SIGUSR2 ``signal_delay_s`` before a job's time limit (120 s in conf/hydra/launcher/slurm.yaml, the
default of hydra-submitit-launcher; submitit's own executor defaults to 90 s). In the job
process submitit has installed its own SIGUSR2 handler, which requeues the job and exits at once; the
requeued run then resumes from its newest periodic checkpoint and redoes up to ``trainer.checkpoint_every``
iterations. ``checkpoint_on_signal`` puts a handler in front of the installed one that only raises a flag:
the training loop sees it after the iteration in progress, saves a checkpoint of that iteration, and
calls ``SignalFlag.hand_over``, which does what the replaced handler would have done with the signal
(submitit: requeue and exit). A Python signal handler runs between bytecodes of the main thread, so it
would interrupt the iteration mid-way; the flag defers the work to a point where the state is consistent.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

# What signal.getsignal returns: a Python callable, SIG_DFL / SIG_IGN, or None for a handler that was not
# installed from Python (so cannot be reinstalled from Python either).
Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class SignalFlag:
    """Whether ``signum`` arrived since the last hand-over; the handler it replaced.

    ``requested`` stays False for ever when the flag is not ``installed`` (not the main thread).
    """

    def __init__(self, signum: int):
        self.signum = signal.Signals(signum)
        self.installed = False  # our handler is in place (only possible from the main thread)
        self.requested = False  # set by the handler; cleared by hand_over
        self.previous: Handler = None  # the handler ours replaced

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def install(self) -> None:
        self.previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)
        self.installed = True

    def restore(self) -> None:
        """Put the replaced handler back (SIG_DFL when it was not a Python-visible one)."""
        previous = self.previous if self.previous is not None else signal.SIG_DFL
        signal.signal(self.signum, previous)
        self.installed = False

    def hand_over(self) -> None:
        """Give the pending signal to the replaced handler, now that the caller has saved its state.

        A Python handler is called (submitit's requeues and exits: this does not return). SIG_DFL (and None,
        which Python cannot call) re-raises the signal with the default action: for SIGUSR2 the process
        terminates. SIG_IGN ignores it. When the replaced handler returns, our handler is put back and the
        caller carries on, catching the next signal again.
        """
        if not self.installed or not self.requested:
            return
        self.requested = False
        previous = self.previous
        self.restore()  # first: the replaced handler sees itself installed, and a re-raise gets the default
        if previous is None or previous == signal.SIG_DFL:
            # raise() delivers to this thread before returning, so the default action happens here and now.
            signal.raise_signal(self.signum)
        elif callable(previous):
            # The frame the signal interrupted is long gone; handlers take None for "unknown" (submitit does).
            previous(self.signum, None)
        # SIG_IGN, or a handler that returned: carry on under our handler.
        self.install()


@contextmanager
def checkpoint_on_signal(signum: int = signal.SIGUSR2) -> Iterator[SignalFlag]:
    """Defer ``signum`` while the block runs: yields a SignalFlag to poll between iterations.

    The caller checks ``flag.requested`` after each completed iteration and, when set, saves a checkpoint
    and calls ``flag.hand_over()``. Outside the block the replaced handler is installed, so a signal before
    the loop starts or during the final export gets it at once. A signal still pending when the block ends
    normally (it came after the last check) is handed over on exit. Never touch SIGTERM with this: submitit
    ignores it on purpose (preemption sends it, and SLURM's kill follows KillWait later anyway).
    """
    flag = SignalFlag(signum)
    # signal.signal raises ValueError outside the main thread (CPython runs handlers only there), and the
    # loop of a non-main thread could not be told about the signal anyway: train unprotected, as before.
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    flag.install()
    try:
        yield flag
    except BaseException:
        flag.restore()  # the exception (submitit's SystemExit included) goes on; nothing to hand over
        raise
    else:
        # Pending only when the signal came after the last check: the caller's work is done and saved.
        flag.hand_over()
        flag.restore()
