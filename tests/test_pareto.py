"""jobs/pareto.py against definitions computed the slow way: the front by comparing every pair, the 2-D
hypervolume by summing the cells of the grid the points' coordinates make."""
from __future__ import annotations

import itertools
import random

import pytest

from jobs.pareto import dominates, hypervolume_2d, non_dominated


def brute_front(points: list[tuple[float, ...]]) -> list[int]:
    return [i for i, p in enumerate(points)
            if not any(all(b <= a for a, b in zip(p, q)) and any(b < a for a, b in zip(p, q)) for q in points)]


def brute_hv(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Sum of the grid cells (between consecutive distinct coordinates) dominated by some point."""
    xs = sorted({x for x, _ in points if x < ref[0]} | {ref[0]})
    ys = sorted({y for _, y in points if y < ref[1]} | {ref[1]})
    area = 0.0
    for (x0, x1), (y0, y1) in itertools.product(zip(xs, xs[1:]), zip(ys, ys[1:])):
        if any(px <= x0 and py <= y0 for px, py in points):
            area += (x1 - x0) * (y1 - y0)
    return area


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_non_dominated_is_the_brute_force_front(dims):
    rng = random.Random(dims)
    for _ in range(200):
        n = rng.randint(1, 30)
        # Few distinct values: ties and duplicate points are common.
        points = [tuple(float(rng.randint(0, 5)) for _ in range(dims)) for _ in range(n)]
        assert non_dominated(points) == brute_front(points), points


def test_equal_points_both_stay_and_dominance_is_strict():
    assert non_dominated([(1.0, 2.0), (1.0, 2.0), (2.0, 2.0)]) == [0, 1]
    assert dominates((1, 2), (1, 3)) and not dominates((1, 2), (1, 2)) and not dominates((1, 3), (2, 2))


def test_hypervolume_2d_against_the_grid_of_cells():
    rng = random.Random(0)
    for _ in range(200):
        points = [(rng.uniform(0, 10), rng.uniform(0, 10)) for _ in range(rng.randint(1, 12))]
        ref = (rng.uniform(5, 12), rng.uniform(5, 12))
        assert hypervolume_2d(points, ref) == pytest.approx(brute_hv(points, ref), rel=1e-12, abs=1e-12)
    assert hypervolume_2d([(1.0, 1.0)], (3.0, 2.0)) == 2.0
    assert hypervolume_2d([(3.0, 1.0), (1.0, 5.0)], (3.0, 2.0)) == 0.0  # on or past the reference: nothing
