"""Every scheduled quantity of a composed config, at the iterations where something changes.

    python -m fourdfy.timeline preset=paper [--at 0,17000] [--json]

prints, for the config ``run.py`` would run with the same overrides, the value of every quantity that depends on
the iteration — stage and stage-local step, update-kind probabilities, each prior's render size, views per 3D
step, t ranges, loss weights, blob std, learning rates, occupancy-grid state, optimiser resets — at the stage
boundaries, at every milestone of every schedule ±1, and at the iterations asked for. Iterations are global and
0-based, as the trainer counts them. The values come from the same objects the trainer and the priors read
(``HybridSchedule``, the configs' ``StageSchedule``/``StageSteps``), so the timeline cannot drift from a run.

``--json`` prints a list of ``{"iteration", "stage", "stage_step", "values": {dotted name: number}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from fourdfy.clock import Moment, StageSchedule, StageSteps
from fourdfy.config import GuidanceBackend, RunConfig, compose_run_config
from fourdfy.guidance.configs import VideoPrior
from fourdfy.hybrid import HybridSchedule
from fourdfy.kinds import UpdateKind
from fourdfy.render.volume import MarchingMode


@dataclass
class _PriorSchedules:
    """One prior's scheduled quantities: render size (h, w), renders per step, t range (fractions of T)."""

    height: StageSteps
    width: StageSteps
    n_views: StageSteps
    t_min: StageSchedule
    t_max: StageSchedule
    weight: StageSchedule


def _fixed(value: float) -> StageSteps:
    return StageSteps.parse(value, [], "", "")


def _prior_schedules(cfg: RunConfig) -> dict[UpdateKind, _PriorSchedules]:
    g = cfg.guidance
    if GuidanceBackend(g.backend) is GuidanceBackend.synthetic:
        s = g.synthetic

        def toy(size: int, n_views: int, t_min: float, t_max: float, weight: float) -> _PriorSchedules:
            const = StageSchedule.constant
            return _PriorSchedules(_fixed(size), _fixed(size), _fixed(n_views), const(t_min), const(t_max),
                                   const(weight))

        return {
            UpdateKind.MULTIVIEW: toy(s.multiview.size, s.multiview.n_views, s.multiview.t_min, s.multiview.t_max, 1.0),
            UpdateKind.IMAGE: toy(s.image.size, 1, s.image.t_min, s.image.t_max, 1.0),
            UpdateKind.VIDEO: toy(s.video.size, s.video.n_frames, s.video.t_min, s.video.t_max, s.video.loss_weight),
        }
    mv, sd = g.mvdream, g.sd_vsd
    sizes = mv.render_size_schedule()
    if VideoPrior(g.video_prior) is VideoPrior.zeroscope:  # a fixed t range (ZeroscopeGuidance.Config)
        video = g.zeroscope
        video_t = (StageSchedule.constant(video.min_step_percent), StageSchedule.constant(video.max_step_percent))
    else:  # VideoCrafter2: ramps on the stage-local step
        video = g.videocrafter2
        video_t = video.t_schedules()
    return {
        UpdateKind.MULTIVIEW: _PriorSchedules(sizes, sizes, mv.batch_size_schedule(), *mv.t_schedules(),
                                              StageSchedule.constant(mv.loss_weight)),
        UpdateKind.IMAGE: _PriorSchedules(_fixed(sd.render_size), _fixed(sd.render_size), _fixed(1), *sd.t_schedules(),
                                          StageSchedule.constant(sd.loss_weight)),
        UpdateKind.VIDEO: _PriorSchedules(_fixed(video.render_height), _fixed(video.render_width),
                                          _fixed(video.n_frames), *video_t, StageSchedule.constant(video.loss_weight)),
    }


class Timeline:
    """The scheduled quantities of one config, evaluated at any iteration."""

    def __init__(self, cfg: RunConfig) -> None:
        cfg.schedule.validate()
        cfg.trainer.validate()
        self.cfg = cfg
        self.schedule = HybridSchedule(cfg.schedule)
        self.priors = _prior_schedules(cfg)
        self.losses = {"sparsity": cfg.trainer.loss_weight("lambda_sparsity"),
                       "opacity_entropy": cfg.trainer.loss_weight("lambda_opacity_entropy")}
        self.blob_std = self.schedule.blob_std_schedule(cfg.field.heads.blob_std)

    def values(self, iteration: int) -> dict[str, float]:
        """Every scheduled quantity at a 0-based global iteration, by dotted name."""
        m: Moment = self.schedule.moment(iteration)
        probs = self.schedule.probabilities(m.stage)
        out: dict[str, float] = {f"p.{kind.value}": float(p) for kind, p in probs.items()}
        for kind, prior in self.priors.items():
            k = kind.value
            out[f"{k}.render_size"] = float(prior.height.at(m))
            if prior.width.at(m) != prior.height.at(m):
                out[f"{k}.render_width"] = float(prior.width.at(m))
            out[f"{k}.n_views"] = float(prior.n_views.at(m))
            out[f"{k}.t_min"] = prior.t_min.at(m)
            out[f"{k}.t_max"] = prior.t_max.at(m)
            out[f"loss.{k}"] = prior.weight.at(m)
        out["loss.video"] = out["loss.vid"]  # λ_video, the name the issue and the paper use
        for name, schedule in self.losses.items():
            out[f"loss.{name}"] = schedule.at(m)
        out["blob_std"] = self.blob_std.at(m)
        for group, lr in self.schedule.lr(m.stage).items():
            out[f"lr.{group.value}"] = lr
        static_time = self.static_time(m.stage)
        if static_time is not None:
            out["time.static"] = static_time  # absent: 3D/IMG steps render one of the frame times
        reset = self.cfg.schedule.reset_optimizer_at_stage_start and self.schedule.is_stage_start(iteration)
        out["optimizer.reset"] = float(reset)
        out.update(self._occupancy(iteration, m))
        return out

    def static_time(self, stage: int) -> float | None:
        """As Trainer.static_time."""
        if self.cfg.trainer.static_prior_time is not None:
            return self.cfg.trainer.static_prior_time
        return 0.0 if stage in self.cfg.trainer.static_stages else None

    def _occupancy(self, iteration: int, m: Moment) -> dict[str, float]:
        """occupancy.on: the renderer skips empty cells; occupancy.update: the grid is rebuilt before this
        iteration's render (Trainer._update_occupancy's rule)."""
        if not self.cfg.renderer.occupancy_grid:
            return {"occupancy.on": 0.0, "occupancy.update": 0.0}
        t = self.cfg.trainer
        if MarchingMode(self.cfg.renderer.marching) is MarchingMode.authors:
            # EMA grid from each stage's step 0; every cell probed below grid_warmup stage-local steps.
            return {"occupancy.on": 1.0, "occupancy.update": float(m.stage_step % t.occupancy_every == 0),
                    "occupancy.warmup": float(m.stage_step < self.cfg.renderer.authors.grid_warmup)}
        on = iteration >= t.occupancy_warmup
        update = on and (iteration % t.occupancy_every == 0 or iteration == t.occupancy_warmup
                         or iteration in (0, *self.schedule.stage_ends))
        return {"occupancy.on": float(on), "occupancy.update": float(update)}

    def key_iterations(self, extra: Sequence[int] = ()) -> list[int]:
        """Stage starts and last iterations, every milestone of every schedule ±1 (as global iterations),
        the occupancy warm-up, and ``extra``; within [0, total)."""
        stages = self.schedule.stages
        found: set[int] = set(extra)
        for stage, (start, end) in enumerate(zip(stages.starts, stages.ends, strict=True), start=1):
            if end == start:
                continue
            local: set[int] = set()
            for prior in self.priors.values():
                for steps in (prior.height, prior.width, prior.n_views):
                    local |= set(steps.breakpoints(stage))
                for schedule in (prior.t_min, prior.t_max, prior.weight):
                    local |= set(schedule.breakpoints(stage))
            for schedule in (*self.losses.values(), self.blob_std):
                local |= set(schedule.breakpoints(stage))
            milestones = {start + step + d for step in local for d in (-1, 0, 1)}
            found |= {start, end - 1} | {i for i in milestones if start <= i < end}
        if self.cfg.renderer.occupancy_grid and MarchingMode(self.cfg.renderer.marching) is MarchingMode.uniform:
            w = self.cfg.trainer.occupancy_warmup
            found |= {w - 1, w}
        elif self.cfg.renderer.occupancy_grid:
            w = self.cfg.renderer.authors.grid_warmup
            found |= {start + w + d for start, n in zip(stages.starts, stages.lengths, strict=True) if n > w
                      for d in (-1, 0)}
        return sorted(i for i in found if 0 <= i < stages.total)

    def rows(self, iterations: Sequence[int]) -> list[dict]:
        """[{"iteration", "stage", "stage_step", "values"}] for each iteration."""
        out = []
        for it in iterations:
            m = self.schedule.moment(it)
            out.append({"iteration": it, "stage": m.stage, "stage_step": m.stage_step, "values": self.values(it)})
        return out


def format_table(rows: list[dict]) -> str:
    """Quantities down, iterations across."""
    names = sorted({k for r in rows for k in r["values"]})
    header = ["iteration", *[str(r["iteration"]) for r in rows]]
    lines = [header, ["stage", *[str(r["stage"]) for r in rows]], ["stage_step", *[str(r["stage_step"]) for r in rows]]]
    for name in names:
        lines.append([name, *[_fmt(r["values"].get(name)) for r in rows]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def row(line: list[str]) -> str:
        cells = enumerate(zip(line, widths, strict=True))
        return "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in cells)

    return "\n".join(row(line) for line in lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fourdfy.timeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py (preset=paper variant=...)")
    parser.add_argument("--at", default="", help="more iterations to show, comma-separated (global, 0-based)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)
    try:
        extra = [int(v) for v in args.at.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--at takes comma-separated integers, got {args.at!r}")
    cfg = compose_run_config(list(args.overrides))
    timeline = Timeline(cfg)
    total = timeline.schedule.total_iterations
    bad = [i for i in extra if not 0 <= i < total]
    if bad:
        parser.error(f"--at iterations must be in [0, {total}) for this schedule, got {bad}")
    rows = timeline.rows(timeline.key_iterations(extra))
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
