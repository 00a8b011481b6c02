"""Pareto fronts and hypervolume, every objective minimized (negate a maximized one first).

    non_dominated([(0.1, 40), (0.2, 20), (0.3, 30)])   # -> [0, 1]: (0.3, 30) is dominated by (0.2, 20)
    hypervolume_2d([(0.1, 40), (0.2, 20)], ref=(1.0, 100))

a dominates b when a is no worse in every objective and better in at least one; equal points do not
dominate each other, so both stay on the front.
"""
from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates, in input order. O(n log n + n * front): sorted
    lexicographically, a point can only be dominated by one before it, and a dominated point never
    dominates one the front does not already dominate, so each is compared with the front so far."""
    order = sorted(range(len(points)), key=lambda i: tuple(points[i]))
    front: list[int] = []
    for i in order:
        if not any(dominates(points[j], points[i]) for j in front):
            front.append(i)
    return sorted(front)


def hypervolume_2d(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Area dominated by `points` (two objectives) and bounded by the reference point `ref`; points not
    strictly better than `ref` in both objectives add nothing."""
    inside = sorted((float(x), float(y)) for x, y in points if x < ref[0] and y < ref[1])
    front: list[tuple[float, float]] = []  # by increasing x, decreasing y
    for x, y in inside:
        if not front or y < front[-1][1]:
            front.append((x, y))
    area = 0.0
    for k, (x, y) in enumerate(front):
        right = front[k + 1][0] if k + 1 < len(front) else float(ref[0])
        area += (right - x) * (float(ref[1]) - y)
    return area


__all__ = ["dominates", "hypervolume_2d", "non_dominated"]
