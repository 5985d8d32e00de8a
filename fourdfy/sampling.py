"""What one training step renders: cameras, frame times and background, drawn per update kind.

Every draw comes from the trainer's one CPU generator, in a fixed order (cameras, times, background), so a
resumed run draws exactly what the uninterrupted one would have (the generator's state is checkpointed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fourdfy.render.cameras import Cameras, CameraSamplingConfig, sample_cameras, sample_video_camera


class FrameBackgrounds(nn.Module):
    """Per-view backgrounds: view b shows ``colours[b]`` where ``solid[b]``, else the background module.

    The authors render a video step frame by frame, and the background draws its own coin and colour in each
    call (threestudio neural_environment_map_background random_aug), so the 16 frames of one VID step differ.
    Called as the renderer calls a background: directions [N, 3] with N = B·rays_per_view, views in order.
    """

    def __init__(self, module: nn.Module, colours: torch.Tensor, solid: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.colours = colours  # [B, 3]
        self.solid = solid  # [B] bool

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        b = self.colours.shape[0]
        if directions.shape[0] % b:
            raise ValueError(f"directions [N,3] must hold {b} views' rays, got N={directions.shape[0]}")
        rgb = self.module(directions).reshape(b, -1, 3)
        solid = self.solid.to(rgb.device)[:, None, None]
        colours = self.colours.to(device=rgb.device, dtype=rgb.dtype)[:, None, :]
        return torch.where(solid, colours.expand_as(rgb), rgb).reshape(-1, 3)


@dataclass
class StepInputs:
    """The render inputs of one step: B cameras, times [B], and the background (a module or a colour [3])."""

    cameras: Cameras
    times: torch.Tensor
    background: nn.Module | torch.Tensor

    def to(self, device: torch.device) -> StepInputs:
        background = self.background
        if isinstance(background, torch.Tensor):
            background = background.to(device)
        elif isinstance(background, FrameBackgrounds):
            background = FrameBackgrounds(background.module, background.colours.to(device), background.solid.to(device))
        return StepInputs(self.cameras.to(device), self.times.to(device), background)


@dataclass
class StepSampler:
    """Draws a step's cameras, times and background.

    Args:
        cameras: the random training-camera distribution (authors' ``data:`` of configs/fourdfy_stage_*.yaml).
        n_frames: the time grid: frame k at t0 + k/n_frames, t0 ~ U(0, 1/n_frames) (authors' data config).
        random_background_prob: probability of one random solid colour instead of the background module (drawn
            once per 3D/IMG step, once per frame of a VID step: the authors' renderer is called per frame).
    """

    cameras: CameraSamplingConfig
    n_frames: int
    random_background_prob: float

    def sample(self, n_views: int, is_video: bool, background: nn.Module, generator: torch.Generator,
               static_time: float | None = None, n_groups: int = 1) -> StepInputs:
        """Inputs for a prior that wants ``n_views`` renders (video: one camera, ``n_views`` consecutive frames).

        static_time: the time 3D/IMG renders show (None: one of the frame times). n_groups: independent groups
        of ``n_views`` cameras (the authors' multi-view batch_size 8 = two groups of 4 views in stage 1).
        """
        if is_video:
            cameras = sample_video_camera(n_views, self.cameras, generator)
        else:
            groups = [sample_cameras(n_views, self.cameras, generator) for _ in range(n_groups)]
            cameras = groups[0] if n_groups == 1 else type(groups[0]).cat(groups)
        times = self.frame_times(n_views * (1 if is_video else n_groups), is_video, generator, static_time)
        if is_video:
            return StepInputs(cameras, times, self.frame_backgrounds(background, n_views, generator))
        return StepInputs(cameras, times, self.background(background, generator))

    def frame_times(self, n: int, is_video: bool, generator: torch.Generator,
                    static_time: float | None = None) -> torch.Tensor:
        """[n] times: t0 ~ U(0, 1/F), frame k at t0 + k/F. Image steps share one frame (or ``static_time``).

        Always draws t0 and k (two numbers), whatever the kind, so the stream does not depend on it.
        """
        frames = self.n_frames
        t0 = float(torch.rand((), generator=generator)) / frames
        k = int(torch.randint(frames, (), generator=generator))
        if is_video:
            if n != frames:
                raise ValueError(f"the video prior wants {n} frames but trainer.n_frames is {frames}")
            return t0 + torch.arange(frames, dtype=torch.float32) / frames
        if static_time is not None:
            return torch.full((n,), float(static_time))
        return torch.full((n,), t0 + k / frames)

    def background(self, module: nn.Module, generator: torch.Generator) -> nn.Module | torch.Tensor:
        """The background module, or (with random_background_prob) one random solid colour [3] for the batch.

        Always draws the coin and the colour (four numbers).
        """
        u = float(torch.rand((), generator=generator))
        colour = torch.rand(3, generator=generator)
        return colour if u < self.random_background_prob else module

    def frame_backgrounds(self, module: nn.Module, n_frames: int, generator: torch.Generator) -> FrameBackgrounds:
        """One coin and colour per frame (four numbers each, in frame order)."""
        draws = torch.rand(n_frames, 4, generator=generator)
        return FrameBackgrounds(module, draws[:, 1:], draws[:, 0] < self.random_background_prob)
