"""eval.paired: t intervals against scipy, sign-flip p-values against hand counts, exact fractions and scipy."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats as sps

from eval.paired import EXACT_MAX_PAIRS, mean_interval, min_pairs_for_significance, paired_test, sign_flip_p_value


@pytest.mark.parametrize("n", [2, 3, 5, 12, 40])
@pytest.mark.parametrize("level", [0.95, 0.9])
def test_mean_interval_matches_scipy_t(n: int, level: float) -> None:
    x = np.random.default_rng(n).normal(3.0, 2.0, size=n)
    res = mean_interval(x, level)
    low, high = sps.t.interval(level, n - 1, loc=x.mean(), scale=sps.sem(x))
    ci = sps.ttest_1samp(x, 0.0).confidence_interval(confidence_level=level)
    assert res.n == n and res.mean == pytest.approx(x.mean(), rel=1e-14)
    # A handful of float operations on O(1) numbers: agreement to ~1e-15, asserted at 1e-12.
    for ref_low, ref_high in ((low, high), (ci.low, ci.high)):
        assert res.low == pytest.approx(ref_low, rel=1e-12) and res.high == pytest.approx(ref_high, rel=1e-12)


def test_mean_interval_hand_computed() -> None:
    # 1, 2, 3: mean 2, s = 1, t_{2, 0.975} = 4.302652729749464 (tables), half-width 4.3027 / √3 = 2.48414.
    res = mean_interval([1.0, 2.0, 3.0])
    assert res.mean == 2.0 and res.high - res.mean == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-12)


def test_mean_interval_edge_cases() -> None:
    one = mean_interval([4.5])
    assert (one.mean, one.n) == (4.5, 1) and math.isnan(one.low) and math.isnan(one.high)
    same = mean_interval([2.0, 2.0, 2.0])
    assert (same.low, same.mean, same.high) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="values is empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="NaN or inf at positions \\[1\\]"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="level must lie in \\(0, 1\\)"):
        mean_interval([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="1-D"):
        mean_interval([[1.0, 2.0]])


# Sign-flip p-values counted by hand. p = #{sign patterns s : |Σ s_i d_i| >= |Σ d_i|} / 2^n.
@pytest.mark.parametrize("d,expected", [
    # n = 3, all positive, distinct: the sums ±1±2±3 are 6, 4, 2, 0, 0, −2, −4, −6; |sum| >= 6 twice: 2/8.
    ([1.0, 2.0, 3.0], 2 / 8),
    # n = 5, all positive: only the all-plus and all-minus patterns reach |sum| = Σ|d|: 2/32 (never < 0.05).
    ([0.5, 1.0, 2.0, 3.5, 4.0], 2 / 32),
    # n = 6, all positive: 2/64, the smallest n that can reach p < 0.05.
    ([1.0, 1.0, 2.0, 3.0, 5.0, 8.0], 2 / 64),
    # One negative: |d| = 1..5, observed 15 − 2·1 = 13. With W the |d|-weight of the flipped set, |15 − 2W| >= 13
    # iff W <= 1 (flip nothing, or the 1) or W >= 14 (their complements): 4/32.
    ([2.0, 3.0, 4.0, 5.0, -1.0], 4 / 32),
    # Ties: 1, 1, 1, 1 is extreme only all-plus / all-minus: 2/16 (equal values are not ties of patterns).
    ([1.0, 1.0, 1.0, 1.0], 2 / 16),
    # Float ties: |d| = .1, .2, .3, .5 (Σ 1.1), observed 1.1 − 2·0.3 = 0.5. |1.1 − 2W| >= 0.5 iff W <= 0.3 or
    # W >= 0.8. Subset weights <= 0.3: {}, {.1}, {.2}, {.3}, {.1,.2}; >= 0.8: their complements: 10/16.
    # In floats 0.1 + 0.2 != 0.3, so without the tolerance {.1,.2} and its complement are lost: 8/16.
    ([0.1, 0.2, -0.3, 0.5], 10 / 16),
    # A zero changes nothing: the patterns of (1, 2, 3) each appear twice: 4/16 = 2/8.
    ([1.0, 0.0, 2.0, 3.0], 2 / 8),
])
def test_sign_flip_p_values_counted_by_hand(d: list[float], expected: float) -> None:
    res = paired_test(np.array(d), np.zeros(len(d)))
    assert res.exact and res.n == len(d)
    assert res.p_value == expected  # k / 2^n with k and 2^n small integers: exact in floats
    assert res.diff == pytest.approx(np.mean(d), rel=1e-15)


def test_the_float_tie_case_needs_the_tolerance() -> None:
    # The case above, compared without tolerance: proof that the test exercises it (else it would prove nothing).
    d = np.array([0.1, 0.2, -0.3, 0.5])
    naive = sum(abs(np.dot(s, d)) >= abs(d.sum()) for s in itertools.product((1, -1), repeat=4)) / 16
    assert naive == 8 / 16 and sign_flip_p_value(d) == (10 / 16, True)


def _exact_fraction_p(d: list[Fraction]) -> float:
    """Reference p-value in exact rational arithmetic: no rounding, so no tolerance."""
    observed = abs(sum(d))
    hits = sum(abs(sum(s * v for s, v in zip(signs, d, strict=True))) >= observed
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


@pytest.mark.parametrize("seed", range(6))
def test_p_values_are_exact_on_decimal_data_with_ties(seed: int) -> None:
    # One-decimal differences: many patterns tie in exact arithmetic and differ in floats.
    rng = np.random.default_rng(seed)
    tenths = rng.integers(-9, 10, size=int(rng.integers(4, 11)))
    d = [Fraction(int(k), 10) for k in tenths]
    p, exact = sign_flip_p_value(np.array([float(v) for v in d]))
    assert exact and p == _exact_fraction_p(d)


@pytest.mark.parametrize("n", [2, 4, 7, 10, 13])
def test_p_values_match_scipy_permutation_test(n: int) -> None:
    rng = np.random.default_rng(100 + n)
    a, b = rng.normal(0.3, 1.0, size=n), rng.normal(0.0, 1.0, size=n)
    res = paired_test(a, b)
    ref = sps.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
                               permutation_type="samples", alternative="two-sided", n_resamples=np.inf)
    assert res.exact and res.p_value == pytest.approx(ref.pvalue, abs=1e-15)  # both k / 2^n
    assert res.diff == pytest.approx(ref.statistic, rel=1e-12)
    ci = sps.ttest_rel(a, b).confidence_interval(confidence_level=0.95)
    assert res.low == pytest.approx(ci.low, rel=1e-12) and res.high == pytest.approx(ci.high, rel=1e-12)


def _exact_integer_p(d: np.ndarray) -> float:
    """Exact p for integer differences by counting subset sums (dynamic programming over Σ s_i d_i)."""
    counts = {0: 1}
    for v in d.astype(int).tolist():
        nxt: dict[int, int] = {}
        for total, c in counts.items():
            for s in (v, -v):
                nxt[total + s] = nxt.get(total + s, 0) + c
        counts = nxt
    observed = abs(int(d.sum()))
    return sum(c for total, c in counts.items() if abs(total) >= observed) / 2 ** len(d)


def test_monte_carlo_beyond_16_pairs_is_close_to_exact_and_seeded() -> None:
    d = np.random.default_rng(7).integers(-6, 9, size=24).astype(float)
    d = d[d != 0][:22]
    assert len(d) > EXACT_MAX_PAIRS
    exact = _exact_integer_p(d)
    p, is_exact = sign_flip_p_value(d)
    assert not is_exact and p == sign_flip_p_value(d)[0]  # seeded: the same table twice
    # (k + 1) / (N + 1) with N = 20000 draws: binomial standard error sqrt(p (1 − p) / N); 5 SE + the +1 bias.
    assert abs(p - exact) <= 5 * math.sqrt(exact * (1 - exact) / 20_000) + 1 / 20_001, (p, exact)
    assert 0.001 < exact < 0.9  # a p-value where the check has teeth
    # The same differences with room for exact enumeration: the exact count.
    assert sign_flip_p_value(d, exact_max=len(d)) == (pytest.approx(exact, abs=1e-15), True)


def test_paired_edge_cases() -> None:
    with pytest.raises(ValueError, match="a is empty"):
        paired_test([], [])
    with pytest.raises(ValueError, match="equal length, got 2 and 3"):
        paired_test([1.0, 2.0], [1.0, 2.0, 3.0])
    one = paired_test([3.0], [1.0])
    assert (one.diff, one.p_value, one.n) == (2.0, 1.0, 1) and math.isnan(one.low) and math.isnan(one.high)
    zero = paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (zero.diff, zero.low, zero.high, zero.p_value, zero.exact) == (0.0, 0.0, 0.0, 1.0, True)
    with pytest.raises(ValueError, match="draws must be >= 1"):
        sign_flip_p_value(np.ones(20), draws=0)


def test_fewest_pairs_that_can_be_significant() -> None:
    # 2/2^5 = 0.0625 >= 0.05 > 2/2^6 = 0.03125; 2/2^7 = 0.0156 >= 0.01 > 2/2^8 = 0.0078; 0.0625 itself is not < 0.0625.
    assert [min_pairs_for_significance(a) for a in (0.05, 0.01, 0.0625)] == [6, 8, 6]
    assert paired_test(np.arange(1.0, 7.0), np.zeros(6)).p_value < 0.05 <= paired_test(np.ones(5), np.zeros(5)).p_value
    with pytest.raises(ValueError, match="alpha must lie in"):
        min_pairs_for_significance(0.0)
