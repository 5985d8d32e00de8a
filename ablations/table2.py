"""Table 2 of the paper as data: its rows (one Hydra variant each), their labels, and the sweep that fills it.

    python -m ablations.table2 [--slurm] [--prompts ablation5] [--dry-run] [-- OVERRIDE ...]

runs (or with --dry-run prints) the paper's ablation sweep

    python run.py -m variant=full,no_image_guidance,no_3d,no_vsd,no_hybrid,hexplane prompts=ablation5 \\
        [hydra/launcher=slurm] [OVERRIDE ...]

and ``python -m ablations.collect outputs/<preset>/`` turns its runs into the table (one row per variant;
launched again, the sweep resumes or skips each job: fourdfy/identity.py).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """One row of Table 2's ablation block."""

    variant: str  # conf/variant/<variant>.yaml; also the run's variant.name and the user study's method name
    label: str  # plain-text row name (CSV, Markdown, plot)
    latex: str  # the paper's row name, LaTeX
    paper_clip: float  # the paper's CLIP score for this row (Table 2, ablation block, 5 prompts)


# Order, names and CLIP scores: paper Table 2, "Ablation Study" block (and §4.3 Ablations).
ROWS: tuple[Row, ...] = (
    Row("full", "4D-fy", "4D-fy", 35.0),
    Row("no_image_guidance", "w/o ∇L_3D/IMG", r"w/o $\nabla_{\theta} \mathcal{L}_{3D/IMG}$", 29.3),
    Row("no_3d", "w/o ∇L_3D", r"w/o $\nabla_{\theta} \mathcal{L}_{3D}$", 35.1),
    Row("no_vsd", "w/o ∇L_IMG", r"w/o $\nabla_{\theta} \mathcal{L}_{IMG}$", 34.5),
    Row("no_hybrid", "w/o hybrid SDS", "w/o hybrid SDS", 33.8),
    Row("hexplane", "w/ HexPlane", "w/ HexPlane", 34.5),
)
# Rows beyond the paper's table, placed after it: the authors' newer deformation field (issue #19), no paper CLIP.
EXTRA_ROWS: tuple[Row, ...] = (
    Row("deformation", "w/ deformation", "w/ deformation", float("nan")),
)
VARIANTS: tuple[str, ...] = tuple(r.variant for r in ROWS)
# The method the user-study percentages are for ("percentages of users who voted for our method"), and the one
# every other row is compared with, pair by pair (ablations/collect.py, eval/paired.py).
REFERENCE_VARIANT = "full"
# conf/prompts/ablation5.yaml: the paper's 5 ablation prompts.
PROMPT_SET = "ablation5"


def row_of(variant: str) -> Row | None:
    """The Table-2 row of ``variant``, or None for a variant that is not in the table."""
    return next((r for r in (*ROWS, *EXTRA_ROWS) if r.variant == variant), None)


def sweep_overrides(prompt_set: str = PROMPT_SET, slurm: bool = False, extra: Sequence[str] = ()) -> list[str]:
    """run.py arguments of the Table-2 sweep: ``-m variant=<all rows> prompts=<set> [hydra/launcher=slurm]``."""
    args = ["-m", f"variant={','.join(VARIANTS)}", f"prompts={prompt_set}"]
    if slurm:
        args.append("hydra/launcher=slurm")
    return args + list(extra)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablations.table2", description=__doc__.splitlines()[0])
    parser.add_argument("--slurm", action="store_true", help="send the jobs to SLURM (hydra/launcher=slurm)")
    parser.add_argument("--prompts", default=PROMPT_SET, help="prompt set under conf/prompts/ (default ablation5)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. preset=paper")
    args = parser.parse_args(argv)
    command = [sys.executable, str(REPO / "run.py"), *sweep_overrides(args.prompts, args.slurm, args.overrides)]
    print(shlex.join(command))
    if args.dry_run:
        return 0
    return subprocess.call(command)


if __name__ == "__main__":
    raise SystemExit(main())
