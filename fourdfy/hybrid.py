"""Algorithm 1 of the paper as data: which update each iteration makes, what it trains, at what rate.

Three stages (paper §4, Algorithm 1; lengths and probabilities from the authors' configs):
  stage 1: 3D (MVDream SDS) only; the dynamic grid is frozen.
  stage 2: 3D with probability p_3d, else IMG (VSD with SD 2.1).
  stage 3: 3D with p_3d, IMG with (1 − p_3d)·p_img, VID otherwise. The paper's wording gives IMG
           p_3d·p_img, which with p_3d = p_img = 0.5 equals the code's (1 − p_3d)·p_img; the code's form
           is the one that sums to one for other values, and the one the authors confirmed.
The dynamic grid is trained only by VID updates; in stage 3 the static grid's learning rate drops.
Every stage counts its own steps (fourdfy/clock.py Moment): the authors run each stage as a new run.
Every Table-2 ablation is a setting of this one schedule (see conf/variant/).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fourdfy.clock import N_STAGES, LinearRamp, Moment, Stages, StageSchedule
from fourdfy.kinds import UPDATE_KINDS, ParamGroup, UpdateKind

MULTIVIEW, IMAGE, VIDEO = UpdateKind.MULTIVIEW, UpdateKind.IMAGE, UpdateKind.VIDEO


@dataclass
class ScheduleConfig:
    """The hybrid SDS schedule (paper §4 Algorithm 1 and §5; the authors' configs/fourdfy_stage_{1,2,3}.yaml)."""

    stage_lengths: list[int] = field(default_factory=lambda: [10000, 25000, 100000])  # code; paper: 10k/10k/100k
    p_3d: float = 0.5  # P_3D, probability of a 3D-aware update (paper Alg. 1)
    p_img: float = 0.5  # P_IMG; 0 removes the image prior (the "w/o VSD" ablation)
    stage3_video_only: bool = False  # True: stage 3 makes only VID updates (the "w/o hybrid SDS" ablation)
    # True: stages 1-2 are skipped and stage 3 runs alone, for stage 3's length with stage 3's recipe ("w/o 3D/IMG"
    # ablation; paper §4.3: it "skips the first two stages").
    skip_stages_1_2: bool = False
    # A fresh AdamW (zero moments, step count 0) at the start of stages 2 and 3, for the field and for every
    # prior's own optimiser (VSD's LoRA): the authors start each stage as a new run from the previous stage's
    # weights only (train.sh `system.weights=<ckpt>`), which builds a new optimiser.
    reset_optimizer_at_stage_start: bool = True
    # True: in stage 3 only the dynamic part (grid or deformation) trains, on every update kind; the static grid,
    # heads and background are frozen (authors' system.freeze_static_modules in configs/fourdfy_stage_3_vc*.yaml:
    # threestudio/systems/fourdfy.py on_fit_start freezes every parameter, then set_temp_param_grad(True) unfreezes
    # the temporal ones in video and in 3D/image steps alike).
    freeze_static_modules: bool = False
    lr_static: float = 0.01  # static hash grid (paper §5)
    lr_static_stage3: float = 1e-4  # static grid from stage 3 on (authors' stage-3 config)
    lr_dynamic: float = 0.01  # dynamic hash grid
    lr_heads: float = 1e-3  # MLP heads and background
    # Density blob std annealed from field.heads.blob_std to this over the first blob_anneal_steps of stage 3
    # (configs/fourdfy_stage_3.yaml geometry.anneal_density_blob_std_config: min_anneal_step 0,
    # max_anneal_step 50000, end_val 5.0; stage-local steps).
    blob_std_stage3_end: float = 5.0
    blob_anneal_steps: int = 50000

    def validate(self) -> None:
        """Errors name the key and the fix; called before any work."""
        if len(self.stage_lengths) != N_STAGES or any(n < 0 for n in self.stage_lengths):
            raise ValueError(f"schedule.stage_lengths must be three non-negative integers, got {self.stage_lengths}")
        if sum(self.stage_lengths) == 0:
            raise ValueError("schedule.stage_lengths are all 0: nothing to train")
        for key in ("p_3d", "p_img"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"schedule.{key} must be a probability in [0, 1], got {value}")
        for key in ("lr_static", "lr_static_stage3", "lr_dynamic", "lr_heads"):
            if getattr(self, key) < 0:
                raise ValueError(f"schedule.{key} must be >= 0, got {getattr(self, key)}")
        if self.blob_anneal_steps < 0:
            raise ValueError(f"schedule.blob_anneal_steps must be >= 0, got {self.blob_anneal_steps}")
        if self.skip_stages_1_2 and self.stage_lengths[2] == 0:
            raise ValueError("schedule.skip_stages_1_2 runs stage 3 alone, but schedule.stage_lengths[2] is 0; "
                             "give stage 3 iterations")
        early = 0 if self.skip_stages_1_2 else self.stage_lengths[0] + self.stage_lengths[1]
        if early > 0 and self.p_3d == 0 and self.p_img == 0:
            raise ValueError(
                "stages 1-2 need the 3D or the image prior, but schedule.p_3d = schedule.p_img = 0; "
                "set schedule.skip_stages_1_2 (as the no_image_guidance variant does), set their stage_lengths "
                "to 0, or raise a probability"
            )


class HybridSchedule:
    """Decides, per iteration, the update kind, the trainable parameter groups and the learning rates."""

    def __init__(self, cfg: ScheduleConfig):
        cfg.validate()
        self.cfg = cfg
        s1, s2, s3 = cfg.stage_lengths
        if cfg.skip_stages_1_2:  # stage 3 alone, its own length (paper §4.3)
            s1, s2 = 0, 0
        self.stages = Stages((s1, s2, s3))
        self.stage_lengths = self.stages.lengths
        self.stage_ends = self.stages.ends

    @property
    def total_iterations(self) -> int:
        return self.stages.total

    def stage(self, iteration: int) -> int:
        """1, 2 or 3 for a 0-based iteration."""
        return self.stages.at(iteration).stage

    def moment(self, iteration: int) -> Moment:
        """The stage and stage-local step of a 0-based global iteration."""
        return self.stages.at(iteration)

    def is_stage_start(self, iteration: int) -> bool:
        """True at the first iteration of a stage after the run's first (where the authors' next run begins)."""
        return iteration > 0 and self.stages.at(iteration).stage_step == 0

    def probabilities(self, stage: int) -> dict[UpdateKind, float]:
        """P(kind) in a stage."""
        p3, pi = self.cfg.p_3d, self.cfg.p_img
        if stage == 1:
            return {MULTIVIEW: 1.0, IMAGE: 0.0, VIDEO: 0.0} if p3 > 0 else {MULTIVIEW: 0.0, IMAGE: 1.0, VIDEO: 0.0}
        if stage == 2:
            if pi == 0:  # no image prior: stage 2 is 3D only
                return {MULTIVIEW: 1.0, IMAGE: 0.0, VIDEO: 0.0}
            return {MULTIVIEW: p3, IMAGE: 1.0 - p3, VIDEO: 0.0}
        if self.cfg.stage3_video_only:
            return {MULTIVIEW: 0.0, IMAGE: 0.0, VIDEO: 1.0}
        return {MULTIVIEW: p3, IMAGE: (1.0 - p3) * pi, VIDEO: (1.0 - p3) * (1.0 - pi)}

    def kinds_used(self) -> set[UpdateKind]:
        """The update kinds drawn with a positive probability in some stage that has iterations."""
        return {kind for stage in (1, 2, 3) if self.stage_lengths[stage - 1] > 0
                for kind, p in self.probabilities(stage).items() if p > 0}

    def kind(self, iteration: int, generator: torch.Generator) -> UpdateKind:
        """Draw this iteration's update kind. Always consumes exactly one number from ``generator``."""
        u = float(torch.rand((), generator=generator))
        probs = self.probabilities(self.stage(iteration))
        cumulative = 0.0
        for kind in UPDATE_KINDS:
            cumulative += probs[kind]
            if u < cumulative:
                return kind
        return next(k for k in reversed(UPDATE_KINDS) if probs[k] > 0)  # u ≈ 1 with rounding

    def trainable(self, kind: UpdateKind, stage: int) -> dict[ParamGroup, bool]:
        """Which parameter groups an update of this kind trains in ``stage``: the dynamic part only on VID; with
        freeze_static_modules, in stage 3 the dynamic part alone, on every kind."""
        kind = UpdateKind(kind)  # ValueError naming the valid kinds for anything else
        if self.cfg.freeze_static_modules and stage == 3:
            return {ParamGroup.STATIC: False, ParamGroup.DYNAMIC: True, ParamGroup.HEADS: False}
        return {ParamGroup.STATIC: True, ParamGroup.DYNAMIC: kind is VIDEO, ParamGroup.HEADS: True}

    def lr(self, stage: int) -> dict[ParamGroup, float]:
        """Learning rate per parameter group in a stage (constant within a stage, as in the authors' configs)."""
        static = self.cfg.lr_static_stage3 if stage == 3 else self.cfg.lr_static
        return {ParamGroup.STATIC: static, ParamGroup.DYNAMIC: self.cfg.lr_dynamic, ParamGroup.HEADS: self.cfg.lr_heads}

    def blob_std_schedule(self, start: float) -> StageSchedule:
        """Density-blob std: ``start`` (field.heads.blob_std) in stages 1-2; in stage 3 linear to
        blob_std_stage3_end over its first blob_anneal_steps (authors' stage-3 anneal_density_blob_std_config)."""
        fixed = LinearRamp.constant(start)
        return StageSchedule((fixed, fixed, LinearRamp(start_value=start, end_value=self.cfg.blob_std_stage3_end,
                                                       start_iteration=0, n_steps=self.cfg.blob_anneal_steps)))
