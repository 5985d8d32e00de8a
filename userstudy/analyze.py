"""Per-criterion preferences for one method from the exported answers CSV (paper Table 2).

    python -m userstudy.analyze answers.csv --method ours [--manifest SITE/manifest.json] [--json]

Every answer names the chosen side (left/right); the CSV row says which method was on that side, so
each answer is a vote for one method. For every opponent of `--method` and every criterion this
counts votes_for / total (all raters × comparisons, as the authors' app does) and runs
`eval.stats.preference_test` (χ² against 50/50, 95 % Wilson interval).

A row with an empty id, or whose left/right methods contradict another row of the same comparison or
the site's manifest (`--manifest`), is an error naming the row: a wrong mapping would silently count
votes for the wrong method.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from eval.stats import preference_test
from userstudy import CHOICES, CRITERION_KEYS, CSV_COLUMNS, csv_unquote

RESULT_COLUMNS: tuple[str, ...] = (
    "baseline", "criterion", "votes_for", "total", "share", "statistic", "p_value", "significant",
    "ci_low", "ci_high",
)


# Columns that identify an answer; an empty one cannot be attributed to a rater, comparison or method.
ID_COLUMNS: tuple[str, ...] = ("rater_id", "comparison_id", "left_method", "right_method")


def load_answers(path: Path, manifest: dict | None = None) -> pd.DataFrame:
    """Read and check an exported answers CSV (schema: userstudy.CSV_COLUMNS).

    Cells the export quoted against spreadsheet formulas (`'=...`) are restored. With `manifest` (the site's
    manifest.json as a dict) every row's comparison, prompt and left/right methods must match it.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the answers CSV downloaded from /export.csv")
    try:
        answers = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable answers CSV: {' '.join(str(exc).split())}") from None
    answers = answers.apply(lambda column: column.map(csv_unquote))
    return check_answers(answers, manifest)


def _row(answers: pd.DataFrame, pos: int) -> str:
    """A row named so it can be found in the CSV (the header is line 1)."""
    r = answers.iloc[pos]
    return (f"row {pos + 1} (line {pos + 2} of the CSV: rater {r['rater_id']!r}, comparison "
            f"{r['comparison_id']!r}, criterion {r['criterion']!r})")


def _first(mask: pd.Series) -> int:
    return int(mask.to_numpy().nonzero()[0][0])


def check_against_manifest(answers: pd.DataFrame, manifest: dict) -> None:
    """Raise ValueError for a row whose comparison, prompt or left/right methods the manifest contradicts."""
    comparisons = manifest.get("comparisons")
    if not isinstance(comparisons, dict):
        raise ValueError("the manifest has no `comparisons`; give the manifest.json of the site that was served")
    for pos, (cid, prompt, left, right) in enumerate(
            answers[["comparison_id", "prompt", "left_method", "right_method"]].itertuples(index=False)):
        comp = comparisons.get(cid)
        if comp is None:
            raise ValueError(f"{_row(answers, pos)}: comparison {cid!r} is not in the manifest; give the "
                             "manifest of the site these answers were collected with")
        planned = (comp["prompt"], comp["left"]["method"], comp["right"]["method"])
        if (prompt, left, right) != planned:
            raise ValueError(f"{_row(answers, pos)}: prompt/left_method/right_method {(prompt, left, right)} "
                             f"contradict the manifest's {planned}; export the answers again from the server")


def check_answers(answers: pd.DataFrame, manifest: dict | None = None) -> pd.DataFrame:
    """Raise ValueError for a missing column, an empty id, an unknown choice/criterion, a duplicated answer,
    or a comparison whose left/right methods differ between rows (or from `manifest`, when given)."""
    missing = [c for c in CSV_COLUMNS if c not in answers.columns]
    if missing:
        raise ValueError(f"answers lack column(s) {missing}; expected {list(CSV_COLUMNS)}")
    for column in ID_COLUMNS:
        empty = answers[column].astype(str).str.strip() == ""
        if empty.any():
            raise ValueError(f"{_row(answers, _first(empty))}: empty {column}; every answer needs one")
    bad_choice = sorted(set(answers["choice"]) - set(CHOICES))
    if bad_choice:
        raise ValueError(f"choice must be one of {list(CHOICES)}, found {bad_choice}")
    bad_criterion = sorted(set(answers["criterion"]) - set(CRITERION_KEYS))
    if bad_criterion:
        raise ValueError(f"criterion must be one of {list(CRITERION_KEYS)}, found {bad_criterion}")
    dup = answers.duplicated(["rater_id", "comparison_id", "criterion"])
    if dup.any():
        first = answers[dup].iloc[0]
        raise ValueError(
            f"{int(dup.sum())} duplicated answer(s), e.g. rater {first['rater_id']!r} comparison "
            f"{first['comparison_id']!r} criterion {first['criterion']!r}; one answer per triple is expected"
        )
    same = answers["left_method"] == answers["right_method"]
    if same.any():
        cid = answers[same].iloc[0]["comparison_id"]
        raise ValueError(f"comparison {cid!r} has one method on both sides")
    # One comparison was shown one way: rows that disagree on its sides cannot all be right.
    sides = answers[["comparison_id", "left_method", "right_method"]]
    conflict = sides.duplicated("comparison_id") & ~sides.duplicated()
    if conflict.any():
        pos = _first(conflict)
        first = _first(sides["comparison_id"] == sides["comparison_id"].iloc[pos])
        raise ValueError(
            f"{_row(answers, pos)}: left/right methods {tuple(sides.iloc[pos, 1:])} contradict "
            f"{_row(answers, first)} with {tuple(sides.iloc[first, 1:])}; export the answers again from the server"
        )
    if manifest is not None:
        check_against_manifest(answers, manifest)
    return answers


def preference_table(answers: pd.DataFrame, method: str, alpha: float = 0.05,
                     manifest: dict | None = None) -> pd.DataFrame:
    """Votes for `method` per (opponent, criterion), with χ² tests.

    Args:
        answers: rows in the CSV schema (rater_id, comparison_id, prompt, left_method, right_method,
            criterion, choice).
        method: the method whose share is reported (e.g. "ours" / the 4D-fy variant name).
        alpha: significance level (paper: 0.05).
        manifest: the site's manifest; when given, every row's left/right methods must match it.

    Returns:
        DataFrame with columns RESULT_COLUMNS, one row per (baseline, criterion), criteria in Table 2's
        order (AQ, SQ, MQ, TA, Overall). Comparisons that do not involve `method` are left out.
    """
    answers = check_answers(answers, manifest)
    involved = (answers["left_method"] == method) | (answers["right_method"] == method)
    if not involved.any():
        methods = sorted(set(answers["left_method"]) | set(answers["right_method"]))
        raise ValueError(f"method {method!r} appears in no comparison; methods present: {methods}")
    mine = answers[involved]
    chosen = mine["left_method"].where(mine["choice"] == "left", mine["right_method"])
    opponent = mine["right_method"].where(mine["left_method"] == method, mine["left_method"])
    votes = pd.DataFrame({
        "baseline": opponent.to_numpy(),
        "criterion": mine["criterion"].to_numpy(),
        "for_method": (chosen == method).to_numpy(),
    })
    rows: list[dict] = []
    for baseline in sorted(votes["baseline"].unique()):
        for criterion in CRITERION_KEYS:
            sel = votes[(votes["baseline"] == baseline) & (votes["criterion"] == criterion)]
            if sel.empty:
                continue
            res = preference_test(int(sel["for_method"].sum()), len(sel), alpha=alpha)
            rows.append({"baseline": baseline, "criterion": criterion, "votes_for": res.votes_for,
                         "total": res.total, "share": res.share, "statistic": res.statistic,
                         "p_value": res.p_value, "significant": res.significant, "ci_low": res.ci_low,
                         "ci_high": res.ci_high})
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def read_manifest(path: Path) -> dict:
    """The manifest.json at `path`, or in the site folder `path`."""
    path = Path(path)
    path = path / "manifest.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not a manifest (bad JSON: {exc})") from None


def table2_shares(results: pd.DataFrame) -> pd.DataFrame:
    """Table 2 layout: one row per baseline, one column per criterion, share for the method in %."""
    wide = results.pivot(index="baseline", columns="criterion", values="share") * 100.0
    return wide[[c for c in CRITERION_KEYS if c in wide.columns]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userstudy.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("answers", type=Path, help="CSV from /export.csv")
    parser.add_argument("--method", required=True, help="method whose preference share is reported")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (paper: 0.05)")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="the served site's manifest.json (or the site folder): check every row against it")
    parser.add_argument("--json", action="store_true", help="print JSON records instead of tables")
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(args.manifest) if args.manifest is not None else None
        results = preference_table(load_answers(args.answers, manifest), args.method, alpha=args.alpha)
    except (ValueError, OSError) as exc:
        print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr)  # one line, no traceback
        return 2
    if args.json:
        json.dump({"method": args.method, "results": results.to_dict(orient="records")}, sys.stdout, indent=2)
        print()
        return 0
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(f"Votes for {args.method!r} (chi-squared vs 50/50, alpha={args.alpha}):")
        print(results.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print()
        print(f"Table 2 (% of votes for {args.method!r}):")
        print(table2_shares(results).round(0).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
