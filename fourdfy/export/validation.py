"""Validation grids during training: see what a long run looks like before it ends, as threestudio users do.

Every ``eval.validation_every`` iterations (the authors' ``trainer.val_check_interval: 1000``) the field is
rendered as the final views×time grid (rows: eval.grid_views viewpoints; columns: eval.grid_times times) and
written to ``renders/validation/grid_<iteration>.png``; the logger (W&B) gets it as ``validation/grid``.

The render draws no random numbers (evaluation renders are deterministic) and changes no state, so a run with
validation grids trains exactly as one without them, and resumes bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fourdfy.config import RunConfig
from fourdfy.export.outputs import eval_renderer
from fourdfy.export.video import render_views_by_time, write_grid
from fourdfy.render.views import WHITE
from fourdfy.trainer import Callback

VALIDATION_DIR = Path("renders") / "validation"


def validation_grid_path(run_dir: Path, iteration: int) -> Path:
    """Where the grid after ``iteration`` (0-based; the grid shows the field after iterations 0..iteration) goes."""
    return Path(run_dir) / VALIDATION_DIR / f"grid_{iteration + 1:09d}.png"


def validation_callback(cfg: RunConfig) -> Callback | None:
    """A trainer callback writing a validation grid every ``cfg.eval.validation_every`` iterations (None: off)."""
    every = cfg.eval.validation_every
    if every is None:
        return None
    renderer = eval_renderer(cfg)
    ev = cfg.eval

    def callback(trainer: Any, iteration: int) -> None:
        if (iteration + 1) % every != 0:
            return
        field = trainer.field
        was_training = field.training
        field.eval()
        try:
            with torch.no_grad():
                grid = render_views_by_time(field, renderer, ev.grid_views, ev.grid_times, ev.video_size, WHITE)
        finally:
            field.train(was_training)
        caption = f"{cfg.prompt} (iteration {iteration + 1})" if ev.captions else None
        path = write_grid(grid, validation_grid_path(trainer.run_dir, iteration), caption=caption)
        trainer.logger.log_image("validation/grid", path, iteration)

    return callback
