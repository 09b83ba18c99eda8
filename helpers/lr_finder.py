"""Leslie Smith's LR range test, with torch-lr-finder's contract: your model, your optimizer, both restored.

Give it the model and the optimizer you will train with (`torch.optim.Adam(model.parameters())`, as with
torch-lr-finder). It trains that model with that optimizer while raising the learning rate exponentially
every batch, records the smoothed loss, and afterwards puts the model and the optimizer back to their state
before the test. Own code rather than torch-lr-finder (which works on this kit's loaders too): each batch is
one call of `train`, so the sweep runs the training's loss (label smoothing included) at its precision.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .backprop import DivergedError, train
from .device import grad_scaler


@dataclass
class LRRangeTest:
    """Learning rates tried (exponentially increasing, one per batch) and the smoothed loss at each."""

    lrs: list[float]
    losses: list[float]

    @property
    def descends(self) -> bool:
        """Whether the loss fell before its lowest point: without that, there is no steepest descent to read."""
        return int(np.argmin(self.losses)) >= 2

    @property
    def steepest(self) -> float:
        """The lr where the smoothed loss falls fastest (per log-lr step), before its lowest point.

        Past the lowest point the loss climbs and, for classification, often sinks again at absurd rates:
        that descent is not learning, so it is not searched.
        """
        lowest = int(np.argmin(self.losses))
        if not self.descends:
            raise ValueError(
                f"the loss was lowest at step {lowest + 1} of {len(self.losses)} (lr {self.lrs[lowest]:.3g}): it never "
                "fell, so there is no steepest descent to read. Start lower (start_lr) or sweep more steps"
            )
        slopes = np.gradient(np.array(self.losses[: lowest + 1]), np.log(np.array(self.lrs[: lowest + 1])))
        skip = min(lowest, max(1, len(self.losses) // 10))  # the first steps are noise around the starting loss
        return float(self.lrs[skip + int(np.argmin(slopes[skip:]))])

    @property
    def minimum(self) -> float:
        """The lr of the lowest smoothed loss: beyond it training diverges, so useful peaks lie at or below it."""
        return float(self.lrs[int(np.argmin(self.losses))])


def lr_range_test(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    start_lr: float = 1e-4,
    end_lr: float = 10.0,
    steps: int = 100,
) -> LRRangeTest:
    """Train `model` with `optimizer` at lrs rising from start_lr to end_lr, one batch each; then restore both.

    dtype and label_smoothing: the training's, so the sweep measures the loss training minimizes, as fast.
    Stops early once the smoothed loss exceeds 4x its best (divergence).
    """
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    try:
        sweep = _sweep(model, loader, optimizer, np.geomspace(start_lr, end_lr, steps), dtype, label_smoothing)
    finally:
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
    if not sweep.losses:
        raise ValueError(
            f"the first loss, at lr {start_lr:.3g}, was not finite: check the inputs for NaN or inf, or lower start_lr"
        )
    return sweep


def _sweep(model, loader, optimizer, lrs, dtype, label_smoothing, smoothing: float = 0.9) -> LRRangeTest:
    """The range test itself: one batch per lr (a loader shorter than `lrs` is cycled); stops at divergence."""
    device = next(model.parameters()).device
    scaler = grad_scaler(device, dtype)
    tried, losses, average, best, batches = [], [], 0.0, math.inf, iter(())
    for step, lr in enumerate(lrs):
        batch = next(batches, None)
        if batch is None:  # a loader shorter than the sweep is cycled
            batches = iter(loader)
            batch = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            loss, _ = train(model, [batch], optimizer, scaler=scaler, dtype=dtype, label_smoothing=label_smoothing)
        except DivergedError:  # the loss is no longer finite: the sweep is over
            break
        average = smoothing * average + (1 - smoothing) * loss
        smoothed = average / (1 - smoothing ** (step + 1))  # bias-corrected running mean
        tried.append(float(lr))
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > 4 * best:
            break
    return LRRangeTest(tried, losses)
