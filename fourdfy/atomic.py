"""Write a file so that a reader sees the old content or the new one, never half of either.

The one write-temp-then-rename helper of the project: checkpoints, run metadata, metrics, logs, exports,
collected tables and the toy data cache all go through :func:`atomic_path`. The temporary file sits beside
the target (same folder, so the rename never crosses a filesystem) and keeps the target's suffix (writers
that pick a format from the suffix, such as imageio or matplotlib, pick the same one). ``os.replace`` is
atomic on POSIX; with ``durable=True`` the data and the rename are fsynced too, so they survive a power cut.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"  # temporary names are ".<stem>.tmp-<pid><suffix>": see stale_temporaries()
_TMP_NAME = re.compile(re.escape(TMP_MARK) + r"(\d+)")


def temporary_path(path: Path) -> Path:
    """The temporary name this process uses for ``path``: hidden, beside it, same suffix."""
    path = Path(path)
    return path.with_name(f".{path.stem}{TMP_MARK}{os.getpid()}{path.suffix}")


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a directory's entries are data of the directory)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, rename it onto ``path``.

    On any error or interrupt the temporary file is deleted and ``path`` is left as it was. The block must
    create the file; a block that writes nothing raises RuntimeError. ``durable``: fsync the file before the
    rename and the folder after it.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"the writer of {path} produced no file")
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes, durable: bool = False) -> Path:
    """``path.write_bytes(data)``, atomically (see :func:`atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path, text: str, durable: bool = False) -> Path:
    """``path.write_text(text)``, atomically."""
    return write_bytes_atomic(path, text.encode(), durable=durable)


def write_json_atomic(path: Path, data: Any, durable: bool = False) -> Path:
    """``data`` as indented JSON with sorted keys, atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True), durable=durable)


def stale_temporaries(folder: Path, pattern: str = "*") -> list[Path]:
    """Temporary files in ``folder`` matching ``pattern`` left by other (killed) processes, never this one's."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.glob(f".{pattern}"):
        match = _TMP_NAME.search(p.name)
        if match and int(match.group(1)) != os.getpid():
            found.append(p)
    return found
