"""fourdfy/logs.py: messages reach stdout when nothing is configured, and only the configured handlers otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=True)


def test_unconfigured_logging_prints_to_stdout_like_print_did() -> None:
    out = _python("from fourdfy.logs import get_logger; get_logger('fourdfy.api').info('resumed %s at %d', 'x', 3)")
    assert out.stdout == "[fourdfy] resumed x at 3\n" and out.stderr == ""


def test_configured_logging_gets_the_records_and_stdout_stays_quiet() -> None:
    out = _python("import logging; logging.basicConfig(level=logging.INFO, format='%(name)s|%(message)s'); "
                  "from fourdfy.logs import get_logger; get_logger('fourdfy.api').info('stage %d starts', 2)")
    assert out.stdout == "" and out.stderr == "fourdfy.api|stage 2 starts\n"
