"""The run's clock and the quantities scheduled on it.

A :class:`Clock` is the iteration a run is at. The trainer advances it at the start of every iteration;
everything whose value depends on the iteration reads it through a :class:`Scheduled` quantity, so no
caller writes a per-step value onto a module and a model rebuilt from a checkpoint gets the value of its
iteration by setting the clock once (``fourdfy.build.load_run``).
"""

from __future__ import annotations

from dataclasses import dataclass


class Clock:
    """The 0-based global iteration being run (advanced by the trainer; read by scheduled quantities)."""

    def __init__(self, iteration: int = 0) -> None:
        self.iteration = iteration


@dataclass(frozen=True)
class LinearRamp:
    """``start_value`` up to ``start_iteration``, then linear to ``end_value`` over ``n_steps``, then held.

    The form of the authors' ramps (threestudio ``C()`` of ``[start_step, start_value, end_value, end_step]``),
    written as a typed object instead of a 4-element list.
    """

    start_value: float
    end_value: float
    start_iteration: int  # the last iteration that still has start_value
    n_steps: int  # iterations from start_value to end_value; 0 jumps straight to end_value

    def at(self, iteration: int) -> float:
        """The value at a 0-based global iteration."""
        into = iteration - self.start_iteration
        if into <= 0:
            return self.start_value
        if self.n_steps == 0:
            return self.end_value
        frac = min(1.0, into / self.n_steps)
        return self.start_value + frac * (self.end_value - self.start_value)


@dataclass(frozen=True)
class Scheduled:
    """A ramp read at the clock's iteration: ``value()`` is what the quantity is now."""

    ramp: LinearRamp
    clock: Clock

    def value(self) -> float:
        return self.ramp.at(self.clock.iteration)
