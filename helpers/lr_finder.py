"""Leslie Smith's LR range test, with torch-lr-finder's contract: your model, your optimizer, both restored.

Give it the model and the optimizer you will train with (`torch.optim.Adam(model.parameters())`, as with
torch-lr-finder). It trains that model with that optimizer while raising the learning rate exponentially
every batch, records the smoothed loss, and afterwards puts the model, the optimizer and the RNGs back to
their state before the test, bit for bit. Own code rather than torch-lr-finder (which works on this kit's
loaders too): it trains with fit's own step and loss (label smoothing included) at the machine's precision.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .backprop import train_step
from .checkpoint import rng_state, set_rng_state
from .device import Precision, grad_scaler, pick_device, precision_policy


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
    start_lr: float = 1e-4,
    end_lr: float = 10.0,
    steps: int = 100,
    device: torch.device | None = None,
    precision: Precision | None = None,
    label_smoothing: float = 0.0,
    smoothing: float = 0.9,
) -> LRRangeTest:
    """Train `model` with `optimizer` at lrs rising from start_lr to end_lr, one batch each; then restore both.

    label_smoothing: pass the training's, so the sweep measures the loss training minimizes.
    Stops early once the smoothed loss exceeds 4x its best (divergence). Model, optimizer and RNGs are
    restored afterwards, so the test leaves no trace on the run that follows.
    """
    device = device or pick_device()
    precision = precision or precision_policy(device)
    model.to(device, memory_format=torch.channels_last)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), rng_state()))
    was_training = model.training
    try:
        lrs = np.geomspace(start_lr, end_lr, steps).tolist()  # exponentially rising, one per batch
        sweep = _sweep(model, loader, optimizer, lrs, precision, label_smoothing=label_smoothing, smoothing=smoothing)
    finally:
        model_state, optimizer_state, rngs = saved
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        set_rng_state(rngs)
        model.train(was_training)
    if not sweep.losses:
        raise ValueError(
            f"the first loss, at lr {start_lr:.3g}, was not finite: check the inputs for NaN or inf, or lower start_lr"
        )
    return sweep


def _sweep(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    lrs: list[float],
    precision: Precision,
    *,
    label_smoothing: float,
    smoothing: float,
) -> LRRangeTest:
    """The range test itself: one batch per lr, cycling a loader shorter than `lrs`; stops at divergence."""
    device = next(model.parameters()).device
    scaler = grad_scaler(device, precision)
    tried, losses, average, best = [], [], 0.0, math.inf
    batches = iter(())
    model.train()
    for step, lr in enumerate(lrs):
        try:
            x, y = next(batches)
        except StopIteration:  # small loaders are cycled
            batches = iter(loader)
            x, y = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, _, _ = train_step(
            model, x, y, optimizer, dtype=precision.dtype, label_smoothing=label_smoothing, scaler=scaler
        )
        value = loss.item()
        if not math.isfinite(value):
            break
        average = smoothing * average + (1 - smoothing) * value
        smoothed = average / (1 - smoothing ** (step + 1))  # bias-corrected running mean
        tried.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > 4 * best:
            break
    return LRRangeTest(tried, losses)
