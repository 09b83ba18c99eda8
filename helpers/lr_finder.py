"""Leslie Smith's LR range test with torch-lr-finder's contract: it trains your model with your optimizer at an
exponentially rising learning rate, records the smoothed loss, then restores the model, optimizer and GradScaler.
Own code rather than torch-lr-finder (which works on this kit's loaders too): each batch is one call of `train`,
so the sweep runs the training's loss (label smoothing included) at its precision."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .backprop import DivergedError, train
from .utils import save

SMOOTHING = 0.9  # the loss's running mean: one batch's loss is too noisy to read a slope from


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
        """The lr where the smoothed loss falls fastest (per log-lr step) before its lowest point: past it the loss
        climbs and often sinks again at absurd rates, which is not learning."""
        lowest = int(np.argmin(self.losses))
        if not self.descends:
            raise ValueError(
                f"the loss was lowest at step {lowest + 1} of {len(self.losses)} (lr {self.lrs[lowest]:.3g}): it never "
                "fell, so there is no steepest descent to read. Start lower (the first of lrs) or sweep more steps"
            )
        slopes = np.gradient(np.array(self.losses[: lowest + 1]), np.log(np.array(self.lrs[: lowest + 1])))
        skip = min(lowest, max(1, len(self.losses) // 10))  # the first steps are noise around the starting loss
        return float(self.lrs[skip + int(np.argmin(slopes[skip:]))])

    @property
    def minimum(self) -> float:
        """The lr of the lowest smoothed loss: beyond it training diverges, so useful peaks lie at or below it."""
        return float(self.lrs[int(np.argmin(self.losses))])

    def plot(self, *, chosen_lr: float | None = None, path: str | Path | None = None) -> plt.Figure:
        """Smoothed loss against learning rate (log scale), with the steepest descent, the lowest loss and `chosen_lr`;
        it stops where the loss climbs back to its start: past that, the network is diverging."""
        fig, ax = plt.subplots(figsize=(7, 4))
        lowest, n, start = int(np.argmin(self.losses)), len(self.losses), self.losses[0]
        end = next((i + 1 for i in range(lowest + 1, n) if self.losses[i] >= start), n)
        ax.plot(self.lrs[:end], self.losses[:end])
        if self.descends:  # else there is no steepest descent to mark
            ax.axvline(
                self.steepest, color="tab:orange", linestyle="--", label=f"steepest descent: {self.steepest:.3g}"
            )
        ax.axvline(self.minimum, color="tab:red", linestyle=":", label=f"lowest loss: {self.minimum:.3g}")
        if chosen_lr is not None:
            ax.axvline(chosen_lr, color="tab:green", label=f"peak used: {chosen_lr:g}")
        top = start + 0.5 * (start - min(self.losses))  # the blow-up would flatten the fall
        ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss")
        ax.set_title("LR range test, drawn until the loss climbs back to where it started")
        ax.set_ylim(min(self.losses) - 0.1 * (top - min(self.losses)), top)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        return save(fig, path)


def lr_range_test(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    lrs: Sequence[float] = tuple(np.geomspace(1e-4, 10, 100)),
) -> LRRangeTest:
    """Train `model` with `optimizer` one batch at each of `lrs` (exponentially rising); then restore all three.

    scaler, dtype and label_smoothing: the training's. Stops once the smoothed loss exceeds 4x its best.
    """
    restored = [obj for obj in (model, optimizer, scaler) if obj is not None]
    saved = copy.deepcopy([obj.state_dict() for obj in restored])
    try:
        sweep = _sweep(model, loader, optimizer, lrs, scaler, dtype, label_smoothing)
    finally:
        for obj, state in zip(restored, saved):
            obj.load_state_dict(state)
    if not sweep.losses:
        raise ValueError(
            f"the first loss, at lr {lrs[0]:.3g}, was not finite: check the inputs for NaN or inf, or start lower"
        )
    return sweep


def _sweep(model, loader, optimizer, lrs, scaler, dtype, label_smoothing) -> LRRangeTest:
    """The range test itself: one batch per lr, a bias-corrected running mean of the loss; stops at divergence."""
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
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed = average / (1 - SMOOTHING ** (step + 1))
        tried.append(float(lr))
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > 4 * best:
            break
    return LRRangeTest(tried, losses)
