"""Carry out a run: the one entry point run.py, tests and tools call.

``generate(cfg, run_dir)`` trains (resuming if run_dir holds a checkpoint, branching when ``cfg.init_from`` is
set), then writes the renders and metrics, and finally the ``DONE`` marker — last, so nothing reads a
half-written run as finished. The run is assembled by ``fourdfy.build``; the directory's rules live in
``fourdfy.rundir``, where a config's directory is in ``fourdfy.identity``, branching in ``fourdfy.branch``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from omegaconf import OmegaConf

from fourdfy.branch import resolve_branch
from fourdfy.build import build_trainer
from fourdfy.config import RunConfig
from fourdfy.export.curves import curves_callback
from fourdfy.export.outputs import write_outputs
from fourdfy.export.validation import validation_callback
from fourdfy.guidance.memory import explain_out_of_memory
from fourdfy.logs import get_logger
from fourdfy.rundir import RunDir
from fourdfy.tracking import make_logger
from fourdfy.trainer import Callback

log = get_logger(__name__)


def _already_finished(run: RunDir) -> dict[str, float]:
    log.info("%s is already finished (DONE exists); nothing to do.", run.path)
    return run.read_metrics()


def generate(cfg: RunConfig, run_dir: Path, callbacks: list[Callback] | None = None) -> dict[str, float]:
    """Train ``cfg`` in ``run_dir`` (resuming or branching) and write renders, metrics and DONE.

    In this order, so that a wrong launch costs nothing: the config is validated; a directory holding a run of
    another config is refused, finished or not, naming each differing key; a finished run returns its metrics;
    a branch point is checked (fourdfy/branch.py). Only then is anything written. The directory's lock is held
    from before the priors are built (so a second process on it fails at once, not after loading models) to
    the end; a failure while building may leave the directory holding only its LOCK file.
    """
    cfg.validate()
    if cfg.init_from is not None:  # stored absolute: the config names its source wherever it is read from
        cfg = dataclasses.replace(cfg, init_from=os.path.abspath(cfg.init_from))
    run = RunDir(run_dir)
    run.check_config(cfg)
    if run.is_finished():
        return _already_finished(run)
    # A branch that saved a checkpoint of its own resumes from it and no longer needs its source.
    branch = None if run.has_checkpoints() else resolve_branch(cfg)
    trainer = None

    def where() -> str:  # for an out-of-memory message: how far the run got
        return "building the run" if trainer is None else f"at iteration {trainer.iteration}"

    # A CUDA out-of-memory error (priors' weights, a step, the exports) becomes one line naming the memory keys.
    with run.lock(), explain_out_of_memory(cfg, where):
        if run.is_finished():  # finished by another process between the check above and the lock
            return _already_finished(run)
        trainer = build_trainer(cfg, run.path, callbacks=callbacks)
        # curves.png redrawn during training, with the stages as the schedule runs them (variants may merge them).
        trainer.callbacks.insert(0, curves_callback(cfg.trainer.checkpoint_every, cfg.prompt,
                                                    list(trainer.schedule.stage_lengths)))
        validation = validation_callback(cfg)  # renders/validation/ grids every eval.validation_every iterations
        if validation is not None:
            trainer.callbacks.insert(1, validation)
        run.prepare(cfg)
        trainer.logger = make_logger(cfg.logger, run.path, OmegaConf.to_container(OmegaConf.structured(cfg)),
                                     name=f"{cfg.variant.name}/{cfg.prompt}", job_type=cfg.variant.name)
        if trainer.try_resume():
            log.info("resumed %s at iteration %d", run.path, trainer.iteration)
        elif branch is not None:
            trainer.start_branch(branch.checkpoint)
            log.info("branched %s from %s at iteration %d", run.path, branch.source, branch.iteration)
        log.info("training %s (%s, prompt %r, seed %d): iterations %d to %d, stages %s", run.path,
                 cfg.variant.name, cfg.prompt, cfg.seed, trainer.iteration, trainer.schedule.total_iterations,
                 list(trainer.schedule.stage_lengths))
        trainer.train()
        metrics = write_outputs(cfg, trainer.field, run.path, trainer.logger, step=trainer.iteration)
        metrics["skipped_steps"] = trainer.skipped_steps
        trainer.logger.finish()
        run.finish(metrics)
        log.info("finished %s: %s", run.path,
                 ", ".join(f"{k} {metrics[k]:.4g}" for k in ("gt_error", "psnr", "skipped_steps") if k in metrics))
    return metrics
