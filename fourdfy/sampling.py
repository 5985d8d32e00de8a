"""What one training step renders: cameras, frame times and background, drawn per update kind.

Every draw comes from the trainer's one CPU generator, in a fixed order (cameras, times, background), so a
resumed run draws exactly what the uninterrupted one would have (the generator's state is checkpointed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fourdfy.render.cameras import Cameras, CameraSamplingConfig, sample_cameras, sample_video_camera


@dataclass
class StepInputs:
    """The render inputs of one step: B cameras, times [B], and the background (a module or a colour [3])."""

    cameras: Cameras
    times: torch.Tensor
    background: nn.Module | torch.Tensor

    def to(self, device: torch.device) -> StepInputs:
        background = self.background.to(device) if isinstance(self.background, torch.Tensor) else self.background
        return StepInputs(self.cameras.to(device), self.times.to(device), background)


@dataclass
class StepSampler:
    """Draws a step's cameras, times and background.

    Args:
        cameras: the random training-camera distribution (authors' ``data:`` of configs/fourdfy_stage_*.yaml).
        n_frames: the time grid: frame k at t0 + k/n_frames, t0 ~ U(0, 1/n_frames) (authors' data config).
        static_prior_time: None: 3D/IMG steps render one of the frame times; a number: always that time.
        random_background_prob: probability of one random solid colour instead of the background module.
    """

    cameras: CameraSamplingConfig
    n_frames: int
    static_prior_time: float | None
    random_background_prob: float

    def sample(self, n_views: int, is_video: bool, background: nn.Module, generator: torch.Generator) -> StepInputs:
        """Inputs for a prior that wants ``n_views`` renders (video: one camera, ``n_views`` consecutive frames)."""
        if is_video:
            cameras = sample_video_camera(n_views, self.cameras, generator)
        else:
            cameras = sample_cameras(n_views, self.cameras, generator)
        times = self.frame_times(n_views, is_video, generator)
        return StepInputs(cameras, times, self.background(background, generator))

    def frame_times(self, n: int, is_video: bool, generator: torch.Generator) -> torch.Tensor:
        """[n] times: t0 ~ U(0, 1/F), frame k at t0 + k/F. Image steps share one frame (or the fixed time).

        Always draws t0 and k (two numbers), whatever the kind, so the stream does not depend on it.
        """
        frames = self.n_frames
        t0 = float(torch.rand((), generator=generator)) / frames
        k = int(torch.randint(frames, (), generator=generator))
        if is_video:
            if n != frames:
                raise ValueError(f"the video prior wants {n} frames but trainer.n_frames is {frames}")
            return t0 + torch.arange(frames, dtype=torch.float32) / frames
        if self.static_prior_time is not None:
            return torch.full((n,), self.static_prior_time)
        return torch.full((n,), t0 + k / frames)

    def background(self, module: nn.Module, generator: torch.Generator) -> nn.Module | torch.Tensor:
        """The background module, or (with random_background_prob) one random solid colour [3] for the batch.

        Always draws the coin and the colour (four numbers).
        """
        u = float(torch.rand((), generator=generator))
        colour = torch.rand(3, generator=generator)
        return colour if u < self.random_background_prob else module
