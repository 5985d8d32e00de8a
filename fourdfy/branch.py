"""Branching: a run that starts from another run's checkpoint (``init_from=<run dir> init_at=stage2``).

A branch is a run of its own, in its own directory (fourdfy/identity.py names it after its source and branch
point). It begins with the source's whole state at that iteration (field, background, optimiser, prior state,
RNG states, occupancy grid) and trains on from there under its own config, so a stage-3 setting can be tried
without running stages 1-2 again. At the start the checkpoint is hard-linked into the branch's checkpoints/
(``Trainer.start_branch``): an interrupted branch resumes from its own directory and needs its source no more.
A branch whose config equals its source's is a resume, and ends bitwise equal to the source.

``init_at``: ``stage1`` / ``stage2`` (the end of that stage: the trainer keeps those checkpoints whatever
``trainer.keep_checkpoints`` says) or an iteration number (the checkpoint must still be on disk).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fourdfy.checkpoint import checkpoint_iteration, checkpoint_path, list_checkpoints
from fourdfy.hybrid import HybridSchedule
from fourdfy.rundir import CONFIG_FILE, RunDir, config_diff

if TYPE_CHECKING:
    from fourdfy.config import RunConfig

# Settings whose state a checkpoint carries in a fixed shape: a branch must keep its source's values.
STATE_SHAPING_KEYS = ("field", "guidance.backend", "renderer.occupancy_grid", "renderer.occupancy_resolution")
_STAGE = re.compile(r"stage([12])")


@dataclass(frozen=True)
class InitPoint:
    """Where in the source a branch starts: the end of a stage, or an iteration."""

    stage: int | None  # 1 or 2: the end of that stage; None with an iteration
    iteration: int | None  # the first iteration the branch runs; None with a stage

    @property
    def label(self) -> str:
        """As directory names spell it: ``stage2``, ``it700``."""
        return f"stage{self.stage}" if self.stage is not None else f"it{self.iteration}"


def parse_init_at(init_from: str | None, init_at: str | None) -> InitPoint | None:
    """The branch point of ``init_from``/``init_at``, None for a run from scratch; ValueError naming the key."""
    if init_from is None and init_at is None:
        return None
    if init_from is None:
        raise ValueError(f"init_at={init_at} needs init_from=<run directory>: the run to branch from")
    if init_at is None:
        raise ValueError(f"init_from={init_from} needs init_at=stage1, stage2 (the end of that stage) or an "
                         "iteration number: where in that run to start")
    text = str(init_at).strip()
    stage = _STAGE.fullmatch(text)
    if stage is not None:
        return InitPoint(int(stage.group(1)), None)
    if text.isdigit():
        return InitPoint(None, int(text))
    raise ValueError(f"init_at={init_at!r}: expected stage1, stage2 (the end of that stage) or an iteration number")


@dataclass(frozen=True)
class BranchPoint:
    """A resolved branch point: the source's checkpoint the branch starts from."""

    source: Path  # the source run directory
    iteration: int  # the first iteration the branch runs (a checkpoint's iteration is the next one to run)
    checkpoint: Path  # the source's checkpoint of that iteration (its hash is checked when it is loaded)


def _holds(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return (", ".join(names[:limit]) + more) if names else "nothing"


def resolve_branch(cfg: RunConfig) -> BranchPoint | None:
    """The checkpoint ``cfg`` branches from (None for a run from scratch), checked before any work.

    Each error is one line naming what exists: the directory's contents when it is not a run, the checkpoint
    iterations it holds when the one asked for is missing or was pruned.
    """
    point = parse_init_at(cfg.init_from, cfg.init_at)
    if point is None:
        return None
    source = Path(str(cfg.init_from))
    if not source.is_dir():
        raise FileNotFoundError(f"init_from={source}: no such directory")
    run = RunDir(source)
    source_cfg = run.stored_config(type(cfg))
    if source_cfg is None:
        raise FileNotFoundError(f"init_from={source} is not a fourdfy run directory (no {CONFIG_FILE}); "
                                f"it holds: {_holds(source)}")
    source_ends = HybridSchedule(source_cfg.schedule).stage_ends
    iteration = source_ends[point.stage - 1] if point.stage is not None else point.iteration
    assert iteration is not None
    held = [checkpoint_iteration(p) for p in list_checkpoints(run.checkpoints)]
    if iteration not in held:
        why = ("its schedule has no stages 1-2 (schedule.skip_stages_1_2)" if point.stage is not None and iteration == 0
               else f"the end of stage {point.stage} is iteration {iteration} there, and stage-end checkpoints are "
               "never pruned: the source has not reached it" if point.stage is not None else
               f"pruned by trainer.keep_checkpoints={source_cfg.trainer.keep_checkpoints} or never saved "
               f"(trainer.checkpoint_every={source_cfg.trainer.checkpoint_every}); init_at=stage1|stage2 always "
               "exist once reached")
        raise FileNotFoundError(f"init_from={source} init_at={cfg.init_at}: no checkpoint of iteration {iteration} "
                                f"({why}); its checkpoints/ holds iterations {held or 'none'}")
    shaping = {k: v for k, v in config_diff(source_cfg, cfg).items()
               if any(k == p or k.startswith(p + ".") for p in STATE_SHAPING_KEYS)}
    if shaping:
        changes = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in shaping.items())
        raise ValueError(f"init_from={source}: a checkpoint loads only into the settings it was saved with, and "
                         f"this branch changes {changes}; keep the source's values")
    ends = HybridSchedule(cfg.schedule).stage_ends
    if point.stage is not None and ends[point.stage - 1] != iteration:
        raise ValueError(f"init_at=stage{point.stage} is iteration {iteration} in the source, but this branch's "
                         f"stage {point.stage} ends at {ends[point.stage - 1]} (schedule.stage_lengths "
                         f"{list(source_cfg.schedule.stage_lengths)} -> {list(cfg.schedule.stage_lengths)}): keep "
                         f"the lengths of the stages before it, or give init_at={iteration}")
    if iteration >= ends[-1]:
        raise ValueError(f"init_at={cfg.init_at} is iteration {iteration}, but this branch's schedule ends at "
                         f"iteration {ends[-1]} (schedule.stage_lengths): nothing would be trained")
    return BranchPoint(source, iteration, checkpoint_path(run.checkpoints, iteration))
