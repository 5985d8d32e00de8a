"""Ground-truth metrics of a toy-world run's newest checkpoint: the toy rows of Table 2.

The metrics themselves (appearance, 3D structure, motion, the combined gt_error) are
fourdfy/synthetic/metrics.py's, the same function that writes a run's ``metrics.json``; this module loads
a run and prints them.

    python -m eval.gt_metrics RUN_DIR [--default-settings] [--json]

By default the cameras, times and sizes are the run's own evaluation settings (its preset's ``eval:``), so
the numbers equal those in the run's ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from eval.orbit import load_run_checked
from fourdfy.synthetic.metrics import GTMetricsConfig, field_metrics


def run_metrics(run_dir: Path, cfg: GTMetricsConfig | None = None) -> dict[str, float]:
    """Ground-truth metrics of a toy-world run's newest checkpoint; ``cfg`` None: the run's own eval settings.

    Raises ValueError naming the run when it is not a toy-world run (guidance.backend != "synthetic").
    """
    run_cfg, field_, _, _ = load_run_checked(Path(run_dir))
    cfg = cfg or GTMetricsConfig.from_eval(run_cfg.eval)
    cfg.validate()
    if run_cfg.guidance.backend != "synthetic":
        raise ValueError(f"{run_dir} is a run with guidance.backend={run_cfg.guidance.backend!r}: ground-truth "
                         "metrics exist only for the toy world (synthetic); score it with eval.clip_score")
    return field_metrics(field_, run_cfg.prompt, cfg, render_radius=run_cfg.guidance.synthetic.data.render_radius)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.gt_metrics", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="toy-world run directory (config.yaml + checkpoints/)")
    parser.add_argument("--default-settings", action="store_true",
                        help="GTMetricsConfig's defaults (8 views, 32², 64 samples) instead of the run's eval settings")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        metrics = run_metrics(args.run_dir, GTMetricsConfig() if args.default_settings else None)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    else:
        for key in sorted(metrics):
            print(f"{key:>20s}  {metrics[key]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
