"""The run's clock, its three stages, and the quantities scheduled on (stage, step within the stage).

The authors run the three stages as three separate threestudio runs (train.sh: stage 2 and 3 start from the
previous stage's weights with ``system.weights=<ckpt>``), so every counter restarts at 0 in each stage:
Lightning's step, every ``C()`` ramp, every ``resolution_milestones`` entry. Our trainer runs one loop; a
:class:`Moment` carries both the global iteration (checkpoints, logs) and the stage-local step that every
scheduled quantity reads, so a config states a value the way the authors' stage file states it.

A :class:`Clock` is the iteration a run is at. The trainer advances it at the start of every iteration;
everything whose value depends on the iteration reads it through a :class:`Scheduled` quantity, so no
caller writes a per-step value onto a module and a model rebuilt from a checkpoint gets the value of its
iteration by setting the clock once (``fourdfy.build.load_run``).

A scheduled value is written in a config as (:func:`StageSchedule.parse`):
  * a number: that value at every step of every stage;
  * ``[start_step, start_value, end_value, end_step]``: threestudio's ``C()`` ramp on the stage-local step,
    the same in every stage (``start_value`` up to ``start_step``, linear to ``end_value`` at ``end_step``);
  * ``[stage1, stage2, stage3]``: one of the two forms above per stage (three entries, never four, so the
    forms cannot be confused).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

N_STAGES = 3


@dataclass(frozen=True)
class Moment:
    """Where an iteration is: the 0-based global iteration, its stage (1-3) and its 0-based step in that stage
    (what the authors' per-stage run would call ``global_step``)."""

    iteration: int
    stage: int
    stage_step: int


class Stages:
    """The three stages' lengths; maps a global iteration to its :class:`Moment`. A stage may have length 0."""

    def __init__(self, lengths: Sequence[int]) -> None:
        if len(lengths) != N_STAGES or any(int(n) < 0 for n in lengths):
            raise ValueError(f"stage lengths must be three non-negative integers, got {list(lengths)}")
        self.lengths = tuple(int(n) for n in lengths)
        ends, total = [], 0
        for n in self.lengths:
            total += n
            ends.append(total)
        self.ends = tuple(ends)  # global iteration after each stage's last one
        self.starts = (0, *self.ends[:-1])

    @property
    def total(self) -> int:
        return self.ends[-1]

    def at(self, iteration: int) -> Moment:
        """The moment of a 0-based global iteration (ValueError past the end)."""
        for stage, (start, end) in enumerate(zip(self.starts, self.ends, strict=True), start=1):
            if iteration < end:
                return Moment(iteration, stage, iteration - start)
        raise ValueError(f"iteration {iteration} is past the schedule's end ({self.total})")

    def first_stage(self) -> int:
        """The first stage with iterations."""
        return next(s for s, n in enumerate(self.lengths, start=1) if n > 0)


class Clock:
    """The 0-based global iteration being run (advanced by the trainer; read by scheduled quantities).

    stages: the run's stages, which give the stage-local step; None treats the whole run as one stage 1
    (fields used outside training).
    """

    def __init__(self, stages: Stages | None = None, iteration: int = 0) -> None:
        self.stages = stages
        self.iteration = iteration

    def moment(self) -> Moment:
        if self.stages is None:
            return Moment(self.iteration, 1, self.iteration)
        return self.stages.at(min(self.iteration, max(self.stages.total - 1, 0)))


@dataclass(frozen=True)
class LinearRamp:
    """``start_value`` up to ``start_iteration``, then linear to ``end_value`` over ``n_steps``, then held.

    threestudio's ``C()`` of ``[start_step, start_value, end_value, end_step]``, written as a typed object
    (``start_iteration`` = start_step, ``n_steps`` = end_step − start_step).
    """

    start_value: float
    end_value: float
    start_iteration: int  # the last step that still has start_value
    n_steps: int  # steps from start_value to end_value; 0 jumps straight to end_value

    @classmethod
    def constant(cls, value: float) -> LinearRamp:
        return cls(float(value), float(value), 0, 0)

    def at(self, iteration: int) -> float:
        """The value at a 0-based step."""
        into = iteration - self.start_iteration
        if into <= 0:
            return self.start_value
        if self.n_steps == 0:
            return self.end_value
        frac = min(1.0, into / self.n_steps)
        return self.start_value + frac * (self.end_value - self.start_value)

    def breakpoints(self) -> tuple[int, ...]:
        """Steps where the value starts or stops changing (for the timeline)."""
        return () if self.start_value == self.end_value else (self.start_iteration, self.start_iteration + self.n_steps)


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _per_stage_lists(spec: Any) -> bool:
    """True for ``[[...], [...], [...]]``: one list per stage."""
    return _is_list(spec) and len(spec) == N_STAGES and all(_is_list(s) for s in spec)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ramp(spec: Any, key: str) -> LinearRamp:
    if _is_number(spec):
        return LinearRamp.constant(spec)
    if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == 4 and all(map(_is_number, spec)):
        start_step, start_value, end_value, end_step = spec
        if int(start_step) != start_step or int(end_step) != end_step or end_step <= start_step:
            raise ValueError(f"{key}: a ramp [start_step, start_value, end_value, end_step] needs integer steps "
                             f"with end_step > start_step, got {list(spec)}")
        return LinearRamp(float(start_value), float(end_value), int(start_step), int(end_step - start_step))
    raise ValueError(f"{key}: expected a number or a ramp [start_step, start_value, end_value, end_step], "
                     f"got {spec!r}")


@dataclass(frozen=True)
class StageSchedule:
    """A scalar as a function of (stage, stage-local step): one ramp per stage."""

    ramps: tuple[LinearRamp, LinearRamp, LinearRamp]

    @classmethod
    def parse(cls, spec: Any, key: str) -> StageSchedule:
        """From a config value (module docstring: a number, a ramp, or three of those); errors name ``key``."""
        if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == N_STAGES:
            return cls(tuple(_ramp(s, f"{key}[{i}]") for i, s in enumerate(spec)))  # type: ignore[arg-type]
        ramp = _ramp(spec, key)
        return cls((ramp, ramp, ramp))

    @classmethod
    def constant(cls, value: float) -> StageSchedule:
        ramp = LinearRamp.constant(value)
        return cls((ramp, ramp, ramp))

    def at(self, moment: Moment) -> float:
        return self.ramps[moment.stage - 1].at(moment.stage_step)

    def breakpoints(self, stage: int) -> tuple[int, ...]:
        return self.ramps[stage - 1].breakpoints()

    def values(self) -> list[float]:
        """Every start and end value (range checks)."""
        return [v for r in self.ramps for v in (r.start_value, r.end_value)]


@dataclass(frozen=True)
class StageSteps:
    """A value that steps at stage-local milestones, per stage (the authors' ``[v0, v1]`` lists with
    ``resolution_milestones``): ``values[stage-1][number of milestones <= stage_step]``."""

    values: tuple[tuple[Any, ...], ...]
    milestones: tuple[tuple[int, ...], ...]

    @classmethod
    def parse(cls, values: Any, milestones: Any, key: str, milestones_key: str) -> StageSteps:
        """values: a value (every phase), a list per milestone phase, or three of those lists (one per stage);
        milestones: a list of stage-local steps, or three such lists."""
        vals = [list(v) for v in values] if _per_stage_lists(values) else [values] * N_STAGES
        miles = [list(m) for m in milestones] if _per_stage_lists(milestones) else [list(milestones)] * N_STAGES
        # A bare value holds in every phase.
        vals = [v if _is_list(v) else [v] * (len(m) + 1) for v, m in zip(vals, miles, strict=True)]
        for stage, (v, m) in enumerate(zip(vals, miles, strict=True), start=1):
            if list(m) != sorted(set(m)) or any(int(s) != s or s < 0 for s in m):
                raise ValueError(f"{milestones_key} (stage {stage}): milestones must be increasing non-negative "
                                 f"stage-local steps, got {m}")
            if len(v) != len(m) + 1:
                raise ValueError(f"{key} (stage {stage}) {v} needs one more entry than {milestones_key} {m}: a value "
                                 "before the first milestone and one after each")
        return cls(tuple(tuple(v) for v in vals), tuple(tuple(int(s) for s in m) for m in miles))

    def at(self, moment: Moment) -> Any:
        stage = moment.stage - 1
        return self.values[stage][bisect.bisect_right(self.milestones[stage], moment.stage_step)]

    def breakpoints(self, stage: int) -> tuple[int, ...]:
        return self.milestones[stage - 1]

    def all_values(self) -> list[Any]:
        return [v for stage in self.values for v in stage]


@dataclass(frozen=True)
class Scheduled:
    """A stage schedule read at the clock's moment: ``value()`` is what the quantity is now."""

    schedule: StageSchedule
    clock: Clock

    def value(self) -> float:
        return self.schedule.at(self.clock.moment())
