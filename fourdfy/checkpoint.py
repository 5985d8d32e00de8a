"""Atomic, verifiable checkpoints: a run never loses more than the steps since its last save.

Each checkpoint is ``ckpt_<iteration>.pt`` plus ``ckpt_<iteration>.pt.sha256``. Both are written to a
temporary name, fsynced and renamed (os.replace is atomic on POSIX), the hash last. Loading walks
from the newest checkpoint down and skips, with a warning, any whose hash is missing or wrong (a
partial write, a disk error), so a corrupted file costs one checkpoint interval, not the run.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from fourdfy.atomic import fsync_dir, stale_temporaries, write_bytes_atomic

_NAME = re.compile(r"^ckpt_(\d{9})\.pt$")


def save_checkpoint(directory: Path, iteration: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` for ``iteration`` atomically; keep the newest ``keep`` checkpoints."""
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
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_latest_checkpoint(directory: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint whose hash verifies, or None when there is none."""
    for path in reversed(list_checkpoints(directory)):
        digest_file = path.with_name(path.name + ".sha256")
        data = path.read_bytes()
        if not digest_file.exists() or digest_file.read_text().strip() != hashlib.sha256(data).hexdigest():
            warnings.warn(f"checkpoint {path} is incomplete or corrupted (hash mismatch); trying an older one",
                          stacklevel=2)
            continue
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False), path
    return None
