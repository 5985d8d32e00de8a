"""The optimisation loop: render -> guidance -> step, with checkpoints that resume bit-for-bit.

One iteration: the hybrid schedule draws the update kind; cameras and frame times are sampled for
that prior (4 views 90° apart for 3D, one view for IMG, one camera × 16 frames for VID); the field
is rendered at the size the prior asks for at that step (render_size); the prior's loss plus the
regularisers is back-propagated into the parameter groups that this kind trains; after IMG updates the
VSD branch takes its own fine-tuning step. All randomness of the loop comes from one generator (and each
prior's own), whose states are checkpointed, so a killed run restarted in the same directory continues exactly.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fourdfy.checkpoint import load_latest_checkpoint, save_checkpoint
from fourdfy.guidance.base import Guidance
from fourdfy.hybrid import HybridSchedule
from fourdfy.preemption import checkpoint_on_signal
from fourdfy.render.cameras import Cameras, CameraSamplingConfig, sample_cameras, sample_video_camera
from fourdfy.render.volume import Renderer
from fourdfy.tracking import Logger, NullLogger


@dataclass
class TrainerConfig:
    """Loop settings (REFERENCE.md §Rendering, §Hybrid schedule)."""

    n_frames: int = 16  # time grid: frame k at t0 + k/16, t0 ~ U(0, 1/16) (authors' data config)
    static_prior_time: float | None = None  # None: 3D/IMG steps use one of the 16 frame times (authors);
    # a number: always render 3D/IMG steps at that time (the toy priors' data exist only at t = 0)
    lambda_sparsity: float = 10.0  # sparsity 10·mean(√(opacity² + 0.01)) (authors' loss.lambda_sparsity)
    lambda_opacity_entropy: float = 1000.0  # binary entropy of opacity from stage 2 (loss.lambda_opaque)
    adam_betas: tuple[float, float] = (0.9, 0.99)  # optimizer.args.betas
    adam_eps: float = 1e-15  # optimizer.args.eps
    weight_decay: float = 0.01  # torch AdamW default, which the authors' configs leave in place
    checkpoint_every: int = 500  # iterations between checkpoints (also saved at every stage end)
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
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
        if self.n_frames < 1:
            raise ValueError(f"trainer.n_frames must be >= 1, got {self.n_frames}")
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


Callback = Callable[["Trainer", int], None]


class Trainer:
    """Runs the hybrid SDS schedule on a field.

    Args:
        field: Field4D (or anything with the same call and ``param_groups()``).
        background: module directions [N,3] -> rgb [N,3]; trained with the heads.
        random_background_prob: probability of a random solid background colour instead of ``background``.
        guidances: update kind ("3d" / "img" / "vid") -> Guidance; kinds the schedule never draws may be absent.
        run_dir: where checkpoints/ and log.jsonl go; a checkpoint there is resumed from.
        callbacks: called as ``cb(trainer, iteration)`` after every iteration (tests, hooks).
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        field: nn.Module,
        background: nn.Module,
        renderer: Renderer,
        guidances: dict[str, Guidance],
        schedule: HybridSchedule,
        camera_cfg: CameraSamplingConfig,
        prompt: str,
        run_dir: Path,
        seed: int = 0,
        random_background_prob: float = 0.5,
        logger: Logger | None = None,
        callbacks: list[Callback] | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.field, self.background, self.renderer = field, background, renderer
        self.guidances, self.schedule, self.camera_cfg = guidances, schedule, camera_cfg
        self.prompt = prompt
        self.run_dir = Path(run_dir)
        self.random_background_prob = random_background_prob
        self.logger = logger or NullLogger()
        self.callbacks = list(callbacks or [])
        self.blob_std_start = field.blob_std
        for stage in (1, 2, 3):
            if schedule.stage_lengths[stage - 1] == 0:
                continue
            for kind, p in schedule.probabilities(stage).items():
                if p > 0 and kind not in guidances:
                    raise ValueError(f"the schedule draws {kind!r} updates in stage {stage} but no {kind!r} "
                                     f"guidance was given (have: {sorted(guidances)})")

        video = guidances.get("vid")
        if video is not None and video.n_views != cfg.n_frames:
            raise ValueError(f"the video prior renders {video.n_views} frames but trainer.n_frames is {cfg.n_frames}; "
                             "set trainer.n_frames to match (checked now, not at the first video step)")
        self.groups = field.param_groups()
        self.groups["heads"] = self.groups["heads"] + list(background.parameters())
        lrs = schedule.lr(0)
        self.optimizer = torch.optim.AdamW(
            [{"params": params, "lr": lrs[name], "name": name} for name, params in self.groups.items()],
            betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
        )
        self.device = next(field.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)
        self.iteration = 0  # next iteration to run
        self.skipped_steps = 0  # non-finite losses or gradients, never applied

    # ------------------------------------------------------------------------------------------
    # State

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "field": self.field.state_dict(),
            "background": self.background.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "guidance": {kind: g.state_dict() for kind, g in self.guidances.items()},
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "skipped_steps": self.skipped_steps,
            "renderer": self.renderer.state_dict(),  # the occupancy grid ({} without one)
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = state["iteration"]
        self.field.load_state_dict(state["field"])
        self.background.load_state_dict(state["background"])
        self.optimizer.load_state_dict(state["optimizer"])
        for kind, g in self.guidances.items():
            g.load_state_dict(state["guidance"][kind])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.skipped_steps = state["skipped_steps"]
        # Checkpoints from before the grid was wired in have no entry; they all come from grid-off runs.
        self.renderer.load_state_dict(state.get("renderer", {}))

    def save(self) -> Path:
        return save_checkpoint(self.checkpoint_dir, self.iteration, self.state_dict(), self.cfg.keep_checkpoints)

    def try_resume(self) -> bool:
        """Load the newest valid checkpoint of run_dir, if any. True when resumed."""
        found = load_latest_checkpoint(self.checkpoint_dir)
        if found is None:
            return False
        self.load_state_dict(found[0])
        self._truncate_log()
        return True

    def _truncate_log(self) -> None:
        """Drop log rows past the resumed iteration: they are about to be written again."""
        log_path = self.run_dir / "log.jsonl"
        if not log_path.exists():
            return
        kept = []
        for line in log_path.read_text().splitlines():
            try:
                if json.loads(line)["iteration"] < self.iteration:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a row torn by the kill
        tmp = log_path.with_name(f".{log_path.name}.tmp")
        tmp.write_text("".join(row + "\n" for row in kept))
        tmp.replace(log_path)

    # ------------------------------------------------------------------------------------------
    # One iteration

    def _sample_times(self, n: int, video: bool) -> torch.Tensor:
        """Frame times: t0 ~ U(0, 1/F), frame k at t0 + k/F. Image steps share one frame (or a fixed time)."""
        frames = self.cfg.n_frames
        t0 = float(torch.rand((), generator=self.generator)) / frames
        k = int(torch.randint(frames, (), generator=self.generator))
        if video:
            if n != frames:
                raise ValueError(f"the video prior wants {n} frames but trainer.n_frames is {frames}")
            return t0 + torch.arange(frames, dtype=torch.float32) / frames
        if self.cfg.static_prior_time is not None:
            return torch.full((n,), self.cfg.static_prior_time)
        return torch.full((n,), t0 + k / frames)

    def _occupancy_times(self, stage: int) -> torch.Tensor:
        """[T] times the occupancy grid must cover in ``stage``: every time that stage can render at.

        Video steps render t0 + k/F for any t0 in [0, 1/F), i.e. anywhere in [0, 1), and so do 3D/IMG steps
        without trainer.static_prior_time; the dynamic grid moves the object there in stage 3, and even while
        it is frozen (stages 1-2) its initial values make the density depend on t a little. Those stages are
        probed at occupancy_times evenly spaced times; a stage that only renders static_prior_time is probed
        at that one time. Between probe times, the grid's dilation covers motion of up to a cell.
        """
        probs = self.schedule.probabilities(stage)
        static_time = self.cfg.static_prior_time
        times = []
        if probs["vid"] > 0 or static_time is None:
            times += torch.linspace(0.0, 1.0, self.cfg.occupancy_times).tolist()
        if static_time is not None and (probs["3d"] > 0 or probs["img"] > 0):
            times.append(static_time)
        return torch.tensor(sorted(set(times)))  # static_time may be a linspace time

    def _update_occupancy(self, it: int, stage: int) -> None:
        """Rebuild the renderer's occupancy grid (if it has one) when ``it`` is an update iteration."""
        if self.renderer.occupancy is None or it < self.cfg.occupancy_warmup:
            return
        stage_start = it in (0, *self.schedule.stage_ends)
        if it % self.cfg.occupancy_every == 0 or it == self.cfg.occupancy_warmup or stage_start:
            self.renderer.update_occupancy(self.field, self._occupancy_times(stage), device=self.device)

    def _background_for_step(self):
        """The background MLP, or (with random_background_prob) one random solid colour for the batch."""
        u = float(torch.rand((), generator=self.generator))
        colour = torch.rand(3, generator=self.generator)
        return colour if u < self.random_background_prob else self.background

    def _regularisers(self, opacity: torch.Tensor, stage: int) -> dict[str, torch.Tensor]:
        losses = {}
        if self.cfg.lambda_sparsity > 0:
            losses["sparsity"] = self.cfg.lambda_sparsity * (opacity**2 + 0.01).sqrt().mean()
        if self.cfg.lambda_opacity_entropy > 0 and stage >= 2:
            o = opacity.clamp(1e-5, 1.0 - 1e-5)
            entropy = -(o * o.log() + (1 - o) * (1 - o).log()).mean()
            losses["opacity_entropy"] = self.cfg.lambda_opacity_entropy * entropy
        return losses

    def _grads_finite(self) -> bool:
        return all(p.grad is None or torch.isfinite(p.grad).all() for g in self.groups.values() for p in g)

    def step(self) -> dict[str, float]:
        """Run iteration ``self.iteration``; returns its scalars."""
        it = self.iteration
        stage = self.schedule.stage(it)
        kind = self.schedule.kind(it, self.generator)
        guidance = self.guidances[kind]
        trainable = self.schedule.trainable(kind)
        lrs = self.schedule.lr(it)
        for group in self.optimizer.param_groups:
            group["lr"] = lrs[group["name"]]
        for name, params in self.groups.items():
            for p in params:  # frozen groups get no gradient at all: AdamW then leaves them untouched
                p.requires_grad_(trainable[name])
        self.field.blob_std = self.schedule.blob_std(it, self.blob_std_start)
        # After the blob std: the grid sees the field this iteration renders. Uses no random numbers.
        self._update_occupancy(it, stage)

        # Random draws stay on the CPU generator (exact resume); tensors then go to the field's device.
        if guidance.is_video:
            cameras: Cameras = sample_video_camera(guidance.n_views, self.camera_cfg, self.generator)
        else:
            cameras = sample_cameras(guidance.n_views, self.camera_cfg, self.generator)
        cameras = cameras.to(self.device)
        times = self._sample_times(guidance.n_views, guidance.is_video).to(self.device)
        background = self._background_for_step()
        if isinstance(background, torch.Tensor):
            background = background.to(self.device)
        h, w = guidance.render_size(it)  # MVDream renders 64² for its first 5000 steps
        out = self.renderer.render(self.field, cameras, times, h, w, background=background,
                                   generator=self.generator, train=True)
        g_out = guidance(out["rgb"], self.prompt, cameras, times, it)
        losses = {"guidance": g_out.loss, **self._regularisers(out["opacity"], stage)}
        loss = sum(losses.values())

        self.optimizer.zero_grad(set_to_none=True)
        applied = bool(torch.isfinite(loss))
        if applied:
            loss.backward()
            applied = self._grads_finite()
        if applied:
            self.optimizer.step()
            if kind == "img":
                g_out.stats.update(guidance.finetune_step(out["rgb"].detach(), self.prompt, cameras, it))
        else:  # NaN/Inf: never written into the field; counted and logged
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        return {
            "iteration": it, "stage": stage, "kind": kind, "loss": float(loss.detach()),
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
        log_path = self.run_dir / "log.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=total, initial=self.iteration, disable=not self.cfg.progress_bar, dynamic_ncols=True,
                   desc="fourdfy")
        start = time.perf_counter()
        # SLURM warns with SIGUSR2 before the time limit: save, then let submitit requeue (preemption.py).
        with open(log_path, "a") as log_file, checkpoint_on_signal(signal.SIGUSR2) as stop_signal:
            while self.iteration < total:
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
                    print(f"[fourdfy] caught {stop_signal.signum.name}: saved a checkpoint at iteration "
                          f"{self.iteration}; handing the signal over", flush=True)
                    stop_signal.hand_over()
        bar.close()


def _jsonable(scalars: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in scalars.items()}
