"""Carry out a run: the one entry point run.py, tests and tools call.

``generate(cfg, run_dir)`` trains (resuming if run_dir holds a checkpoint), then writes the renders and
metrics, and finally the ``DONE`` marker — last, so nothing reads a half-written run as finished. The run is
assembled by ``fourdfy.build``; the directory's rules live in ``fourdfy.rundir``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from fourdfy.build import build_trainer
from fourdfy.config import RunConfig
from fourdfy.export.curves import curves_callback
from fourdfy.export.outputs import write_outputs
from fourdfy.rundir import RunDir
from fourdfy.tracking import make_logger
from fourdfy.trainer import Callback


def generate(cfg: RunConfig, run_dir: Path, callbacks: list[Callback] | None = None) -> dict[str, float]:
    """Train ``cfg`` in ``run_dir`` (resuming when possible) and write renders, metrics and DONE."""
    run = RunDir(run_dir)
    if run.is_finished():
        print(f"[fourdfy] {run.path} is already finished (DONE exists); nothing to do.", flush=True)
        return run.read_metrics()
    # Everything that can reject the config (validation, missing weights) runs before the directory is touched.
    trainer = build_trainer(cfg, run.path, callbacks=callbacks)
    # curves.png redrawn during training, with the stages as the schedule runs them (variants may merge them).
    trainer.callbacks.insert(0, curves_callback(cfg.trainer.checkpoint_every, cfg.prompt,
                                                list(trainer.schedule.stage_lengths)))
    run.prepare(cfg)
    trainer.logger = make_logger(cfg.logger, run.path, OmegaConf.to_container(OmegaConf.structured(cfg)),
                                 name=f"{cfg.variant.name}/{cfg.prompt}", job_type=cfg.variant.name)
    if trainer.try_resume():
        print(f"[fourdfy] resumed {run.path} at iteration {trainer.iteration}", flush=True)
    trainer.train()
    metrics = write_outputs(cfg, trainer.field, run.path, trainer.logger, step=trainer.iteration)
    metrics["skipped_steps"] = trainer.skipped_steps
    trainer.logger.finish()
    run.finish(metrics)
    return metrics
