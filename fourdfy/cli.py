"""The ``fourdfy`` command (console script ``fourdfy = "fourdfy.cli:main"``).

    fourdfy export RUN_DIR [--video] [--grid] [--mesh] [--glb] [--curves] [--out DIR] ...

re-exports a run's outputs from its last valid checkpoint and its saved config.yaml, without training.
With no output flag it writes all of them. Sizes and mesh settings default to the run's ``eval``
config; the options below override them for this export only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fourdfy.errors import MissingExtraError
from fourdfy.export.mesh import MESH_FORMATS, EmptyMeshError
from fourdfy.export.video import OutputFolderError, check_writable_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fourdfy", description="4D-fy: text-to-4D generation (tools).")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export", help="re-export videos, grid, meshes and curves of a run from its last checkpoint",
        description="Re-export a run's outputs from its last checkpoint (no training). "
                    "Without --video/--grid/--mesh/--glb/--curves, exports everything.",
    )
    export.add_argument("run_dir", type=Path, help="run directory (config.yaml + checkpoints/)")
    export.add_argument("--video", action="store_true", help="orbit (mp4, captioned mp4, gif), static orbit, "
                        "fixed view and depth videos")
    export.add_argument("--grid", action="store_true", help="views×time grid PNG (paper Fig. 1)")
    export.add_argument("--mesh", action="store_true", help="marching-cubes mesh per time step (PLY/OBJ)")
    export.add_argument("--glb", action="store_true", help="one animated .glb playing the meshes in order")
    export.add_argument("--curves", action="store_true",
                        help="curves.png from log.jsonl (needs no checkpoint)")
    export.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/renders)")
    export.add_argument("--device", default=None, help="cpu or cuda (default: the run's device)")
    export.add_argument("--threshold", type=float, default=None,
                        help="mesh density iso-level (eval.mesh_threshold)")
    export.add_argument("--resolution", type=int, default=None, help="marching-cubes grid points per side "
                        "(eval.mesh_resolution)")
    export.add_argument("--mesh-frames", type=int, default=None, help="time steps meshed (eval.mesh_frames)")
    export.add_argument("--mesh-fps", type=float, default=None, help="frame rate of mesh.glb (eval.mesh_fps)")
    export.add_argument("--format", dest="formats", action="append", choices=MESH_FORMATS, default=None,
                        help="mesh file format, repeatable (eval.mesh_formats)")
    return parser


class CommandError(Exception):
    """The command line asks for something this run cannot give (no such run, no checkpoint, no CUDA): one
    line without a traceback, exit status 2."""


def _device(requested: str) -> torch.device:
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"device {requested!r} requested but CUDA is not available; pass --device cpu")
    return device


def export(args: argparse.Namespace) -> list[Path]:
    """Carry out ``fourdfy export``; returns the files written.

    Everything that can refuse the export is checked before any file or folder is created, so that a
    mistyped RUN_DIR or option leaves nothing behind (not even an empty renders/).
    """
    from fourdfy.build import load_run
    from fourdfy.config import load_run_config
    from fourdfy.export.curves import LOG_FILE, write_curves
    from fourdfy.export.outputs import check_mesh_export, eval_renderer, export_grid, export_meshes, export_videos

    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise CommandError(f"run directory {run_dir} does not exist")
    try:
        run_cfg = load_run_config(run_dir)
    except FileNotFoundError as err:  # no config.yaml: names the file and says it is not a run directory
        raise CommandError(str(err)) from err
    flags = ("video", "grid", "mesh", "glb", "curves")
    wanted = {k: getattr(args, k) for k in flags}
    everything = not any(wanted.values())
    if everything:
        wanted = dict.fromkeys(wanted, True)
    if wanted["curves"] and not (run_dir / LOG_FILE).exists():
        raise CommandError(f"{run_dir / LOG_FILE} does not exist: no training log to plot")
    ev = run_cfg.eval
    for name, value in (("mesh_threshold", args.threshold), ("mesh_resolution", args.resolution),
                        ("mesh_frames", args.mesh_frames), ("mesh_fps", args.mesh_fps),
                        ("mesh_formats", args.formats)):
        if value is not None:
            setattr(ev, name, value)
    if wanted["mesh"] or wanted["glb"]:
        asked_by = ("fourdfy export (all outputs; pick others with --video/--grid/--curves)" if everything
                    else "fourdfy export " + " ".join(f"--{k}" for k in ("mesh", "glb") if wanted[k]))
        check_mesh_export(run_cfg, sequence=wanted["mesh"], glb=wanted["glb"], asked_by=asked_by)
    needs_field = wanted["video"] or wanted["grid"] or wanted["mesh"] or wanted["glb"]
    device = _device(args.device or run_cfg.device) if needs_field else None
    out = args.out if args.out is not None else run_dir / "renders"
    check_writable_dir(out)  # creates nothing; each writer creates the folders it writes into
    written: list[Path] = []
    if needs_field:
        try:
            cfg, field, _, iteration = load_run(run_dir)
        except FileNotFoundError as err:
            raise CommandError(f"{err}; nothing to export from (train first: python run.py ...)") from err
        cfg.eval = ev  # with this export's overrides
        field = field.to(device)
        print(f"[fourdfy] exporting {run_dir} at iteration {iteration} to {out}")
        renderer = eval_renderer(cfg)
        if wanted["mesh"] or wanted["glb"]:  # first: a threshold above the density fails before minutes of rendering
            written += export_meshes(cfg, field, out, sequence=wanted["mesh"], glb=wanted["glb"])
        if wanted["video"]:
            written += export_videos(cfg, field, out, renderer).values()
        if wanted["grid"]:
            written.append(export_grid(cfg, field, out, renderer))
    if wanted["curves"]:
        written.append(write_curves(run_dir, out / "curves.png", title=run_cfg.prompt,
                                    stage_lengths=list(run_cfg.schedule.stage_lengths)))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status, errors reported on stderr in one line without a traceback.

    0: done. 2: the command line asks for something impossible (as argparse's own usage errors): no such run,
    no checkpoint, an option out of range, CUDA not available. 1: the export could not be carried out here:
    output folder not writable, an optional package missing, no surface at the mesh threshold.
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            for path in export(args):
                print(f"  wrote {path}")
    except (EmptyMeshError, OutputFolderError, MissingExtraError) as err:
        print(f"fourdfy {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (CommandError, ValueError, FileNotFoundError) as err:  # ValueError: a setting out of range, named
        print(f"fourdfy {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
