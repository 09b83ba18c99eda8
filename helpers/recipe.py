"""The S9 recipe in one place: every number that decides a run, each with its reason, and the objects built from it.

The library defaults to PyTorch's plain behaviour; train.py and the notebook pass these choices explicitly. Change a
field with `dataclasses.replace(RECIPE, epochs=24)`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import albumentations as A
import cv2
import torch
import torch.nn as nn

from .dataset import ImageData, mean_pixel
from .model import WIDTHS


@dataclass(frozen=True)
class Recipe:
    """Everything that decides an S9 training run (the machine's choices live in device.precision_policy)."""

    # the schedule
    epochs: int = 60  # chosen on the validation split: 90.38% there, against 89.86% at 40 (Results/runs.md)
    batch_size: int = 512  # ~100 steps per epoch: enough updates, and a batch that keeps a GPU busy
    max_lr: float = 0.2  # one-cycle peak for batch 512; the notebook's LR range test shows where it sits
    warmup_fraction: float = 0.25  # linear warm-up from max_lr/10 over this share of the steps, then linear to ~0
    momentum: float = 0.9  # Nesterov SGD, the standard for residual CIFAR nets
    weight_decay: float = 5e-4  # on conv and linear weights only: decaying BatchNorm scales just fights BN
    label_smoothing: float = 0.1  # keeps the logits modest, so a one-cycle run calibrates and generalises better
    seed: int = 0  # torch's, for the first weights; the loaders draw batch order and augmentations from it
    # the network
    widths: tuple[int, int, int, int] = WIDTHS  # C1..C4 channels, the network's own (model.py): under 200k
    # the augmentations (uint8 pixel space, before normalization)
    flip_p: float = 0.5  # every CIFAR-10 class is left-right symmetric
    shift_limit: float = 0.0625  # +-2 px: CIFAR objects are centred and fill the frame
    scale_limit: float = 0.1  # +-10%
    rotate_limit: float = 15.0  # degrees; the 45 default tilts horizons and costs accuracy at 32x32
    shift_scale_rotate_p: float = 0.5
    hole_size: int = 16  # CoarseDropout: one hole, this many pixels square (the assignment's 16x16)
    coarse_dropout_p: float = 0.5  # not 1: a 200k-parameter net on a short schedule underfits before it overfits

    def record(self) -> dict[str, Any]:
        """The recipe as plain JSON values, for metrics.json and the checkpoint's config."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def run_config(self, data: ImageData, *, quick: bool = False) -> dict[str, Any]:
        """What identifies a run: the recipe and the data it trains and is scored on. A checkpoint must match it."""
        sizes = {"train_images": len(data.train_images), "test_images": len(data.test_images)}
        return self.record() | sizes | {"evaluated_on": data.evaluation, "quick": quick}

    def augmentations(self, mean: Sequence[float]) -> list[A.BasicTransform]:
        """The assignment's three train transforms; they run on uint8 pixels, so the 0..1 `mean` fills in 0..255."""
        fill = mean_pixel(mean)
        with warnings.catch_warnings():
            # 2.x advises Affine, which ShiftScaleRotate wraps; the assignment names ShiftScaleRotate.
            warnings.filterwarnings("ignore", message="ShiftScaleRotate is a special case", category=UserWarning)
            shift_scale_rotate = A.ShiftScaleRotate(
                shift_limit=self.shift_limit,
                scale_limit=self.scale_limit,
                rotate_limit=self.rotate_limit,
                border_mode=cv2.BORDER_CONSTANT,
                fill=fill,  # opened borders become the mean (0 after normalization), not black
                p=self.shift_scale_rotate_p,
            )
        return [
            A.HorizontalFlip(p=self.flip_p),
            shift_scale_rotate,
            # Cutout: one hole of mean colour. 2.x names: 1.x's max_holes/fill_value are ignored with a warning.
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(self.hole_size, self.hole_size),
                hole_width_range=(self.hole_size, self.hole_size),
                fill=fill,
                p=self.coarse_dropout_p,
            ),
        ]

    def train_loss_floor(self, classes: int = 10) -> float:
        """The lowest training loss label smoothing allows: the entropy of its soft target (0.50 for 0.1 over 10
        classes). The plain test loss has no such floor, so it can lie below the training loss all run long."""
        true, other = 1 - self.label_smoothing + self.label_smoothing / classes, self.label_smoothing / classes
        return -(true * math.log(true) + (classes - 1) * other * math.log(other)) if other else 0.0

    def optimizer(self, model: nn.Module) -> torch.optim.SGD:
        """Nesterov SGD over the trainable weights (Net's frozen whitening stays as fitted); BatchNorm's undecayed."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if p.ndim > 1], "weight_decay": self.weight_decay},
            {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
        ]
        return torch.optim.SGD(groups, lr=self.max_lr, momentum=self.momentum, nesterov=True)

    def schedule(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.OneCycleLR:
        """The one-cycle over every step of `epochs`, stepped after each batch: linear up, then linear to ~0."""
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=self.max_lr,
            total_steps=self.epochs * steps_per_epoch,
            pct_start=self.warmup_fraction,
            anneal_strategy="linear",
            div_factor=10,  # start at max_lr / 10
            final_div_factor=1e4,  # end at max_lr / 1e5: zero for all purposes
            cycle_momentum=False,  # Nesterov momentum stays 0.9
        )


RECIPE = Recipe()
# The speed configuration: the recipe on 10 epochs, chosen on the validation split (85.46% there). The best of six
# 8-epoch recipes reached 85.44% on validation and 84.94% / 84.96% on the test set, short of 85%: docs/speed.md.
SPEED_RECIPE = replace(RECIPE, epochs=10)

TARGET_ACCURACY = 85.0  # the assignment's bar, on the plain (no TTA) final-epoch test accuracy
