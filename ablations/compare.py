"""Any two configurations of a collected sweep, compared on matched (prompt, seed) pairs.

``ablations.collect`` pairs each row with the full model of the same preset and tag. Some comparisons it cannot
make: a row run with a setting the full model does not read (``variant=hexplane field.hexplane.resolutions=...``
has no ``full`` run of that tag, and needs none: ``full`` never builds a HexPlane), two ablations with each other,
or a subset of the seeds (the same runs before and after more seeds were added). This reads collect's
``runs.csv`` and runs the same test (``eval.paired.paired_test``: mean difference, 95% t interval, exact two-sided
sign-flip p) on the pairs you name::

    python -m ablations.compare outputs/runs.csv hexplane[field.hexplane.resolutions=[37,74,148]] full
    python -m ablations.compare outputs/runs.csv no_hybrid full --seeds 0 1 --metric depth_error

A configuration is ``variant`` (tag ``default``) or ``variant[tag]``, optionally ``preset/`` first when the file
holds several presets. Prints one JSON object per metric.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from eval.paired import paired_test

DEFAULT_METRICS = ("gt_error", "psnr", "ssim", "depth_error", "motion_error")
_CONFIG = re.compile(r"(?:(?P<preset>[^/\[\]]+)/)?(?P<variant>[^/\[\]]+)(?:\[(?P<tag>.+)\])?")


@dataclass(frozen=True)
class Configuration:
    """One row of a sweep: preset (None: the file's only one), variant and tag."""

    preset: str | None
    variant: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> Configuration:
        """``[preset/]variant[\\[tag\\]]``; ValueError naming the expected form."""
        match = _CONFIG.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"configuration {text!r}: expected variant, variant[tag] or preset/variant[tag]")
        return cls(match["preset"], match["variant"], match["tag"] or "default")

    def __str__(self) -> str:
        return (f"{self.preset}/" if self.preset else "") + self.variant + (
            "" if self.tag == "default" else f"[{self.tag}]")


def runs_of(runs: pd.DataFrame, config: Configuration) -> pd.DataFrame:
    """The finished runs of ``config`` (runs.csv rows). ValueError listing the file's configurations if none."""
    finished = runs[runs["status"] == "finished"]
    chosen = finished[(finished["variant"] == config.variant) & (finished["tag"].astype(str) == config.tag)]
    if config.preset is not None:
        chosen = chosen[chosen["preset"] == config.preset]
    elif chosen["preset"].nunique() > 1:
        raise ValueError(f"{config} has runs of presets {sorted(chosen['preset'].unique())}: write preset/{config}")
    if chosen.empty:
        pairs = zip(finished["variant"], finished["tag"], strict=True)
        known = sorted({str(Configuration(None, v, str(t))) for v, t in pairs})
        raise ValueError(f"no finished runs of {config}; the file has: {', '.join(known)}")
    return chosen


def compare(runs: pd.DataFrame, a: Configuration, b: Configuration, metric: str,
            seeds: Sequence[int] | None = None) -> dict:
    """a − b on ``metric`` over the (prompt, seed) pairs both have (restricted to ``seeds`` if given).

    Returns {"a", "b", "metric", "diff", "low", "high", "p", "n_pairs", "exact", "unmatched"}; a run without a
    partner is left out and counted in "unmatched".
    """
    def values(config: Configuration) -> pd.Series:
        chosen = runs_of(runs, config)
        if seeds is not None:
            chosen = chosen[chosen["seed"].isin(list(seeds))]
        if metric not in chosen.columns:
            raise ValueError(f"runs.csv has no column {metric!r}; it has {', '.join(map(str, runs.columns))}")
        chosen = chosen.dropna(subset=[metric])
        if chosen.duplicated(["prompt", "seed"]).any():
            raise ValueError(f"{config} has two runs of one (prompt, seed): give its preset (preset/{config})")
        return chosen.set_index(["prompt", "seed"])[metric]

    ours, theirs = values(a), values(b)
    matched = sorted(set(ours.index) & set(theirs.index))
    if not matched:
        raise ValueError(f"{a} and {b} share no (prompt, seed) pair: nothing to compare")
    res = paired_test([ours[u] for u in matched], [theirs[u] for u in matched])
    return {"a": str(a), "b": str(b), "metric": metric, "diff": res.diff, "low": res.low, "high": res.high,
            "p": res.p_value, "n_pairs": res.n, "exact": res.exact,
            "unmatched": len(set(ours.index) ^ set(theirs.index))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablations.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_csv", type=Path, help="runs.csv written by python -m ablations.collect")
    parser.add_argument("a", help="configuration: variant, variant[tag] or preset/variant[tag]")
    parser.add_argument("b", help="the configuration a is compared with (differences are a − b)")
    parser.add_argument("--metric", action="append", help=f"metric column (repeatable; default: {DEFAULT_METRICS})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds")
    args = parser.parse_args(argv)
    try:
        runs = pd.read_csv(args.runs_csv, keep_default_na=False, na_values=[""])
        a, b = Configuration.parse(args.a), Configuration.parse(args.b)
        metrics = args.metric or [m for m in DEFAULT_METRICS if m in runs.columns]
        if not metrics:
            raise ValueError(f"{args.runs_csv} has none of {', '.join(DEFAULT_METRICS)}: name one with --metric")
        for metric in metrics:
            print(json.dumps(compare(runs, a, b, metric, args.seeds)))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
