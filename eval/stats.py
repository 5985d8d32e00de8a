"""Significance of head-to-head preference votes (paper Sec. 4.1, Table 2).

The paper reports, per criterion, the share of votes for 4D-fy over a baseline and says it ran
"χ²-tests to evaluate statistical significance at the p < 0.05 level". The authors' user-study app
(victor-rong/video-generation-study, `utils/query.js`) computes a goodness-of-fit test against a
50/50 split: statistic 2(O − E)²/E with E = N/2 and df = 1, where N counts every (rater, comparison)
vote. That equals the two-cell Pearson statistic (O − E)²/E + ((N − O) − E)²/E.

`python -m eval.stats --paper` applies the same test to the paper's own percentages and says which of
its significance claims the test supports.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from scipy.stats import binomtest, chi2

# Two cells (prefer A / prefer B) with fixed N: one degree of freedom (authors' app, `df = 1`).
_DF = 1


@dataclass(frozen=True)
class PreferenceResult:
    """One criterion's votes for a method, its χ² test against 50/50 and a 95 % Wilson interval."""

    votes_for: int  # votes for the method (O)
    total: int  # all votes on this criterion (N)
    share: float  # votes_for / total, in [0, 1]
    statistic: float  # 2 (O - N/2)^2 / (N/2), χ² with df = 1
    p_value: float  # P(χ²_1 >= statistic)
    significant: bool  # p_value < alpha (the paper's "p < 0.05")
    ci_low: float  # lower end of the Wilson score interval for the share
    ci_high: float  # upper end of the Wilson score interval for the share
    alpha: float  # significance level used for `significant`


def _check_count(name: str, value: object) -> int:
    # bool is an int subclass; True/False as a vote count is almost surely a bug upstream.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer count, got {type(value).__name__} ({value!r})")
    return int(value)


def _check_votes(votes_for: int, total: int) -> tuple[int, int]:
    """Validated (votes_for, total): integers with 0 <= votes_for <= total and total > 0."""
    votes_for = _check_count("votes_for", votes_for)
    total = _check_count("total", total)
    if total <= 0:
        raise ValueError(f"total must be > 0 (no votes cast?), got {total}")
    if not 0 <= votes_for <= total:
        raise ValueError(f"votes_for must lie in [0, total={total}], got {votes_for}")
    return votes_for, total


def wilson_interval(votes_for: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial share votes_for / total.

    It is the set of true shares p0 that the score (χ²) test does not reject, so it agrees with
    `preference_test`: 0.5 lies outside the 95 % interval exactly when the test is significant at 0.05.
    """
    votes_for, total = _check_votes(votes_for, total)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    # scipy's Wilson interval (without continuity correction); it returns exactly 0 at O = 0 and 1 at O = N.
    ci = binomtest(votes_for, total).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def preference_test(votes_for: int, total: int, alpha: float = 0.05) -> PreferenceResult:
    """χ² goodness-of-fit test of `votes_for` out of `total` votes against a 50/50 split.

    Args:
        votes_for: votes for the method of interest (O), 0 <= O <= N.
        total: all votes cast on this criterion (N > 0), e.g. raters × comparisons.
        alpha: significance level, 0.05 in the paper (Sec. 4.1).
    """
    votes_for, total = _check_votes(votes_for, total)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    expected = total / 2.0
    # 2(O − E)²/E, E = N/2: the authors' app (utils/query.js, `test_statistic`).
    statistic = 2.0 * (votes_for - expected) ** 2 / expected
    p_value = float(chi2.sf(statistic, _DF))
    ci_low, ci_high = wilson_interval(votes_for, total, confidence=0.95)
    return PreferenceResult(
        votes_for=votes_for,
        total=total,
        share=votes_for / total,
        statistic=float(statistic),
        p_value=p_value,
        significant=p_value < alpha,
        ci_low=ci_low,
        ci_high=ci_high,
        alpha=alpha,
    )


# ----------------------------------------------------------------------------------------------
# The paper's Table 2 against its own text.

# Table 2, row "MAV3D": share of votes for 4D-fy over MAV3D per criterion (paper Sec. 4.2).
PAPER_SHARES_VS_MAV3D: dict[str, float] = {"AQ": 0.92, "SQ": 0.89, "MQ": 0.41, "TA": 0.52, "Overall": 0.67}
# Sec. 4.2: "a statistically significant preference towards 4D-fy compared to MAV3D in terms of
# appearance quality, 3D structure quality, text alignment, and overall preference. They rated the
# motion quality roughly on par with MAV3D". True = claimed significant, False = claimed on par.
PAPER_CLAIMS_SIGNIFICANT: dict[str, bool] = {"AQ": True, "SQ": True, "MQ": False, "TA": True, "Overall": True}
# Sec. 4.1: 26 evaluators; CVPR text: 28 MAV3D prompts; arXiv v1 (supplement S2): 17 MAV3D questions.
PAPER_RATERS = 26
PAPER_PROMPTS_CVPR = 28
PAPER_PROMPTS_V1 = 17
# Table 2 prints whole percentages, so the true share lies within ±0.5 percentage points.
_ROUNDING = 0.005


@dataclass(frozen=True)
class ClaimCheck:
    """One row of `python -m eval.stats --paper`: the test on a reported percentage vs the paper's claim."""

    setting: str  # e.g. "CVPR: 26 raters x 28 prompts"
    criterion: str  # AQ, SQ, MQ, TA or Overall
    reported_share: float  # the percentage printed in Table 2, as a fraction
    total: int  # N = raters × prompts
    votes_for: int  # round(reported_share * N)
    statistic: float  # χ² statistic at votes_for
    p_value: float  # p-value at votes_for
    p_value_min: float  # smallest p over all vote counts that print as the same whole percentage
    p_value_max: float  # largest p over those vote counts
    ci_low: float  # Wilson 95 % interval at votes_for
    ci_high: float  # upper end of that interval
    claimed_significant: bool  # what the paper's text says
    verdict: str  # "supported", "contradicted" or "depends on rounding"
    alpha: float  # significance level of the test
    note: str  # direction of the effect when it matters


def _rounding_vote_range(share: float, total: int) -> range:
    """All vote counts k whose share k/N prints as the same whole percentage as `share`."""
    lo = math.ceil((share - _ROUNDING) * total - 1e-9)
    hi = math.floor((share + _ROUNDING) * total + 1e-9)
    return range(max(0, lo), min(total, hi) + 1)


def check_paper_claims(
    raters: int = PAPER_RATERS, prompts: Sequence[int] = (PAPER_PROMPTS_CVPR, PAPER_PROMPTS_V1),
    alpha: float = 0.05,
) -> list[ClaimCheck]:
    """Re-test Table 2's MAV3D row with N = raters × prompts for each prompt count."""
    rows: list[ClaimCheck] = []
    for n_prompts in prompts:
        total = raters * n_prompts
        label = {PAPER_PROMPTS_CVPR: "CVPR", PAPER_PROMPTS_V1: "arXiv v1"}.get(n_prompts, "")
        setting = f"{label + ': ' if label else ''}{raters} raters x {n_prompts} prompts (N={total})"
        for criterion, share in PAPER_SHARES_VS_MAV3D.items():
            votes = round(share * total)
            res = preference_test(votes, total, alpha=alpha)
            p_values = [preference_test(k, total, alpha=alpha).p_value
                        for k in _rounding_vote_range(share, total)]
            claimed = PAPER_CLAIMS_SIGNIFICANT[criterion]
            all_sig = all(p < alpha for p in p_values)
            none_sig = all(p >= alpha for p in p_values)
            if (claimed and all_sig) or (not claimed and none_sig):
                verdict = "supported"
            elif (claimed and none_sig) or (not claimed and all_sig):
                verdict = "contradicted"
            else:
                verdict = "depends on rounding"
            note = ""
            if res.significant and share < 0.5:
                note = "significant preference for MAV3D, not parity"
            elif not res.significant and claimed:
                note = "no significant difference from 50/50"
            rows.append(ClaimCheck(
                setting=setting, criterion=criterion, reported_share=share, total=total, votes_for=votes,
                statistic=res.statistic, p_value=res.p_value, p_value_min=min(p_values),
                p_value_max=max(p_values), ci_low=res.ci_low, ci_high=res.ci_high,
                claimed_significant=claimed, verdict=verdict, alpha=alpha, note=note,
            ))
    return rows


def min_total_for_significance(share: float, alpha: float = 0.05) -> int:
    """Smallest N at which a share (≠ 0.5) rejects 50/50: 2(O − E)²/E = 4N(share − ½)² > χ²_1(1 − α)."""
    if not 0.0 <= share <= 1.0 or share == 0.5:
        raise ValueError(f"share must lie in [0, 1] and differ from 0.5, got {share}")
    critical = float(chi2.isf(alpha, _DF))
    return math.floor(critical / (4.0 * (share - 0.5) ** 2)) + 1


def format_claims_table(rows: Sequence[ClaimCheck]) -> str:
    """Plain-text table of `check_paper_claims` rows."""
    header = (f"{'criterion':<9} {'share':>6} {'votes':>9} {'chi2':>8} {'p':>10} {'p range (rounding)':>23} "
              f"{'95% Wilson CI':>15} {'paper claims':>13}  verdict")
    lines: list[str] = []
    setting = None
    for r in rows:
        if r.setting != setting:
            setting = r.setting
            lines += ["", setting, header, "-" * len(header)]
        claim = "significant" if r.claimed_significant else "on par"
        lines.append(
            f"{r.criterion:<9} {r.reported_share:>6.0%} {f'{r.votes_for}/{r.total}':>9} {r.statistic:>8.2f} "
            f"{r.p_value:>10.2e} {f'[{r.p_value_min:.1e}, {r.p_value_max:.1e}]':>23} "
            f"{f'[{r.ci_low:.3f}, {r.ci_high:.3f}]':>15} {claim:>13}  {r.verdict}"
            + (f" ({r.note})" if r.note else "")
        )
    alpha = rows[0].alpha if rows else 0.05
    lines.append("")
    lines.append("Both settings use the CVPR Table 2 percentages. p range: over every vote count that")
    lines.append("rounds to the printed percentage; 'supported'/'contradicted' hold across that range.")
    for criterion, share in PAPER_SHARES_VS_MAV3D.items():
        if any(r.criterion == criterion and r.verdict == "contradicted" and r.claimed_significant
               for r in rows):
            lines.append(f"{criterion}: {share:.0%} rejects 50/50 at alpha={alpha} only from N >= "
                         f"{min_total_for_significance(share, alpha)} votes.")
    return "\n".join(lines).lstrip("\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.stats", description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true",
                        help="re-test Table 2's MAV3D row (26 raters x 28 prompts, and x 17 for arXiv v1)")
    parser.add_argument("--votes", type=int, nargs=2, metavar=("FOR", "TOTAL"),
                        help="test FOR votes out of TOTAL against 50/50")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (paper: 0.05)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if not args.paper and args.votes is None:
        parser.error("give --paper or --votes FOR TOTAL")

    def usage_error(message: str) -> int:  # one line and argparse's exit status, without the usage text
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2

    if args.votes is not None:
        votes_for, total = args.votes
        if total <= 0:
            return usage_error(f"--votes FOR TOTAL: TOTAL counts every vote cast and must be > 0, got {total}")
        if not 0 <= votes_for <= total:
            return usage_error(f"--votes FOR TOTAL: FOR must lie in [0, TOTAL={total}], got {votes_for} (FOR: "
                               "votes for the method, TOTAL: all votes cast)")
    if not 0.0 < args.alpha < 1.0:
        return usage_error(f"--alpha must lie in (0, 1) (the paper: 0.05), got {args.alpha}")
    out: dict[str, object] = {}
    if args.votes is not None:
        res = preference_test(args.votes[0], args.votes[1], alpha=args.alpha)
        out["votes"] = asdict(res)
        if not args.json:
            print(f"share {res.share:.3f}  chi2 {res.statistic:.3f}  p {res.p_value:.3g}  "
                  f"significant {res.significant}  95% CI [{res.ci_low:.3f}, {res.ci_high:.3f}]")
    if args.paper:
        rows = check_paper_claims(alpha=args.alpha)
        out["paper"] = [asdict(r) for r in rows]
        if not args.json:
            print(format_claims_table(rows))
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
