"""Guards on a training run: stop one that diverged, flag one that learned nothing. Pure Python (floats in).

Divergence (`DivergenceGuard`): training stops with `TrainingDiverged` when

* a step's training loss is NaN or infinite, or a validation loss is; or
* the mean training loss over the last WINDOW steps (a mean over their images, so a window of tiny
  batches still averages WINDOW batches) exceeds FACTOR x the starting loss; or
* a validation loss (after an epoch) exceeds VAL_FACTOR x the starting loss, once the run has
  taken BN_SETTLE_STEPS optimizer steps. Validation uses BatchNorm's running statistics, which lag
  the weights early on: a 4-step run measured val_loss 789 (340x its start) and recovered; the
  digits recipe's first epoch 7.7 (3x) while its train loss fell to 1.7. After 50 steps the running
  statistics (momentum 0.1) keep under 1% of their initial values (0.9^50 = 0.5%).

The starting loss is the first step's loss (the initial weights, before any update, so it cannot
have diverged yet), but never less than ln(num_classes), the loss of a uniform guess: one small
first batch that happens to be easy cannot make the bar low. Label smoothing raises the floor a
trained model reaches, never the loss of a guess, so the rule holds with it. A run that learns goes
down from the start; ten times the start is far outside what training does. The starting loss is
kept in checkpoints, so a resumed run keeps its yardstick.

Chance level (`chance_warning`): a run whose final val top-1 is not above
`1/C + 3 sqrt((1/C)(1 - 1/C) / n)` (C classes, n validation images) succeeded but learned nothing
measurable: a classifier that guesses would score below that bound with probability 99.9%.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any

FACTOR = 10.0
VAL_FACTOR = 100.0
BN_SETTLE_STEPS = 50
WINDOW = 5
CHANCE_SIGMAS = 3.0


class TrainingDiverged(FloatingPointError):
    """The loss became non-finite or far above its starting value; the message says where and what to change."""


class DivergenceGuard:
    """Feed it every optimizer step's summed loss and image count (`step`) and every epoch's val loss
    (`epoch_end`); either raises TrainingDiverged. `hint` is the advice appended to the message;
    `start` a starting loss kept from before (a resumed run)."""

    def __init__(self, hint: str, num_classes: int, start: float | None = None) -> None:
        self.hint = hint
        self.floor = math.log(num_classes)        # the loss of a uniform guess
        self.start = start                        # set by the first step
        self._recent: deque[tuple[float, int]] = deque(maxlen=WINDOW)

    def state(self) -> dict[str, Any]:
        return {"start": self.start}

    def _diverged(self, where: str, what: str, value: float) -> TrainingDiverged:
        started = f" (started at {self.start:.3g})" if self.start is not None else ""
        return TrainingDiverged(f"diverged at {where}: {what} {value:.3g}{started}; {self.hint}")

    def step(self, loss_sum: float, images: int, *, epoch: int, step: int) -> None:
        """`loss_sum`: the step's loss summed over its `images`; epoch and step count from 1."""
        where = f"epoch {epoch} step {step}"
        if not math.isfinite(loss_sum):
            raise self._diverged(where, "loss", loss_sum)
        if self.start is None:
            self.start = max(loss_sum / max(1, images), self.floor)
        self._recent.append((loss_sum, images))
        window = _mean(self._recent)
        if len(self._recent) == WINDOW and window > FACTOR * self.start:
            raise self._diverged(where, f"mean loss of the last {WINDOW} steps", window)

    def epoch_end(self, val_loss: float, *, epoch: int, steps: int) -> None:
        """`steps`: optimizer steps taken so far in the run."""
        where = f"the end of epoch {epoch}"
        settled = steps >= BN_SETTLE_STEPS
        if not math.isfinite(val_loss) or (settled and val_loss > VAL_FACTOR * (self.start or self.floor)):
            raise self._diverged(where, "val_loss", val_loss)


def _mean(pairs: Any) -> float:
    return sum(s for s, _ in pairs) / max(1, sum(n for _, n in pairs))


def chance_threshold(num_classes: int, n_val: int) -> float:
    """The val top-1 a guessing classifier stays below with probability ~99.9% (3 binomial standard errors)."""
    p = 1.0 / num_classes
    return p + CHANCE_SIGMAS * math.sqrt(p * (1 - p) / max(1, n_val))


def chance_warning(val_top1: float, num_classes: int, n_val: int) -> str | None:
    """A warning when `val_top1` (a fraction) is not materially above chance, else None."""
    bound = chance_threshold(num_classes, n_val)
    if val_top1 > bound:
        return None
    return (f"val_top1 {val_top1:.3f} is at chance level: {num_classes} classes give 1/{num_classes} = "
            f"{1 / num_classes:.3f}, and a model that guesses scores up to {bound:.3f} on {n_val} validation images; "
            "the run learned nothing measurable (more epochs, another lr, or check the data)")
