"""Paired differences with a Student t confidence interval, in pure Python (the API and benchmarks use it).

    d = paired_difference({0: 0.97, 1: 0.96, 2: 0.98}, {0: 0.95, 1: 0.96, 2: 0.97})   # a - b, paired by key
    d.mean, d.std, d.n, d.ci_low, d.ci_high, d.significant

Pairs are matched by key (e.g. the seed): only keys present in both count. The interval is
`mean +- t_{1 - alpha/2, n-1} * std / sqrt(n)` with the sample standard deviation (n - 1); with
n < 2 there is no spread, so std and the interval are None and nothing is significant.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from functools import lru_cache

CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedDifference:
    mean: float | None              # mean of a[k] - b[k] over the shared keys (None when there are none)
    std: float | None               # sample standard deviation of the differences (None when n < 2)
    n: int                          # number of pairs
    ci_low: float | None            # the confidence interval of the mean difference (None when n < 2)
    ci_high: float | None
    confidence: float               # e.g. 0.95
    keys: tuple[Hashable, ...]      # the paired keys, sorted

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0 (a two-sided test at level 1 - confidence)."""
        return self.ci_low is not None and (self.ci_low > 0 or self.ci_high < 0)


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """`a[k] - b[k]` over the keys both have: mean, std, n and the Student t interval of the mean."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    keys = tuple(sorted(set(a) & set(b), key=repr))
    i = paired_t_interval([float(a[k]) - float(b[k]) for k in keys], confidence)
    return PairedDifference(i.mean, i.std, i.n, i.ci_low, i.ci_high, confidence, keys)


# ---------------------------------------------------------------------------------------------
# Student's t distribution.

def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; converges for
    x < (a + 1) / (a + b + 2) in about sqrt(max(a, b)) terms)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_upper_tail(t: float, dof: float) -> float:
    """P(T > t) for T ~ Student t with `dof` degrees of freedom, t >= 0: I_{dof/(dof+t^2)}(dof/2, 1/2) / 2."""
    return 0.5 * betainc(dof / 2.0, 0.5, dof / (dof + t * t))


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t), T ~ Student t with `dof` > 0 degrees of freedom."""
    tail = t_upper_tail(abs(t), dof)
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=4096)
def t_quantile(p: float, dof: float) -> float:
    """The p-quantile of Student's t with `dof` > 0 degrees of freedom (t_{0.975, 1} = 12.706...).

    Bisection on the upper tail P(T > t) = 1 - p, which is monotone in t, to the last bit of a float."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not dof > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {dof}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    target = 1.0 - p
    lo, hi = 0.0, 1.0
    while t_upper_tail(hi, dof) > target:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            raise ArithmeticError(f"t quantile p={p}, dof={dof} is beyond float range")
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_upper_tail(mid, dof) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------
# The paired t interval.

@dataclasses.dataclass(frozen=True)
class PairedInterval:
    """Mean of the paired statistic d over n pairs, its sample std and its confidence interval.

    std is None for n < 2 (undefined), the interval is None for n < 2; everything is None for n = 0."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    t: float | None  # the quantile used: t_{(1+confidence)/2, n-1}


def paired_t_interval(diffs: list[float], confidence: float = CONFIDENCE) -> PairedInterval:
    """mean +- t_{(1+confidence)/2, n-1} * std / sqrt(n) of the per-pair statistics `diffs`."""
    n = len(diffs)
    if n == 0:
        return PairedInterval(0, None, None, None, None, None)
    mean = math.fsum(diffs) / n
    if n == 1:
        return PairedInterval(1, mean, None, None, None, None)
    std = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    t = t_quantile(0.5 + confidence / 2.0, n - 1)
    half = t * std / math.sqrt(n)
    return PairedInterval(n, mean, std, mean - half, mean + half, t)


# ---------------------------------------------------------------------------------------------
# Pairing a sweep's jobs.
