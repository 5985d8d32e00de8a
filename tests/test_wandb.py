"""W&B offline logging of a real (smoke) run: scalars, the orbit video, the config, and one run id across
a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fourdfy.api import generate
from fourdfy.config import compose_run_config

pytest.importorskip("wandb")


@pytest.mark.slow
def test_offline_wandb_run_holds_scalars_video_and_survives_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_run_config(["preset=smoke", "logger.kind=wandb", "logger.group=test-sweep"])
    run_dir = tmp_path / "run"

    def stop_at_12(trainer, iteration):
        if iteration == 12:
            raise KeyboardInterrupt  # an interrupted job; the W&B run id must survive it

    with pytest.raises(KeyboardInterrupt):
        generate(cfg, run_dir, callbacks=[stop_at_12])
    first_id = json.loads((run_dir / "wandb_run_id.json").read_text())["id"]
    generate(cfg, run_dir)
    assert json.loads((run_dir / "wandb_run_id.json").read_text())["id"] == first_id

    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert runs and all(r.name.endswith(first_id) for r in runs), [r.name for r in runs]
    assert any(Path(r).glob("run-*.wandb") for r in runs)
    videos = [p for r in runs for p in (r / "files" / "media" / "videos").rglob("*.mp4")]
    assert videos, "the orbit video was not logged"
    # Offline, W&B keeps config, history and summary in the run's binary log until `wandb sync`: the
    # records hold the keys and values as plain strings.
    records = b"".join(p.read_bytes() for r in runs for p in r.glob("run-*.wandb"))
    for needle in (b"loss/guidance", b"eval/psnr", b"lr/static", b"a red ball bouncing on a blue box"):
        assert needle in records, needle
