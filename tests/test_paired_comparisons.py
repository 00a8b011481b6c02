"""core/paired.py and jobs/paired.py without services: the Student t quantile against known values, the paired t interval
against numbers worked out by hand, and the pairing of a grid's jobs by seed."""
from __future__ import annotations

import math

import pytest

from core.paired import betainc, paired_t_interval, t_cdf, t_quantile
from jobs.paired import JobValue, compare_to_baseline, default_comparison

# Two-sided 95% (p = 0.975) and other quantiles of Student's t, from published tables (7+ digits).
TABLE = [
    (0.975, 1, 12.7062047), (0.975, 2, 4.3026527), (0.975, 3, 3.1824463), (0.975, 4, 2.7764451),
    (0.975, 5, 2.5705818), (0.975, 6, 2.4469119), (0.975, 9, 2.2621572), (0.975, 10, 2.2281389),
    (0.975, 20, 2.0859634), (0.975, 30, 2.0422725), (0.975, 60, 2.0002978), (0.975, 120, 1.9799304),
    (0.95, 1, 6.3137515), (0.95, 10, 1.8124611), (0.995, 1, 63.6567412), (0.995, 5, 4.0321430),
    (0.995, 10, 3.1692727), (0.9995, 3, 12.9239786),
]


@pytest.mark.parametrize(("p", "dof", "expected"), TABLE)
def test_t_quantile_matches_the_tables(p, dof, expected):
    assert t_quantile(p, dof) == pytest.approx(expected, abs=6e-7)
    assert t_quantile(1 - p, dof) == pytest.approx(-expected, abs=6e-7)  # symmetric


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999, 0.999999])
def test_t_quantile_matches_the_closed_forms(p):
    """dof 1 (Cauchy): cot(pi (1 - p)); dof 2: (2p - 1) / sqrt(2 p (1 - p)); dof 4: 2 sqrt(q - 1) with
    a = 4p(1 - p), q = cos(arccos(sqrt(a)) / 3) / sqrt(a); and a large dof is the normal quantile."""
    assert t_quantile(p, 1) == pytest.approx(1 / math.tan(math.pi * (1 - p)), rel=1e-12)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)
    a = 4 * p * (1 - p)
    q = math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a)
    assert t_quantile(p, 4) == pytest.approx(2 * math.sqrt(q - 1), rel=1e-10)
    z = {0.6: 0.2533471031357997, 0.9: 1.2815515655446004, 0.975: 1.959963984540054, 0.999: 3.090232306167813,
         0.999999: 4.753424308822899}[p]
    assert t_quantile(p, 1e7) == pytest.approx(z, rel=1e-6)
    assert t_quantile(0.5, 3) == 0.0


def test_t_cdf_inverts_the_quantile_and_betainc_edges():
    for dof in (1, 2, 3, 7.5, 50, 1000):
        for p in (0.51, 0.8, 0.975, 0.9999):
            assert t_cdf(t_quantile(p, dof), dof) == pytest.approx(p, abs=1e-12)
    assert betainc(2, 3, 0) == 0 and betainc(2, 3, 1) == 1
    # I_x(1, 1) = x; I_x(a, 1) = x^a
    assert betainc(1, 1, 0.3) == pytest.approx(0.3, rel=1e-14) and betainc(3, 1, 0.5) == pytest.approx(0.125, rel=1e-13)
    for bad in ((0.0, 3), (1.0, 3), (0.975, 0), (0.975, -1)):
        with pytest.raises(ValueError):
            t_quantile(*bad)


def test_paired_interval_by_hand():
    """Differences 1, 2, 3, 4: mean 2.5, std sqrt(5/3) = 1.2909944, t_{0.975,3} = 3.1824463,
    half width 3.1824463 * 1.2909944 / 2 = 2.0542603."""
    ci = paired_t_interval([1.0, 2.0, 3.0, 4.0])
    assert ci.n == 4 and ci.mean == 2.5 and ci.std == pytest.approx(1.2909944487, rel=1e-9)
    assert ci.ci_low == pytest.approx(2.5 - 2.0542603, abs=1e-6) and ci.ci_high == pytest.approx(2.5 + 2.0542603, abs=1e-6)
    one = paired_t_interval([0.7])
    assert (one.n, one.mean, one.std, one.ci_low, one.ci_high) == (1, 0.7, None, None, None)
    none = paired_t_interval([])
    assert (none.n, none.mean, none.std) == (0, None, None)
    # Two pairs: t_{0.975,1} = 12.7062047; d = 0.1, 0.3 -> mean 0.2, std 0.1414214, half 12.7062047 * 0.1
    two = paired_t_interval([0.1, 0.3])
    assert two.ci_high - two.mean == pytest.approx(1.27062047, rel=1e-7)


POINTS = [{"init": "nkp", "rank": 2}, {"init": "nkp", "rank": 4}, {"init": "spectral", "rank": 2},
          {"init": "spectral", "rank": 4}]


def _jobs(values: dict[tuple[int, int], float | None]) -> list[JobValue]:
    return [JobValue(p, seed, f"j{p}-{seed}", v) for (p, seed), v in values.items()]


def test_pairing_by_seed_with_unpaired_and_nonpositive_seeds():
    jobs = _jobs({
        (0, 0): None, (0, 1): 0.40, (0, 2): 0.30, (0, 3): 0.50,   # seed 0 of nkp r=2 failed
        (2, 0): 0.60, (2, 1): 0.55, (2, 2): 0.35, (2, 3): 0.45,   # spectral r=2
        (1, 0): 0.20, (1, 1): 0.0,                                 # nkp r=4: seed 1 exactly 0
        (3, 0): 0.25, (3, 1): 0.10, (3, 5): 0.3,                   # spectral r=4: seed 5 has no partner
    })
    rows = compare_to_baseline(POINTS, "init", "spectral", jobs, "ratio")
    assert [r["point"] for r in rows] == [POINTS[0], POINTS[1]]
    r2, r4 = rows
    assert r2["baseline_point"] == POINTS[2] and r2["seeds"] == [1, 2, 3] and r2["n_unpaired"] == 1
    logs = [math.log(0.40 / 0.55), math.log(0.30 / 0.35), math.log(0.50 / 0.45)]
    mean = sum(logs) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in logs) / 2)
    half = 4.3026527 * std / math.sqrt(3)
    assert r2["mean"] == pytest.approx(mean, rel=1e-12) and r2["std"] == pytest.approx(std, rel=1e-12)
    assert r2["ci_low"] == pytest.approx(mean - half, abs=1e-7) and r2["ci_high"] == pytest.approx(mean + half, abs=1e-7)
    assert r2["ratio"] == pytest.approx(math.exp(mean), rel=1e-12)
    assert r2["ratio_ci_high"] == pytest.approx(math.exp(mean + half), rel=1e-6)
    assert r2["job_ids"] == ["j0-1", "j0-2", "j0-3"] and r2["baseline_job_ids"] == ["j2-1", "j2-2", "j2-3"]
    assert r2["point_mean"] == pytest.approx(0.4) and r2["baseline_mean"] == pytest.approx(0.45)
    assert r2["significant"] is (r2["ci_high"] < 0)
    # rank 4: seed 1's ratio 0/0.1 has no log: left out and counted; seed 5 unpaired; one pair left.
    assert r4["n"] == 1 and r4["n_nonpositive"] == 1 and r4["n_unpaired"] == 1
    assert r4["mean"] == pytest.approx(math.log(0.20 / 0.25)) and r4["std"] is None and r4["ci_low"] is None
    assert r4["significant"] is None and r4["note"].startswith("n = 1")
    diff = compare_to_baseline(POINTS, "init", "spectral", jobs, "difference")
    assert diff[0]["mean"] == pytest.approx(((0.4 - 0.55) + (0.3 - 0.35) + (0.5 - 0.45)) / 3, rel=1e-12)
    assert diff[1]["n"] == 2 and diff[1]["ratio"] is None
    # The other key as baseline: nkp r=2 against nkp r=4, and so on.
    by_rank = compare_to_baseline(POINTS, "rank", 4, jobs, "difference")
    assert [r["point"] for r in by_rank] == [POINTS[0], POINTS[2]]
    assert by_rank[0]["baseline_point"] == POINTS[1] and by_rank[0]["seeds"] == [1] and by_rank[0]["n_unpaired"] == 3


def test_default_comparison():
    assert default_comparison("approx", "error") == "ratio" and default_comparison("learn", "nkp_error") == "ratio"
    assert default_comparison("train", "val_top1") == "difference"
    assert default_comparison("approx", "time_s") == "difference"
