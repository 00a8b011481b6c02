"""The training guards' rules (core/guards.py) on hand-made loss sequences, numbers computed by hand."""
from __future__ import annotations

import math

import pytest

from core.guards import DivergenceGuard, TrainingDiverged, chance_threshold, chance_warning

LN10 = math.log(10)


def feed(guard: DivergenceGuard, losses: list[float], images: int = 2) -> None:
    """Per-image mean losses, one per step, as the trainer reports them (summed over the batch)."""
    for i, loss in enumerate(losses, start=1):
        guard.step(loss * images, images, epoch=1, step=i)


def test_a_non_finite_loss_stops_at_its_step():
    guard = DivergenceGuard("lower lr (now 0.1)", 10)
    with pytest.raises(TrainingDiverged, match=r"^diverged at epoch 1 step 3: loss nan \(started at 2.5\); "
                                               r"lower lr \(now 0.1\)$"):
        feed(guard, [2.5, 2.4, float("nan")])


def test_the_window_mean_above_ten_times_the_start_stops_training():
    guard = DivergenceGuard("lower lr (now 1)", 10)
    feed(guard, [2.5, 2.0, 1.5])
    # last 5 steps: 1.5, 30, 30, 30, 30 -> mean 24.3 < 25: still running; the next 30 makes it 30 > 25
    for step, loss in enumerate([30.0] * 4, start=4):
        guard.step(loss * 2, 2, epoch=1, step=step)
    with pytest.raises(TrainingDiverged, match=r"at epoch 1 step 8: mean loss of the last 5 steps 30 "
                                               r"\(started at 2.5\)"):
        guard.step(60.0, 2, epoch=1, step=8)


def test_one_bad_tiny_batch_is_not_divergence():
    """A single step at 20x the start (a hard batch of 2 images) lifts a 5-step window to ~5x: no alarm."""
    guard = DivergenceGuard("", 10)
    feed(guard, [2.3, 2.0, 1.8, 46.0, 1.7, 1.6, 1.5, 1.4, 1.3])


def test_the_start_is_never_below_a_uniform_guess():
    """A first batch that happens to be easy (loss 0.1) must not make the bar 1.0: the floor is ln 10."""
    guard = DivergenceGuard("", 10)
    feed(guard, [0.1] + [5.0] * 10)  # 5 > 10 x 0.1, but 5 < 10 x ln 10 = 23
    assert guard.start == pytest.approx(LN10)


def test_label_smoothing_floor_does_not_look_like_divergence():
    """With label smoothing 0.1 the loss bottoms out near 0.5 for 10 classes; it never rises toward 10x start."""
    guard = DivergenceGuard("", 10)
    feed(guard, [2.31, 1.9, 1.2, 0.8, 0.6] + [0.52, 0.55, 0.5] * 20)


def test_a_resumed_guard_keeps_its_start():
    """Resumed with start 5.0: a window of 30 is 6x that start, fine; a fresh guard seeing 0.1 first
    (floored to ln 10) would stop at the same 30 (> 23)."""
    resumed = DivergenceGuard("", 10, start=5.0)
    feed(resumed, [0.1] + [30.0] * 6)
    fresh = DivergenceGuard("", 10)
    with pytest.raises(TrainingDiverged):
        feed(fresh, [0.1] + [30.0] * 6)


def test_val_loss_bar_only_after_batchnorm_settles():
    guard = DivergenceGuard("x", 10)
    feed(guard, [2.5])
    guard.epoch_end(789.0, epoch=1, steps=8)  # early: BN running statistics still lag (no alarm)
    guard.epoch_end(240.0, epoch=5, steps=55)  # settled, below 100 x 2.5 = 250
    with pytest.raises(TrainingDiverged, match=r"at the end of epoch 6: val_loss 3.6e\+06 \(started at 2.5\)"):
        guard.epoch_end(3.6e6, epoch=6, steps=66)
    with pytest.raises(TrainingDiverged, match="val_loss inf"):
        guard.epoch_end(float("inf"), epoch=1, steps=1)  # non-finite: always


def test_chance_threshold_by_hand():
    # 1/10 + 3 sqrt(0.1 * 0.9 / 360) = 0.1 + 3 * 0.0158114 = 0.1474342
    assert chance_threshold(10, 360) == pytest.approx(0.1474342, abs=1e-7)
    # 1/100 + 3 sqrt(0.01 * 0.99 / 10000) = 0.01 + 3 * 0.000994987 = 0.0129850
    assert chance_threshold(100, 10000) == pytest.approx(0.0129850, abs=1e-7)
    assert "is at chance level: 10 classes give 1/10 = 0.100" in chance_warning(0.147, 10, 360)
    assert "guesses scores up to 0.147 on 360 validation images" in chance_warning(0.12, 10, 360)
    assert chance_warning(0.148, 10, 360) is None
    assert chance_warning(0.97, 10, 360) is None
