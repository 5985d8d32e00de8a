"""Uncertainty for Table 2: a t interval for a row's mean, and a paired test of an ablation against the full model.

Pure functions on 1-D numpy arrays (ablations/collect.py feeds them one value per run, or per prompt).

- ``mean_interval``: mean ± t_{n-1, (1+level)/2} · s/√n (Student t, not a bootstrap: with the 2-10 runs a row
  has, a percentile bootstrap's interval is too narrow, and t is what scipy.stats.ttest_1samp reports).
- ``paired_test``: over matched pairs (same prompt and seed), the mean difference a − b, its t interval, and the
  two-sided sign-flip permutation p-value: under "no effect" each difference is as likely negated, so
  p = P(|mean of the sign-flipped differences| ≥ |observed mean|). Exact (all 2^m sign patterns) for m ≤ 16
  non-zero differences; seeded Monte Carlo beyond that. It assumes no distribution, unlike the paired t-test.
  With m pairs the smallest attainable p is 2/2^m: 5 pairs never reach p < 0.05 (2/32 = 0.0625), 6 do (0.031).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.stats import t as student_t

EXACT_MAX_PAIRS = 16  # enumerate all 2^m sign patterns up to m = 16 non-zero differences (65 536 patterns)
MONTE_CARLO_DRAWS = 20_000  # random sign patterns beyond that: the p-value's standard error is <= 0.0036
MONTE_CARLO_SEED = 0  # fixed: collecting the same runs twice prints the same table
_CHUNK = 4096  # sign patterns per matrix product (bounds memory at 4096 × m floats)


class MeanInterval(NamedTuple):
    """A mean and its t confidence interval (NaN bounds for n = 1)."""

    mean: float
    low: float
    high: float
    n: int  # number of values


class PairedResult(NamedTuple):
    """Paired comparison of a with b over matched pairs."""

    diff: float  # mean of a − b
    low: float  # t interval of the mean difference (NaN for n = 1)
    high: float
    p_value: float  # two-sided sign-flip permutation p-value
    n: int  # number of pairs (zero differences included)
    exact: bool  # True: all 2^m sign patterns; False: Monte Carlo, (k + 1) / (N + 1)


def _as_values(values: object, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of values, got shape {x.shape}; pass one value per run")
    if x.size == 0:
        raise ValueError(f"{name} is empty: an interval or test needs at least one value (no finished runs?)")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf at positions {np.flatnonzero(~np.isfinite(x)).tolist()}; "
                         "leave runs without the metric out")
    return x


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1) (0.95 for a 95% interval), got {level}")


def mean_interval(values: object, level: float = 0.95) -> MeanInterval:
    """Mean of ``values`` (shape (n,)) and its Student-t interval mean ± t_{n-1,(1+level)/2} · s / √n.

    t-based, not bootstrap (module docstring). The interval treats the values as independent draws: pooled over
    prompts and seeds, the spread between prompts widens it. n = 1: no spread to estimate, NaN bounds. Equal
    values: a zero-width interval. Raises ValueError for no values, NaN/inf, or a level outside (0, 1).
    """
    x = _as_values(values, "values")
    _check_level(level)
    n = x.size
    mean = float(x.mean())
    if n == 1:
        return MeanInterval(mean, float("nan"), float("nan"), 1)
    half = float(student_t.ppf(0.5 + level / 2.0, n - 1)) * float(x.std(ddof=1)) / float(np.sqrt(n))
    return MeanInterval(mean, mean - half, mean + half, n)


def _count_as_extreme(signs: np.ndarray, d: np.ndarray, observed: float, tol: float) -> int:
    """How many rows of ``signs`` (shape (k, m), entries ±1) give |signs @ d| >= observed − tol."""
    return int(np.count_nonzero(np.abs(signs @ d) >= observed - tol))


def sign_flip_p_value(d: np.ndarray, exact_max: int = EXACT_MAX_PAIRS, draws: int = MONTE_CARLO_DRAWS,
                      seed: int = MONTE_CARLO_SEED) -> tuple[float, bool]:
    """Two-sided sign-flip permutation p-value of the differences ``d`` (shape (n,)); returns (p, exact).

    Statistic |Σ s_i d_i| (the mean's n is the same for every pattern s, so sums compare as means do).
    Zeros: a zero difference is unchanged by its flip, so it only doubles every pattern's count; it is left out
    of the enumeration (the same p as enumerating all 2^n, as scipy.stats.permutation_test does, and m ≤ 16
    non-zero differences stay exact). All differences zero: every pattern ties the observed 0, p = 1.
    Float ties: patterns whose sum equals the observed one in exact arithmetic (d = 0.1, 0.2, −0.3, 0.5: flipping
    0.3 or flipping 0.1 and 0.2) can differ from it by rounding; a permuted |sum| within
    tol = 4 · m · eps · Σ|d_i| of the observed counts as "as extreme". A sum of m terms is off by at most
    (m − 1) · eps · Σ|d_i|, both sides of the comparison carry such an error, and 2× margin covers the two
    summation orders (numpy's pairwise sum, the matrix product). Real differences closer than tol also count as
    ties: conservative (p can only grow), and far below any effect a table resolves.
    Exact for m ≤ ``exact_max``: p = k / 2^m (the observed pattern is one of them, so p ≥ 2^-m, and its mirror
    image ties it, so p ≥ 2^(1-m)). Else ``draws`` random patterns (rng seeded with ``seed``) and
    p = (k + 1) / (draws + 1), counting the observed pattern once (valid for a test; never 0).
    """
    nonzero = d[d != 0.0]
    m = nonzero.size
    if m == 0:
        return 1.0, True
    observed = abs(float(nonzero.sum()))
    tol = 4.0 * m * np.finfo(np.float64).eps * float(np.abs(nonzero).sum())
    if m <= exact_max:
        count = 0
        bits = np.arange(m)
        for start in range(0, 2**m, _CHUNK):
            patterns = np.arange(start, min(start + _CHUNK, 2**m))
            signs = 1.0 - 2.0 * ((patterns[:, None] >> bits) & 1)  # bit i set: flip d_i
            count += _count_as_extreme(signs, nonzero, observed, tol)
        return count / 2**m, True
    if draws < 1:
        raise ValueError(f"draws must be >= 1 Monte-Carlo sign patterns (default {MONTE_CARLO_DRAWS}), got {draws}")
    rng = np.random.default_rng(seed)
    count = 0
    for start in range(0, draws, _CHUNK):
        k = min(_CHUNK, draws - start)
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(k, m))
        count += _count_as_extreme(signs, nonzero, observed, tol)
    return (count + 1) / (draws + 1), False


def min_pairs_for_significance(alpha: float) -> int:
    """Fewest non-zero pairs whose exact two-sided sign-flip p can fall below ``alpha``: the smallest attainable p
    with m pairs is 2 / 2^m (all one sign), so the least m with 2 / 2^m < alpha (6 for 0.05)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1) (the paper: 0.05), got {alpha}")
    m = 1
    while 2.0 / 2**m >= alpha:
        m += 1
    return m


def paired_test(a: object, b: object, level: float = 0.95, exact_max: int = EXACT_MAX_PAIRS,
                draws: int = MONTE_CARLO_DRAWS, seed: int = MONTE_CARLO_SEED) -> PairedResult:
    """Paired comparison of ``a`` with ``b`` (shape (n,) each; a[i] and b[i] are one matched pair).

    Returns the mean difference a − b, its Student-t interval at ``level`` (``mean_interval`` of the differences),
    the exact two-sided sign-flip permutation p-value (``sign_flip_p_value``: exact for ≤ ``exact_max`` non-zero
    differences, else a seeded Monte Carlo with ``draws`` patterns) and n. n = 1: NaN interval, p = 1 (a single
    pair's flip is as extreme as itself). Raises ValueError for no pairs, unequal lengths or NaN/inf.
    """
    x, y = _as_values(a, "a"), _as_values(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must be matched pairs of equal length, got {x.size} and {y.size}; "
                         "drop the unmatched values first")
    d = x - y
    interval = mean_interval(d, level)
    p, exact = sign_flip_p_value(d, exact_max, draws, seed)
    return PairedResult(interval.mean, interval.low, interval.high, p, interval.n, exact)
