"""The project's log: one ``logging`` tree under "fourdfy", so cluster logs and Hydra's run.log have every message.

Under run.py, Hydra's job logging configures the root logger (console and ``<run dir>/run.log``) and our records
go there. A library caller that configured nothing still sees them: a fallback handler prints them to stdout as
``[fourdfy] message`` while the root logger has no handler, the way ``print`` did (Python's own last-resort
handler would show warnings only, on stderr).
"""

from __future__ import annotations

import logging
import sys

ROOT_NAME = "fourdfy"


class _StdoutWhileUnconfigured(logging.Handler):
    """Prints records to the current sys.stdout, but only while the application has configured no logging."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:  # Hydra (or the application) handles them, run.log included
            return
        try:
            sys.stdout.write(f"[{ROOT_NAME}] {self.format(record)}\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 (logging must never break a run)
            self.handleError(record)


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (a child of "fourdfy", which logs INFO and up)."""
    root = logging.getLogger(ROOT_NAME)
    if not any(isinstance(h, _StdoutWhileUnconfigured) for h in root.handlers):
        root.addHandler(_StdoutWhileUnconfigured())
        root.setLevel(logging.INFO)
    return logging.getLogger(name)
