"""Helpers shared by the resume tests: run generate in a child process (optionally SIGKILLed), flatten states."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_generate_in_subprocess(run_dir: Path, overrides: list[str], kill_after: int | None) -> int:
    """`generate(compose_run_config(overrides), run_dir)` in a child that SIGKILLs itself after iteration
    ``kill_after`` (None: runs to the end). Returns the child's exit status (−SIGKILL when killed)."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
        from fourdfy.config import compose_run_config
        from fourdfy.api import generate

        def kill(trainer, iteration):
            if iteration == {kill_after!r}:
                os.kill(os.getpid(), signal.SIGKILL)

        generate(compose_run_config({overrides!r}), {str(run_dir)!r}, callbacks=[kill])
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=600).returncode


def flatten_state(state: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) pairs of a nested checkpoint state of dicts, lists and tuples."""
    if isinstance(state, dict):
        for key, value in state.items():
            yield from flatten_state(value, f"{prefix}/{key}")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from flatten_state(value, f"{prefix}/{i}")
    else:
        yield prefix, state
