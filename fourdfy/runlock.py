"""One process per run directory: an advisory ``flock`` on a file in it, held for the whole run.

The kernel releases an flock when the last descriptor of its open file goes away, so a process that dies
(SIGKILL, out of memory, a node reboot for local disks) leaves no lock behind: a stale lock *file* never blocks
a launch, only a live holder does. The holder writes who it is into the file (host, pid, SLURM job, start time),
so a second process can say whom it is waiting for.

The file is written in place, never replaced by a rename (fourdfy/atomic.py is wrong here): the lock belongs to
the file's inode, and a process that opened a renamed-over path would lock a different inode than the holder.

Shared filesystems (what we know, not tested here beyond local disks): on Linux >= 2.6.12 an NFS client emulates
flock() with a whole-file POSIX byte-range lock, which the server arbitrates between clients (NLM for NFSv3,
the protocol itself for NFSv4); a client that loses its lease (network partition) may lose the lock. Lustre
arbitrates flock between clients only when mounted with ``-o flock`` (``localflock`` is node-local; without
either, flock fails and the launch stops with an error saying so). Other parallel filesystems (GPFS, BeeGFS,
CephFS) differ by version and mount options: check that flock is cluster-coherent there before relying on it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


@dataclass(frozen=True)
class RunLock:
    """Who holds a run directory: written into its lock file."""

    host: str  # socket.gethostname() of the holder
    pid: int  # its process id on that host
    slurm_job: str | None  # SLURM job id (array jobs: <array job>_<task>), None outside SLURM
    since: str  # local time the lock was taken, ISO 8601

    @classmethod
    def of_this_process(cls) -> RunLock:
        env = os.environ
        job = env.get("SLURM_JOB_ID")
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        return cls(socket.gethostname(), os.getpid(), job, time.strftime("%Y-%m-%dT%H:%M:%S"))

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host}, pid {self.pid}{job}, since {self.since}"


def _read_holder(fd: int) -> str:
    """The holder's description from the lock file, or a note when it is unreadable (being written)."""
    for _ in range(5):  # the holder truncates, then writes: retry a torn read briefly
        raw = os.pread(fd, 4096, 0)
        try:
            return RunLock(**json.loads(raw)).describe()
        except (ValueError, TypeError):
            time.sleep(0.05)
    return "a process that has not written its name yet"


@contextmanager
def hold_lock(path: Path) -> Iterator[RunLock]:
    """Take the exclusive lock on ``path`` (created if missing) for the block, or fail at once.

    Raises RunLockedError naming the holder when a live process holds it; OSError with the fix when the
    filesystem has no flock (Lustre without ``-o flock``).
    """
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"{path.parent} is in use by another process ({_read_holder(fd)}; lock file {path}). One process "
                "runs a directory at a time: wait for it, or stop that process or job; a dead process holds no "
                "lock.") from None
        except OSError as err:
            if err.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOLCK):
                raise OSError(err.errno, f"cannot lock {path}: this filesystem does not support flock "
                                         f"({os.strerror(err.errno)}); on Lustre mount with -o flock") from err
            raise
        holder = RunLock.of_this_process()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(holder)).encode(), 0)
        yield holder
    finally:
        os.close(fd)  # releases the lock; the file stays (a stale file blocks nobody)
