"""Everything a finished run leaves for people: videos, the views×time grid, curves, meshes, metrics.

``write_outputs`` is called once at the end of training (``fourdfy.api.generate``); ``fourdfy export``
calls the ``export_*`` pieces again from the last checkpoint. Sizes come from ``cfg.eval``.

Files (in ``run_dir/renders`` unless told otherwise):
    orbit.mp4            time advancing along an azimuth orbit, no caption (CLIP score and user-study input)
    orbit_captioned.mp4  the same frames under the prompt; orbit.gif: the same as a GIF
    static_orbit.mp4     the orbit frozen at t = 0 (the 3D shape alone)
    fixed_view.mp4       one camera while time runs 0 → 1 (the motion alone)
    depth.mp4            depth of the orbit's frames through a colour map
    grid.png             paper Fig. 1: rows are viewpoints, columns are time steps
    curves.png           losses per update kind and learning rates per parameter group (from log.jsonl)
    mesh/frame_<k>.ply   marching-cubes mesh at each of T times (+ frames.json); mesh.glb plays them in order
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from fourdfy.config import RunConfig
from fourdfy.errors import require_extra
from fourdfy.export.curves import LOG_FILE, write_curves
from fourdfy.export.mesh import (
    EmptyMeshError,
    check_fps,
    check_mesh_formats,
    check_mesh_settings,
    extract_mesh_sequence,
    write_animated_glb,
    write_mesh_sequence,
)
from fourdfy.export.video import colorize_depth, render_views_by_time, write_grid, write_video
from fourdfy.render.trajectories import EVAL_CAMERA, fixed_view_path, orbit_path
from fourdfy.render.views import WHITE, render_views
from fourdfy.render.volume import Field, Renderer, RendererConfig
from fourdfy.synthetic.metrics import GTMetricsConfig, field_metrics
from fourdfy.tracking import Logger


def eval_renderer(cfg: RunConfig) -> Renderer:
    """The deterministic renderer of every export: eval.n_samples per ray through the training sphere."""
    return Renderer(RendererConfig(n_samples=cfg.eval.n_samples, radius=cfg.renderer.radius))


def export_videos(
    cfg: RunConfig, field: Field, out_dir: Path, renderer: Renderer | None = None
) -> dict[str, Path]:
    """orbit.mp4 (+ captioned mp4 / gif); with eval.extra_videos also static_orbit, fixed_view and depth.

    Returns name -> path of every file written.
    """
    ev, out_dir = cfg.eval, Path(out_dir)
    renderer = renderer or eval_renderer(cfg)
    caption = cfg.prompt if ev.captions else None
    written: dict[str, Path] = {}
    cams, times = orbit_path(ev.video_frames)
    orbit = render_views(field, renderer, cams, times, ev.video_size, WHITE)
    written["orbit"] = write_video(orbit["rgb"], out_dir / "orbit.mp4", fps=ev.fps)
    if caption is not None:
        written["orbit_captioned"] = write_video(orbit["rgb"], out_dir / "orbit_captioned.mp4", fps=ev.fps,
                                                 caption=caption)
    if ev.gif:
        written["orbit_gif"] = write_video(orbit["rgb"], out_dir / "orbit.gif", fps=ev.fps, caption=caption)
    if not ev.extra_videos:
        return written
    # The scene sphere spans [distance − radius, distance + radius] from every orbit camera: a fixed colour
    # range for the whole depth video.
    radius, distance = renderer.cfg.radius, EVAL_CAMERA.distance
    depth = colorize_depth(orbit["depth"], orbit["opacity"], distance - radius, distance + radius,
                           ev.depth_colormap, WHITE)
    written["depth"] = write_video(depth, out_dir / "depth.mp4", fps=ev.fps,
                                   caption=f"{cfg.prompt} (depth)" if caption is not None else None)
    cams, times = orbit_path(ev.extra_video_frames, time_advances=False)
    static = render_views(field, renderer, cams, times, ev.video_size, WHITE)["rgb"]
    written["static_orbit"] = write_video(static, out_dir / "static_orbit.mp4", fps=ev.fps, caption=caption)
    cams, times = fixed_view_path(ev.extra_video_frames, azimuth=ev.fixed_view_azimuth)
    fixed = render_views(field, renderer, cams, times, ev.video_size, WHITE)["rgb"]
    written["fixed_view"] = write_video(fixed, out_dir / "fixed_view.mp4", fps=ev.fps, caption=caption)
    return written


def export_grid(cfg: RunConfig, field: Field, out_dir: Path, renderer: Renderer | None = None) -> Path:
    """grid.png: eval.grid_views rows (viewpoints) × eval.grid_times columns (time steps)."""
    ev = cfg.eval
    grid = render_views_by_time(field, renderer or eval_renderer(cfg), ev.grid_views, ev.grid_times,
                                ev.video_size, WHITE)
    return write_grid(grid, Path(out_dir) / "grid.png", caption=cfg.prompt if ev.captions else None)


def check_mesh_export(cfg: RunConfig, sequence: bool = True, glb: bool = True, asked_by: str = "") -> None:
    """What export_meshes would refuse, checked before the (slow) extraction: the eval.mesh_* settings
    (ValueError naming them) and the optional packages (MissingExtraError; asked_by: what asked for meshes)."""
    ev = cfg.eval
    check_mesh_settings(ev.mesh_frames, ev.mesh_resolution, ev.mesh_threshold, cfg.field.box_radius)
    if sequence:
        check_mesh_formats(ev.mesh_formats)
        require_extra("trimesh", asked_by or "writing PLY/OBJ meshes")
    if glb:
        check_fps(ev.mesh_fps)
        require_extra("pygltflib", asked_by or "writing mesh.glb")


def export_meshes(
    cfg: RunConfig, field: Field, out_dir: Path, sequence: bool = True, glb: bool = True
) -> list[Path]:
    """mesh/frame_<k>.<fmt> (eval.mesh_formats) and/or mesh.glb at eval.mesh_frames times.

    Every frame is extracted before anything is written: an empty mesh (threshold above the density)
    raises EmptyMeshError and leaves the folder as it was.
    """
    ev, out_dir = cfg.eval, Path(out_dir)
    if not (sequence or glb):
        return []
    check_mesh_export(cfg, sequence, glb)
    meshes = extract_mesh_sequence(field, ev.mesh_frames, ev.mesh_resolution, ev.mesh_threshold,
                                   cfg.field.box_radius)
    paths: list[Path] = []
    if sequence:
        paths += write_mesh_sequence(meshes, out_dir / "mesh", ev.mesh_formats, threshold=ev.mesh_threshold,
                                     resolution=ev.mesh_resolution, box_radius=cfg.field.box_radius)
    if glb:
        paths.append(write_animated_glb(meshes, out_dir / "mesh.glb", fps=ev.mesh_fps))
    return paths


def write_outputs(
    cfg: RunConfig, field: torch.nn.Module, run_dir: Path, logger: Logger, step: int
) -> dict[str, float]:
    """Videos, views×time grid, curves.png, meshes (if eval.mesh_on_finish), toy-world metrics.

    Returns the toy world's ground-truth metrics (:func:`fourdfy.synthetic.metrics.field_metrics` at the run's
    eval settings: the numbers ``python -m eval.gt_metrics RUN_DIR`` gives for the final checkpoint), or {}
    for a run with real priors.
    """
    run_dir = Path(run_dir)
    renders = run_dir / "renders"
    ev = cfg.eval
    renderer = eval_renderer(cfg)
    field.eval()
    videos = export_videos(cfg, field, renders, renderer)
    grid = export_grid(cfg, field, renders, renderer)
    logger.log_video("renders/orbit", videos["orbit"], step)
    logger.log_image("renders/grid", grid, step)
    if (run_dir / LOG_FILE).exists():
        try:
            curves = write_curves(run_dir, renders / "curves.png", cfg.prompt,
                                  stage_lengths=list(cfg.schedule.stage_lengths))
            logger.log_image("renders/curves", curves, step)
        except ValueError as err:  # an empty log: the run has nothing to plot, which must not fail it
            warnings.warn(f"curves.png not written: {err}", stacklevel=2)
    if ev.mesh_on_finish:
        try:
            export_meshes(cfg, field, renders)
        except EmptyMeshError as err:  # a threshold problem must not fail a finished training run
            warnings.warn(f"meshes not written: {err}", stacklevel=2)
    metrics: dict[str, float] = {}
    if cfg.guidance.backend == "synthetic":
        metrics.update(field_metrics(field, cfg.prompt, GTMetricsConfig.from_eval(ev),
                                     render_radius=cfg.guidance.synthetic.data.render_radius))
        logger.log({f"eval/{k}": v for k, v in metrics.items()}, step)
    return metrics
