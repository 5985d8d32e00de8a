"""eval.stats: χ² preference test against scipy, Wilson interval, and the paper's claims table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from eval.stats import (
    PAPER_SHARES_VS_MAV3D,
    _rounding_vote_range,
    check_paper_claims,
    main,
    min_total_for_significance,
    preference_test,
    wilson_interval,
)


@pytest.mark.parametrize("votes_for,total", [(15, 20), (10, 20), (0, 7), (7, 7), (670, 728), (298, 728),
                                             (379, 728), (1, 2), (230, 442)])
def test_statistic_and_p_value_match_scipy_chisquare(votes_for: int, total: int) -> None:
    res = preference_test(votes_for, total)
    ref = sps.chisquare([votes_for, total - votes_for])  # default f_exp: uniform = N/2 each
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-12, abs=1e-12)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-10, abs=1e-300)
    assert res.share == votes_for / total
    assert res.significant == (ref.pvalue < 0.05)


def test_hand_computed_example() -> None:
    # 15 of 20: E = 10, statistic = 2 * 5^2 / 10 = 5; for df = 1, P(χ² >= x) = erfc(sqrt(x / 2)).
    res = preference_test(15, 20)
    assert res.statistic == pytest.approx(5.0)
    assert res.p_value == pytest.approx(math.erfc(math.sqrt(2.5)), rel=1e-12)
    assert res.p_value == pytest.approx(0.025347, abs=1e-6)
    assert res.significant
    assert not preference_test(15, 20, alpha=0.01).significant


def test_wilson_interval_published_example() -> None:
    # Newcombe (1998), Stat. Med. 17:857, Table I example 81/263: Wilson score interval 0.2553-0.3662.
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-5)
    assert hi == pytest.approx(0.3662, abs=5e-5)


@pytest.mark.parametrize("votes_for,total", [(81, 263), (3, 10), (0, 12), (12, 12), (298, 728), (1, 1)])
def test_wilson_interval_is_the_closed_form(votes_for: int, total: int) -> None:
    # Wilson (1927): (p̂ + z²/2n ± z √(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n), z = Φ⁻¹(0.975), typed in here.
    z = 1.959963984540054
    n, p_hat = float(total), votes_for / total
    centre = (p_hat + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p_hat * (1 - p_hat) / n + z * z / (4 * n * n))
    lo, hi = wilson_interval(votes_for, total)
    assert lo == pytest.approx(max(centre - half, 0.0), abs=1e-12)
    assert hi == pytest.approx(min(centre + half, 1.0), abs=1e-12)


@pytest.mark.parametrize("votes_for,total", [(81, 263), (3, 10), (0, 12), (12, 12), (298, 728)])
def test_wilson_bounds_are_where_the_score_test_has_p_005(votes_for: int, total: int) -> None:
    # The Wilson interval inverts the χ² test: at each finite bound p0 the test of H0: share = p0
    # has p = 0.05 exactly (scipy, with expected counts N p0 and N (1 - p0)).
    res = preference_test(votes_for, total)
    for bound in (res.ci_low, res.ci_high):
        if bound in (0.0, 1.0):
            continue
        p = sps.chisquare([votes_for, total - votes_for], f_exp=[total * bound, total * (1 - bound)]).pvalue
        assert p == pytest.approx(0.05, abs=1e-9)
    assert res.ci_low <= res.share <= res.ci_high
    if votes_for == 0:
        assert res.ci_low == 0.0
    if votes_for == total:
        assert res.ci_high == 1.0


@pytest.mark.parametrize("total", [1, 9, 50, 728])
def test_significant_exactly_when_half_is_outside_the_interval(total: int) -> None:
    for k in range(total + 1):
        res = preference_test(k, total)
        outside = res.ci_high < 0.5 or res.ci_low > 0.5
        assert res.significant == outside, (k, total, res)


@pytest.mark.parametrize("args,error", [
    ((1, 0), ValueError), ((5, 4), ValueError), ((-1, 4), ValueError), ((1.0, 4), TypeError),
    ((1, 4.0), TypeError), ((True, 4), TypeError), (("3", 4), TypeError),
])
def test_bad_counts_raise(args: tuple, error: type[Exception]) -> None:
    with pytest.raises(error):
        preference_test(*args)


def test_bad_alpha_raises_and_numpy_ints_are_accepted() -> None:
    with pytest.raises(ValueError, match="alpha"):
        preference_test(3, 4, alpha=0.0)
    res = preference_test(np.int64(3), np.int64(4))
    assert isinstance(res.votes_for, int) and res.total == 4


def test_rounding_range_is_every_count_printing_as_the_same_percent() -> None:
    for share in PAPER_SHARES_VS_MAV3D.values():
        for total in (728, 442):
            brute = [k for k in range(total + 1) if share - 0.005 <= k / total <= share + 0.005]
            assert list(_rounding_vote_range(share, total)) == brute


def test_paper_claims_table() -> None:
    rows = {(r.total, r.criterion): r for r in check_paper_claims()}
    assert {t for t, _ in rows} == {728, 442}  # 26 x 28 and 26 x 17
    for (total, criterion), row in rows.items():
        share = PAPER_SHARES_VS_MAV3D[criterion]
        assert row.votes_for == round(share * total)
        ref = sps.chisquare([row.votes_for, total - row.votes_for])
        assert row.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)
        assert row.p_value_min <= row.p_value <= row.p_value_max
    # What the test says about the paper's text (Sec. 4.2), checked against scipy above:
    for total in (728, 442):
        for criterion in ("AQ", "SQ", "Overall"):
            assert rows[(total, criterion)].verdict == "supported"
        # "statistically significant preference ... text alignment": 52 % is not significant.
        assert rows[(total, "TA")].verdict == "contradicted"
        assert rows[(total, "TA")].p_value_max > rows[(total, "TA")].p_value_min > 0.05
        # "motion quality roughly on par": 41 % rejects 50/50, towards MAV3D.
        assert rows[(total, "MQ")].verdict == "contradicted"
        assert rows[(total, "MQ")].p_value_max < 0.05
    assert rows[(728, "TA")].votes_for == 379
    assert rows[(728, "MQ")].votes_for == 298


def test_cli_json_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--paper", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["paper"]) == 10
    assert {r["verdict"] for r in data["paper"] if r["criterion"] == "TA"} == {"contradicted"}
    assert main(["--paper", "--votes", "15", "20"]) == 0
    out = capsys.readouterr().out
    assert "26 raters x 28 prompts (N=728)" in out and "26 raters x 17 prompts (N=442)" in out
    assert "chi2 5.000" in out


def test_min_total_for_significance_matches_scipy() -> None:
    n = min_total_for_significance(0.52)
    assert n == 2401  # 1.96^2 / (4 * 0.02^2) = 2400.9
    for total, significant in ((n, True), (n - 1, False)):
        p = sps.chisquare([0.52 * total, 0.48 * total]).pvalue
        assert (p < 0.05) == significant
    assert min_total_for_significance(0.41) == min_total_for_significance(0.59)
    with pytest.raises(ValueError, match="differ from 0.5"):
        min_total_for_significance(0.5)


@pytest.mark.parametrize("argv,message", [
    (["--votes", "30", "20"], "--votes FOR TOTAL: FOR must lie in [0, TOTAL=20]"),
    (["--votes", "-1", "20"], "FOR must lie in [0, TOTAL=20], got -1"),
    (["--votes", "0", "0"], "TOTAL counts every vote cast and must be > 0"),
    (["--paper", "--alpha", "1.5"], "--alpha must lie in (0, 1)"),
])
def test_cli_bad_values_are_one_line_with_status_2(argv: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("python -m eval.stats: error: ")
    assert message in captured.err and captured.err.count("\n") == 1, captured.err
