"""Ground-truth metrics of a learned field on the toy world: appearance, 3D structure and motion.

The one implementation behind a run's ``metrics.json`` (fourdfy/export/outputs.py ``write_outputs``) and
the toy rows of Table 2 (``python -m eval.gt_metrics``, ablations/collect.py). The toy world's scenes are
analytic (fourdfy/synthetic/scenes.py), so the learned field and the true scene can be rendered from the
same cameras at the same times, both on white, and compared:

- appearance: PSNR and SSIM (scikit-image, ``structural_similarity``, data range 1) over an azimuth orbit
  at the evaluation camera (fourdfy/render/trajectories.py ``EVAL_CAMERA``) at several times;
- 3D structure: mean absolute error of the expected surface distance over the same orbit, where the
  true opacity > 0.5 (a Janus or rotated object has the wrong depth even where its colours look right);
- motion: the error over time at fixed views. ``motion_rmse_t<t>`` is the plain error per time;
  ``motion_error`` is the RMSE of the *change* since t = 0, (pred(t) − pred(0)) − (gt(t) − gt(0)) over
  t > 0, so a scene that never moves scores the size of the true motion however good its t = 0 look is;
- combined: ``gt_error`` = mean of the appearance RMSE (``rgb_rmse``, colour in [0, 1]), the depth error (world
  units; the scenes fit in the unit sphere) and the motion error — the one number that sums up a toy row
  of Table 2. The three are errors of similar size (~0.05–0.15 for a plausible run), so equal weights give
  each of appearance, 3D structure and motion a like say; see :func:`combined_error`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fourdfy.render.cameras import Cameras
from fourdfy.render.trajectories import EVAL_CAMERA, EvalCamera, orbit_cameras
from fourdfy.render.views import WHITE, render_views
from fourdfy.render.volume import Renderer, RendererConfig
from fourdfy.synthetic.priors import ToyDataConfig, render_scene
from fourdfy.synthetic.scenes import get_scene

# skimage's default SSIM window is 7×7; smaller images cannot be scored.
_MIN_SSIM_SIZE = 7
# Pixels whose true opacity exceeds this count as the object's surface for the depth error.
_SURFACE_OPACITY = 0.5
# Views of the learned field per renderer call. Part of the numbers' recipe (an MLP may round differently
# at another batch size), so it stays what Table 2's numbers were computed with.
_FIELD_CHUNK = 8
# MSE floor of the PSNR: identical images score 10·log10(1/1e-12) = 120 dB instead of infinity.
_MSE_FLOOR = 1e-12


@dataclass
class GTMetricsConfig:
    """Cameras, times and sizes of the ground-truth comparison."""

    n_views: int = 8  # azimuths of the orbit, 360°/n apart (appearance and 3D structure)
    times: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # times the orbit is evaluated at
    motion_azimuths: list[float] = field(default_factory=lambda: [0.0, 90.0])  # fixed views for motion
    motion_steps: int = 9  # times linspace(0, 1, motion_steps) at the fixed views
    size: int = 32  # render height = width (the toy priors' data are 32×32 in demo_cpu)
    n_samples: int = 64  # samples per ray of the learned field
    gt_n_samples: int = 96  # samples per ray of the analytic ground truth (ToyDataConfig's default)
    # The evaluation camera. Plain fields rather than an EvalCamera: settings() is stored beside cached
    # numbers (ablations/collect.py) and must keep its keys.
    elevation_deg: float = EVAL_CAMERA.elevation_deg
    distance: float = EVAL_CAMERA.distance
    fovy_deg: float = EVAL_CAMERA.fovy_deg

    @classmethod
    def from_eval(cls, ev: Any) -> GTMetricsConfig:
        """The settings a run's preset chose for its evaluation: ``ev`` is its ``eval:`` (an EvalConfig).

        The orbit uses eval.orbit_views azimuths at eval.times; the motion views are the rows of the
        views×time grid (eval.grid_views azimuths 360°/n apart) at eval.grid_times times (at least 2).
        ``ev`` is duck-typed: fourdfy/config.py imports this package, so naming EvalConfig here would be a cycle.
        """
        return cls(n_views=ev.orbit_views, times=list(ev.times),
                   motion_azimuths=[k * 360.0 / ev.grid_views for k in range(ev.grid_views)],
                   motion_steps=max(ev.grid_times, 2), size=ev.size, n_samples=ev.n_samples)

    @property
    def camera(self) -> EvalCamera:
        return EvalCamera(self.elevation_deg, self.distance, self.fovy_deg)

    def validate(self) -> None:
        """Raise ValueError naming the field for a value out of range."""
        if self.n_views < 1:
            raise ValueError(f"GTMetricsConfig.n_views must be >= 1, got {self.n_views}")
        if not self.times or any(not 0.0 <= t <= 1.0 for t in self.times):
            raise ValueError(f"GTMetricsConfig.times must be a non-empty list of times in [0, 1], got {self.times}")
        if not self.motion_azimuths:
            raise ValueError("GTMetricsConfig.motion_azimuths must name at least one fixed view")
        if self.motion_steps < 2:
            raise ValueError(f"GTMetricsConfig.motion_steps must be >= 2 (t = 0 and later), got {self.motion_steps}")
        if self.size < _MIN_SSIM_SIZE:
            raise ValueError(f"GTMetricsConfig.size must be >= {_MIN_SSIM_SIZE} (SSIM's 7×7 window), got {self.size}")
        for key in ("n_samples", "gt_n_samples"):
            if getattr(self, key) < 1:
                raise ValueError(f"GTMetricsConfig.{key} must be >= 1, got {getattr(self, key)}")

    def settings(self) -> dict[str, object]:
        """The settings as plain data (stored beside the numbers so stale values can be detected)."""
        return asdict(self)


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of images in [0, 1] from their mean squared error (capped at 120 dB for mse = 0)."""
    return 10.0 * math.log10(1.0 / max(mse, _MSE_FLOOR))


def combined_error(metrics: dict[str, float]) -> float:
    """gt_error = (rgb_rmse + depth_error + motion_error) / 3, lower is better.

    rgb_rmse is derived from ``psnr`` (which is computed from the mean squared error over every orbit frame),
    so cached metrics without it can be combined too.
    """
    rgb_rmse = 10.0 ** (-metrics["psnr"] / 20.0)
    return (rgb_rmse + metrics["depth_error"] + metrics["motion_error"]) / 3.0


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM over frames. pred, target: [N, H, W, 3] in [0, 1]."""
    # Imported here: scikit-image pulls in scipy.ndimage (~0.2 s), and every `fourdfy` command imports this
    # module through fourdfy.export.outputs, most of them never scoring a run.
    from skimage.metrics import structural_similarity

    a, b = pred.double().numpy(), target.double().numpy()
    scores = [structural_similarity(x, y, channel_axis=-1, data_range=1.0) for x, y in zip(a, b, strict=True)]
    return float(np.mean(scores))


def _render_pair(field_: nn.Module, renderer: Renderer, scene_data: ToyDataConfig, prompt: str,
                 cameras: Cameras, times: torch.Tensor, size: int) -> tuple[dict, dict]:
    """(learned, true) renders of the same views: dicts of rgb [N,H,W,3], depth and opacity [N,H,W]."""
    pred = render_views(field_, renderer, cameras, times, size, WHITE, chunk=_FIELD_CHUNK)
    return pred, render_scene(get_scene(prompt), cameras, times, size, scene_data)


@torch.no_grad()
def field_metrics(field_: nn.Module, prompt: str, cfg: GTMetricsConfig, render_radius: float = 1.0) -> dict[str, float]:
    """All ground-truth metrics of ``field_`` against the toy scene of ``prompt`` (see the module docstring).

    Keys: gt_error (combined), rgb_rmse, psnr, ssim, depth_error, and per orbit time t: psnr_t<t>,
    ssim_t<t>, depth_error_t<t>; motion_error, motion_psnr, and per motion time t: motion_rmse_t<t>.
    render_radius: the scenes' bounding sphere (guidance.synthetic.data.render_radius).
    """
    cfg.validate()
    get_scene(prompt)  # fail on a non-toy prompt before rendering anything
    renderer = Renderer(RendererConfig(n_samples=cfg.n_samples, radius=render_radius))
    scene_data = ToyDataConfig(render_radius=render_radius, n_samples=cfg.gt_n_samples)
    camera = cfg.camera
    orbit = orbit_cameras(cfg.n_views, elevation=camera.elevation_deg, distance=camera.distance,
                          fovy_deg=camera.fovy_deg)
    metrics: dict[str, float] = {}
    sq_err, ssims, depth_err = [], [], []
    for t in cfg.times:
        pred, gt = _render_pair(field_, renderer, scene_data, prompt, orbit, torch.full((cfg.n_views,), float(t)),
                                cfg.size)
        mse = float(((pred["rgb"] - gt["rgb"]) ** 2).mean())
        frame_ssim = ssim(pred["rgb"], gt["rgb"])
        surface = gt["opacity"] > _SURFACE_OPACITY
        err = (pred["depth"] - gt["depth"]).abs()[surface]
        metrics[f"psnr_t{t:g}"] = psnr_from_mse(mse)
        metrics[f"ssim_t{t:g}"] = frame_ssim
        metrics[f"depth_error_t{t:g}"] = float(err.mean()) if err.numel() else float("nan")
        sq_err.append(mse)
        ssims.append(frame_ssim)
        depth_err.append(err)
    # Over all orbit frames: the mean of the per-time MSEs (equal frame counts) in float64; the depth error
    # over every surface pixel of every time.
    metrics["psnr"] = psnr_from_mse(float(np.mean(sq_err)))
    metrics["ssim"] = float(np.mean(ssims))
    all_depth = torch.cat(depth_err)
    metrics["depth_error"] = float(all_depth.mean()) if all_depth.numel() else float("nan")

    # Motion: every fixed view at every time; frame (v, k) at index k·V + v.
    azimuths = torch.tensor(cfg.motion_azimuths, dtype=torch.float64)
    n_az, steps = len(cfg.motion_azimuths), torch.linspace(0.0, 1.0, cfg.motion_steps)
    cams = camera.at(azimuths.repeat(cfg.motion_steps))
    pred, gt = _render_pair(field_, renderer, scene_data, prompt, cams, steps.repeat_interleave(n_az), cfg.size)
    p = pred["rgb"].reshape(cfg.motion_steps, n_az, cfg.size, cfg.size, 3)
    g = gt["rgb"].reshape(cfg.motion_steps, n_az, cfg.size, cfg.size, 3)
    for k, t in enumerate(steps.tolist()):
        metrics[f"motion_rmse_t{t:.3g}"] = float(((p[k] - g[k]) ** 2).mean().sqrt())
    metrics["motion_psnr"] = psnr_from_mse(float(((p - g) ** 2).mean()))
    change_err = (p[1:] - p[:1]) - (g[1:] - g[:1])
    metrics["motion_error"] = float((change_err**2).mean().sqrt())
    metrics["rgb_rmse"] = 10.0 ** (-metrics["psnr"] / 20.0)
    metrics["gt_error"] = combined_error(metrics)
    return metrics
