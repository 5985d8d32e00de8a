"""Validation grids during training (fourdfy/export/validation.py): written on schedule, invisible to training."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

from fourdfy.build import build_trainer
from fourdfy.config import compose_run_config
from fourdfy.export.validation import validation_callback, validation_grid_path

SMOKE = ["preset=smoke", "schedule.stage_lengths=[4,4,4]", "eval.validation_every=5", "eval.captions=false"]


class _ImageLog:
    def __init__(self) -> None:
        self.images: list[tuple[str, Path, int]] = []

    def log(self, metrics, step):
        pass

    def log_image(self, key, path, step):
        self.images.append((key, Path(path), step))

    def log_video(self, key, path, step):
        pass

    def finish(self):
        pass


def test_grids_are_written_every_n_iterations_and_change_nothing_else(tmp_path: Path) -> None:
    cfg = compose_run_config(SMOKE)
    plain = build_trainer(cfg, tmp_path / "plain")
    watched = build_trainer(cfg, tmp_path / "watched", callbacks=[validation_callback(cfg)])
    watched.logger = log = _ImageLog()
    plain.train()
    watched.train()
    grids = sorted((tmp_path / "watched" / "renders" / "validation").iterdir())
    assert [p.name for p in grids] == ["grid_000000005.png", "grid_000000010.png"]
    assert [(k, p, s) for k, p, s in log.images] == [
        ("validation/grid", validation_grid_path(tmp_path / "watched", 4), 4),
        ("validation/grid", validation_grid_path(tmp_path / "watched", 9), 9)]
    ev, pad = cfg.eval, 2  # rows: views, columns: times, 2-pixel gutters (export.video.tile_grid)
    assert iio.imread(grids[0]).shape == (ev.grid_views * (ev.video_size + pad) + pad,
                                          ev.grid_times * (ev.video_size + pad) + pad, 3)
    for a, b in zip(plain.state_dict()["field"].values(), watched.state_dict()["field"].values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(plain.generator.get_state(), watched.generator.get_state())
    assert watched.field.training == plain.field.training


def test_validation_can_be_switched_off_and_bad_values_name_the_key() -> None:
    assert validation_callback(compose_run_config(["preset=smoke", "eval.validation_every=null"])) is None
    cfg = compose_run_config(["preset=smoke", "eval.validation_every=0"])
    with pytest.raises(ValueError, match="eval.validation_every"):
        cfg.validate()
