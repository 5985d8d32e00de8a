"""Atomic, verifiable checkpoints: a run never loses more than the steps since its last save.

Each checkpoint is ``ckpt_<iteration>.pt`` plus ``ckpt_<iteration>.pt.sha256``. Both are written to a
temporary name, fsynced and renamed (os.replace is atomic on POSIX), the hash last. Loading walks
from the newest checkpoint down and skips, with a warning, any whose hash is missing or wrong (a
partial write, a disk error), so a corrupted file costs one checkpoint interval, not the run.

Pruning keeps the newest ``keep`` checkpoints and every protected one (the trainer protects stage ends: a run
can be branched from them, fourdfy/branch.py). Checkpoint files are never modified after their rename, so a
branch may hard-link its source's checkpoint instead of copying it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from fourdfy.atomic import fsync_dir, stale_temporaries, write_bytes_atomic

_NAME = re.compile(r"^ckpt_(\d{9})\.pt$")


def save_checkpoint(directory: Path, iteration: int, state: dict[str, Any], keep: int = 3,
                    protected: tuple[int, ...] = ()) -> Path:
    """Write ``state`` for ``iteration`` atomically; keep the newest ``keep`` checkpoints and those of the
    ``protected`` iterations."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = directory / f"ckpt_{iteration:09d}.pt"
    write_bytes_atomic(path, data, durable=True)
    write_bytes_atomic(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode(), durable=True)
    fsync_dir(directory)  # the renames are durable before anything older is deleted
    for stale in stale_temporaries(directory, "ckpt_*"):  # left by a writer killed mid-write
        stale.unlink(missing_ok=True)
    for old in list_checkpoints(directory)[:-keep]:
        if checkpoint_iteration(old) in protected:
            continue
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def checkpoint_iteration(path: Path) -> int:
    """The iteration in a checkpoint's file name (``ckpt_000000700.pt`` -> 700)."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint file name (ckpt_<9 digits>.pt)")
    return int(match.group(1))


def checkpoint_path(directory: Path, iteration: int) -> Path:
    """Where the checkpoint of ``iteration`` lives in ``directory``."""
    return Path(directory) / f"ckpt_{iteration:09d}.pt"


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The state in ``path`` if its hash verifies, else None (missing, incomplete or corrupted)."""
    path = Path(path)
    digest_file = path.with_name(path.name + ".sha256")
    if not path.is_file() or not digest_file.is_file():
        return None
    data = path.read_bytes()
    if digest_file.read_text().strip() != hashlib.sha256(data).hexdigest():
        return None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def load_latest_checkpoint(directory: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint whose hash verifies, or None when there is none."""
    for path in reversed(list_checkpoints(directory)):
        state = load_checkpoint(path)
        if state is None:
            warnings.warn(f"checkpoint {path} is incomplete or corrupted (hash mismatch); trying an older one",
                          stacklevel=2)
            continue
        return state, path
    return None


def link_checkpoint(path: Path, directory: Path) -> Path:
    """Put checkpoint ``path`` (and its hash) into ``directory`` under the same name: a hard link where the
    filesystem allows one (no copy of the data), else a copy; the hash file last, as save_checkpoint does."""
    path, directory = Path(path), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in (path.name, path.name + ".sha256"):
        target = directory / name
        target.unlink(missing_ok=True)
        try:
            os.link(path.with_name(name), target)
        except OSError:  # another filesystem, or one without hard links
            write_bytes_atomic(target, path.with_name(name).read_bytes(), durable=True)
    fsync_dir(directory)
    return directory / path.name
