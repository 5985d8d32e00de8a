"""The optimisation loop: render -> guidance -> step, with checkpoints that resume bit-for-bit.

One iteration: the clock moves to it; the hybrid schedule draws the update kind; cameras, frame times and the
background are sampled for that prior (fourdfy/sampling.py: 4 views 90° apart for 3D, one view for IMG, one
camera × 16 frames for VID); the field is rendered at the size the prior asks for at that step
(render_size); the prior's loss plus the regularisers (fourdfy/losses.py) is back-propagated into the
parameter groups that this kind trains; then the prior takes its own fine-tuning step (VSD's LoRA; a no-op
for priors without trainable state). All randomness of the loop comes from one generator (and each prior's
own), whose states are checkpointed, so a killed run restarted in the same directory continues exactly.

The trainer keeps the loop, the NaN guard, checkpoints and signals; ``fourdfy.build.build_trainer`` assembles it.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fourdfy.checkpoint import link_checkpoint, load_checkpoint, load_latest_checkpoint, save_checkpoint
from fourdfy.clock import Clock, Moment, StageSchedule
from fourdfy.fields.deformation import deformation_tv
from fourdfy.fields.field4d import Field4D
from fourdfy.guidance.base import Guidance
from fourdfy.hybrid import HybridSchedule
from fourdfy.kinds import ParamGroup, UpdateKind
from fourdfy.logs import get_logger
from fourdfy.losses import regularisers
from fourdfy.preemption import checkpoint_on_signal
from fourdfy.render.volume import MarchingMode, Renderer
from fourdfy.rundir import RunDir
from fourdfy.sampling import StepSampler
from fourdfy.tracking import Logger, NullLogger

log = get_logger(__name__)


@dataclass
class TrainerConfig:
    """Loop settings: frame times, regulariser weights, optimiser, checkpoints, occupancy-grid updates."""

    n_frames: int = 16  # time grid: frame k at t0 + k/16, t0 ~ U(0, 1/16) (authors' data config)
    # Stages whose 3D/IMG steps render time 0: configs/fourdfy_stage_{1,2}.yaml data.single_view.static: true
    # (the time input is 0 there); stage 3 (static: false) renders one of the 16 frame times.
    static_stages: list[int] = dc_field(default_factory=lambda: [1, 2])
    static_prior_time: float | None = None  # None: as static_stages says (authors); a number: always render
    # 3D/IMG steps at that time, in every stage (the toy priors' data exist only at t = 0)
    # Regulariser weights as functions of (stage, stage-local step) (fourdfy/clock.py StageSchedule: a number,
    # a ramp [start_step, start_value, end_value, end_step], or three of those, one per stage).
    lambda_sparsity: Any = 10.0  # configs/fourdfy_stage_{1,2,3}.yaml system.loss.lambda_sparsity: 10.
    # Binary entropy of the opacity: system.loss.lambda_opaque: [10000, 0.0, 1000.0, 10001] in all three stage
    # files, on each stage's own step: never in stage 1 (10k steps), from step 10,001 of stages 2 and 3.
    lambda_opacity_entropy: Any = dc_field(default_factory=lambda: [10000, 0.0, 1000.0, 10001])
    # TV of the rendered deformation Δ over a video step's frames, rows and columns (field.dynamic=deformation
    # only): system.loss.lambda_deformation, 0. in the stage-1/2 files, 100. in configs/fourdfy_stage_3_vc_
    # deformation.yaml (fourdfy/fields/deformation.py deformation_tv).
    lambda_deformation: Any = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)  # optimizer.args.betas
    adam_eps: float = 1e-15  # optimizer.args.eps
    weight_decay: float = 0.01  # torch AdamW default, which the authors' configs leave in place
    checkpoint_every: int = 500  # iterations between checkpoints (also saved at every stage end)
    keep_checkpoints: int = 3  # newest checkpoints kept on disk, besides the stage ends (kept for branching)
    log_every: int = 10  # iterations between scalar logs
    progress_bar: bool = True  # tqdm bar with stage, update kind, loss, it/s, ETA
    # Occupancy grid (only with renderer.occupancy_grid=true): all-occupied (dense marching) for the first
    # occupancy_warmup iterations, then rebuilt before the render of iteration occupancy_warmup, of every
    # multiple of occupancy_every and of the first iteration of each stage (the times to cover change there).
    occupancy_every: int = 16  # iterations between grid updates (nerfacc update_every_n_steps n=16, threestudio)
    # Iterations of dense marching before the first update: a project choice (the field is still the density
    # blob then). nerfacc rebuilds from step 0; its warmup_steps=256 only means probing every cell, as every
    # update here does.
    occupancy_warmup: int = 256
    occupancy_times: int = 17  # times probed over [0, 1]: 1/16 apart like the frames (authors' data config) + t=1

    def validate(self) -> None:
        """Raise ValueError naming the key for a value out of range."""
        if self.n_frames < 1:
            raise ValueError(f"trainer.n_frames must be >= 1, got {self.n_frames}")
        if any(s not in (1, 2, 3) for s in self.static_stages):
            raise ValueError(f"trainer.static_stages must list stages among 1, 2, 3, got {self.static_stages}")
        for key in ("lambda_sparsity", "lambda_opacity_entropy", "lambda_deformation"):
            if any(v < 0 for v in self.loss_weight(key).values()):
                raise ValueError(f"trainer.{key} must stay >= 0, got {getattr(self, key)}")
        if self.static_prior_time is not None and not 0.0 <= self.static_prior_time <= 1.0:
            raise ValueError(f"trainer.static_prior_time must be in [0, 1] or null, got {self.static_prior_time}")
        if self.checkpoint_every < 1:
            raise ValueError(f"trainer.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"trainer.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.occupancy_every < 1:
            raise ValueError(f"trainer.occupancy_every must be >= 1 (iterations between grid updates), "
                             f"got {self.occupancy_every}")
        if self.occupancy_warmup < 0:
            raise ValueError(f"trainer.occupancy_warmup must be >= 0, got {self.occupancy_warmup}")
        if self.occupancy_times < 2:
            raise ValueError(f"trainer.occupancy_times must be >= 2 (t = 0 and t = 1 at least), "
                             f"got {self.occupancy_times}")

    def loss_weight(self, key: str) -> StageSchedule:
        """The stage schedule of a ``lambda_*`` regulariser weight (ValueError naming the key)."""
        return StageSchedule.parse(getattr(self, key), f"trainer.{key}")


Callback = Callable[["Trainer", int], None]


class Trainer:
    """Runs the hybrid SDS schedule on a field. Built by ``fourdfy.build.build_trainer``.

    Args:
        field: Field4D (or anything with the same call and ``param_groups()``).
        background: module directions [N,3] -> rgb [N,3]; trained with the heads.
        renderer: renders the field (and owns the occupancy grid, if any).
        guidances: update kind -> Guidance; kinds the schedule never draws may be absent.
        schedule: which kind each iteration makes, what it trains, at what learning rate.
        sampler: draws each step's cameras, frame times and background.
        clock: advanced to each iteration before anything is computed; scheduled quantities read it.
        run: the run directory: checkpoints/ and log.jsonl go there; a checkpoint there is resumed from.
        logger: where scalars go besides log.jsonl (set after construction by ``generate``).
        callbacks: called as ``cb(trainer, iteration)`` after every iteration (tests, hooks).
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        field: nn.Module,
        background: nn.Module,
        renderer: Renderer,
        guidances: dict[UpdateKind, Guidance],
        schedule: HybridSchedule,
        sampler: StepSampler,
        clock: Clock,
        prompt: str,
        run: RunDir,
        seed: int = 0,
        logger: Logger | None = None,
        callbacks: list[Callback] | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.field, self.background, self.renderer = field, background, renderer
        self.guidances = {UpdateKind(kind): g for kind, g in guidances.items()}  # "3d" keys are accepted too
        self.schedule, self.sampler, self.clock = schedule, sampler, clock
        self.prompt = prompt
        self.run = run
        self.logger = logger or NullLogger()
        self.callbacks = list(callbacks or [])
        missing = self.schedule.kinds_used() - set(self.guidances)
        if missing:
            raise ValueError(f"the schedule draws {sorted(map(str, missing))} updates but no guidance was given for "
                             f"them (have: {sorted(map(str, self.guidances))})")
        video = self.guidances.get(UpdateKind.VIDEO)
        if video is not None and video.n_views != cfg.n_frames:
            raise ValueError(f"the video prior renders {video.n_views} frames but trainer.n_frames is {cfg.n_frames}; "
                             "set trainer.n_frames to match (checked now, not at the first video step)")
        self.groups = field.param_groups()
        self.groups[ParamGroup.HEADS] = self.groups[ParamGroup.HEADS] + list(background.parameters())
        self.loss_weights = {"sparsity": cfg.loss_weight("lambda_sparsity"),
                             "opacity_entropy": cfg.loss_weight("lambda_opacity_entropy"),
                             "deformation": cfg.loss_weight("lambda_deformation")}
        lrs = schedule.lr(schedule.stages.first_stage())
        self.optimizer = torch.optim.AdamW(
            # Group names as plain strings: the optimiser's state dict goes into checkpoints.
            [{"params": params, "lr": lrs[name], "name": name.value} for name, params in self.groups.items()],
            betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
        )
        self.device = next(field.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)
        self.iteration = 0  # next iteration to run
        self.skipped_steps = 0  # non-finite losses or gradients, never applied

    # ------------------------------------------------------------------------------------------
    # State

    @property
    def run_dir(self) -> Path:
        return self.run.path

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "field": self.field.state_dict(),
            "background": self.background.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "guidance": {kind.value: g.state_dict() for kind, g in self.guidances.items()},
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "skipped_steps": self.skipped_steps,
            "renderer": self.renderer.state_dict(),  # the occupancy grid ({} without one)
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = state["iteration"]
        # The last iteration run: what a run resumed at its very end exports with (the blob std).
        self.clock.iteration = max(self.iteration - 1, 0)
        self.field.load_state_dict(state["field"])
        self.background.load_state_dict(state["background"])
        self.optimizer.load_state_dict(state["optimizer"])
        # The checkpoint's param groups carry their hyper-parameters; this run's config wins (a branch may change
        # them; on a resume they are equal). Learning rates are set by the schedule at every step.
        for group in self.optimizer.param_groups:
            group.update(betas=self.cfg.adam_betas, eps=self.cfg.adam_eps, weight_decay=self.cfg.weight_decay)
        for kind, g in self.guidances.items():
            g.load_state_dict(state["guidance"][kind])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.skipped_steps = state["skipped_steps"]
        # Checkpoints from before the grid was wired in have no entry; they all come from grid-off runs.
        self.renderer.load_state_dict(state.get("renderer", {}))

    def save(self) -> Path:
        # Stage ends are never pruned: runs branch from them (fourdfy/branch.py).
        return save_checkpoint(self.run.checkpoints, self.iteration, self.state_dict(), self.cfg.keep_checkpoints,
                               protected=tuple(self.schedule.stage_ends))

    def try_resume(self) -> bool:
        """Load the newest valid checkpoint of the run directory, if any. True when resumed."""
        found = load_latest_checkpoint(self.run.checkpoints)
        if found is None:
            return False
        self.load_state_dict(found[0])
        self.run.truncate_log(self.iteration)  # rows past the checkpoint are about to be written again
        return True

    def start_branch(self, checkpoint: Path) -> None:
        """Begin from another run's checkpoint (fourdfy/branch.py): its whole state, then this run's config.

        The checkpoint is linked into this run's checkpoints/ first, so from here on the branch resumes from
        its own directory (``try_resume``) and no longer needs its source.
        """
        state = load_checkpoint(checkpoint)
        if state is None:
            raise ValueError(f"checkpoint {checkpoint} is incomplete or corrupted (hash mismatch); branch from "
                             "another init_at")
        link_checkpoint(checkpoint, self.run.checkpoints)
        self.load_state_dict(state)

    # ------------------------------------------------------------------------------------------
    # One iteration

    def _occupancy_times(self, stage: int) -> torch.Tensor:
        """[T] times the occupancy grid must cover in ``stage``: every time that stage can render at.

        Video steps render t0 + k/F for any t0 in [0, 1/F), i.e. anywhere in [0, 1), and so do 3D/IMG steps
        without trainer.static_prior_time; the dynamic grid moves the object there in stage 3, and even while
        it is frozen (stages 1-2) its initial values make the density depend on t a little. Those stages are
        probed at occupancy_times evenly spaced times; a stage that only renders static_prior_time is probed
        at that one time. Between probe times, the grid's dilation covers motion of up to a cell.
        """
        probs = self.schedule.probabilities(stage)
        static_time = self.static_time(stage)
        times = []
        if probs[UpdateKind.VIDEO] > 0 or static_time is None:
            times += torch.linspace(0.0, 1.0, self.cfg.occupancy_times).tolist()
        if static_time is not None and (probs[UpdateKind.MULTIVIEW] > 0 or probs[UpdateKind.IMAGE] > 0):
            times.append(static_time)
        return torch.tensor(sorted(set(times)))  # static_time may be a linspace time

    def static_time(self, stage: int) -> float | None:
        """The time 3D/IMG steps of ``stage`` render at; None: one of the frame times (fourdfy/sampling.py)."""
        if self.cfg.static_prior_time is not None:
            return self.cfg.static_prior_time
        return 0.0 if stage in self.cfg.static_stages else None

    def start_stage(self) -> None:
        """A fresh optimiser state for the field and every prior, as the authors' next stage run has
        (schedule.reset_optimizer_at_stage_start). Learning rates are set per step, so only the state goes."""
        self.optimizer.state.clear()
        for g in self.guidances.values():
            g.reset_optimizer()

    def _update_occupancy(self, moment: Moment) -> None:
        """Update the renderer's occupancy grid (if it has one) when this is an update iteration.

        renderer.marching=authors: nerfacc's EMA update every occupancy_every steps of each stage from its
        step 0 (each stage is a new run for the authors: the warm-up of renderer.authors.grid_warmup restarts
        too), probing at random cells/points/times drawn from the trainer's generator (checkpointed, so resume
        stays exact). uniform: a full rebuild after trainer.occupancy_warmup global iterations, at every multiple
        of occupancy_every and at each stage start; no random numbers.
        """
        if self.renderer.occupancy is None:
            return
        it, stage = moment.iteration, moment.stage
        if MarchingMode(self.renderer.cfg.marching) is MarchingMode.authors:
            if moment.stage_step % self.cfg.occupancy_every == 0:
                self.renderer.update_occupancy(self.field, self._occupancy_times(stage), device=self.device,
                                               iteration=moment.stage_step, generator=self.generator)
            return
        if it < self.cfg.occupancy_warmup:
            return
        stage_start = it in (0, *self.schedule.stage_ends)
        if it % self.cfg.occupancy_every == 0 or it == self.cfg.occupancy_warmup or stage_start:
            self.renderer.update_occupancy(self.field, self._occupancy_times(stage), device=self.device)

    def _grads_finite(self) -> bool:
        return all(p.grad is None or torch.isfinite(p.grad).all() for g in self.groups.values() for p in g)

    def step(self) -> dict[str, float]:
        """Run iteration ``self.iteration``; returns its scalars."""
        it = self.iteration
        self.clock.iteration = it  # before anything reads a scheduled quantity (the field's blob std)
        moment: Moment = self.schedule.moment(it)
        stage = moment.stage
        if self.schedule.cfg.reset_optimizer_at_stage_start and self.schedule.is_stage_start(it):
            self.start_stage()
        kind = UpdateKind(self.schedule.kind(it, self.generator))
        guidance = self.guidances[kind]
        trainable = self.schedule.trainable(kind, stage)
        lrs = self.schedule.lr(stage)
        for group in self.optimizer.param_groups:
            group["lr"] = lrs[group["name"]]
        for name, params in self.groups.items():
            for p in params:  # frozen groups get no gradient at all: AdamW then leaves them untouched
                p.requires_grad_(trainable[name])
        # After the clock: the grid sees the field this iteration renders.
        self._update_occupancy(moment)

        # Random draws stay on the CPU generator (exact resume); tensors then go to the field's device.
        # MVDream: 8 views (two groups of 4) and 64² renders in the first 5000 steps of stage 1 (authors).
        n_groups = guidance.batch_size(moment) // guidance.n_views
        inputs = self.sampler.sample(guidance.n_views, guidance.is_video, self.background, self.generator,
                                     static_time=self.static_time(stage), n_groups=n_groups)
        inputs = inputs.to(self.device)
        h, w = guidance.render_size(moment)
        weights = {name: schedule.at(moment) for name, schedule in self.loss_weights.items()}
        # The rendered deformation map of a video step, for its TV (the authors' lambda_deformation).
        deforms = guidance.is_video and weights["deformation"] > 0 and isinstance(self.field, Field4D) \
            and self.field.deformation is not None
        out = self.renderer.render(self.field, inputs.cameras, inputs.times, h, w, background=inputs.background,
                                   generator=self.generator, train=True,
                                   aux=self.field.displacement if deforms else None)
        g_out = guidance(out["rgb"], self.prompt, inputs.cameras, inputs.times, moment)
        losses = {"guidance": g_out.loss, **regularisers(out["opacity"], weights["sparsity"],
                                                         weights["opacity_entropy"])}
        if deforms:
            losses["deformation"] = weights["deformation"] * deformation_tv(out["aux"])
        loss = sum(losses.values())

        self.optimizer.zero_grad(set_to_none=True)
        applied = bool(torch.isfinite(loss))
        if applied:
            loss.backward()
            applied = self._grads_finite()
        if applied:
            self.optimizer.step()
            # Every prior's own trainable state (VSD's LoRA) learns from this step's renders; {} for priors
            # without any. The latents of this call are handed over so they are not encoded twice.
            g_out.stats.update(guidance.finetune_step(out["rgb"].detach(), self.prompt, inputs.cameras, moment,
                                                      latents=g_out.latents))
        else:  # NaN/Inf: never written into the field; counted and logged
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        return {
            "iteration": it, "stage": stage, "stage_step": moment.stage_step, "kind": kind.value,
            "loss": float(loss.detach()),
            **{f"loss/{name}": float(v.detach()) for name, v in losses.items()},
            **{f"{kind}/{k}": v for k, v in g_out.stats.items()},
            **{f"lr/{name}": v for name, v in lrs.items()},
            "skipped_steps": self.skipped_steps,
        }

    # ------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> None:
        """Train from the current iteration to the end of the schedule, checkpointing as configured."""
        total = self.schedule.total_iterations
        stage_ends = set(self.schedule.stage_ends)
        log_path = self.run.log
        self.run.path.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=total, initial=self.iteration, disable=not self.cfg.progress_bar, dynamic_ncols=True,
                   desc="fourdfy")
        start = time.perf_counter()
        # SLURM warns with SIGUSR2 before the time limit: save, then let submitit requeue (preemption.py).
        with open(log_path, "a") as log_file, checkpoint_on_signal(signal.SIGUSR2) as stop_signal:
            while self.iteration < total:
                if self.iteration in (0, *self.schedule.stage_ends[:-1]) and self.schedule.stage_lengths[
                        self.schedule.stage(self.iteration) - 1] > 0:
                    log.info("stage %d starts at iteration %d", self.schedule.stage(self.iteration), self.iteration)
                scalars = self.step()
                it = scalars["iteration"]
                bar.update(1)
                bar.set_postfix(stage=scalars["stage"], kind=scalars["kind"], loss=f"{scalars['loss']:.4g}")
                if it % self.cfg.log_every == 0 or self.iteration == total:
                    scalars["time_s"] = time.perf_counter() - start
                    log_file.write(json.dumps(_jsonable(scalars)) + "\n")
                    log_file.flush()
                    self.logger.log({k: v for k, v in scalars.items() if isinstance(v, (int, float))}, step=it)
                saved = self.iteration % self.cfg.checkpoint_every == 0 or self.iteration in stage_ends
                if saved:
                    self.save()
                for callback in self.callbacks:
                    callback(self, it)
                if stop_signal.requested:
                    if not saved:
                        self.save()
                    log.info("caught %s: saved a checkpoint at iteration %d; handing the signal over",
                             stop_signal.signum.name, self.iteration)
                    stop_signal.hand_over()
        bar.close()


def _jsonable(scalars: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in scalars.items()}
