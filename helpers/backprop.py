"""Training: `train` and `test`, the epochs a student copies (as in pytorch/examples' mnist), and `fit` around them.

Every function takes any loader of (images, labels) in torchvision's form, normalized float N x C x H x W:
a plain `DataLoader` over a torchvision dataset, or this kit's `make_loaders`, whose batches arrive already on
the device. Defaults are PyTorch's plain ones (cross-entropy, no label smoothing, no TTA); S9's choices come
from helpers/recipe.py, passed in by the caller.
"""

from __future__ import annotations

import functools
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import resume, save_checkpoint
from .device import Precision, autocast, grad_scaler, hardware, pick_device, precision_policy

CPU = torch.device("cpu")
LOG_EVERY = 20  # batches between progress updates and finiteness checks: each one waits for the GPU
MIN_LOSS_SCALE = 1e-4  # an fp16 GradScaler this low has skipped (nearly) every step: training has stopped


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite, or fp16 loss scaling collapsed: nothing after it is worth saving."""


def progress(iterable: Any, desc: str) -> Any:
    """A live progress bar for a person watching; none with TQDM_DISABLE=1 (headless runs, the committed notebook)."""
    return tqdm(iterable, desc=desc, leave=False, disable=os.environ.get("TQDM_DISABLE", "0") not in ("", "0"))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with Nesterov momentum over the trainable parameters; decay only conv/linear weights, not BatchNorm's."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # frozen layers (Net's whitening) stay as fitted
    decay, no_decay = [p for p in trainable if p.ndim > 1], [p for p in trainable if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One step (the epoch loop's, the LR range test's, the benchmark's): (loss, logits, whether it was taken).

    Forward and loss under autocast at `dtype` (None: fp32). fp16's GradScaler multiplies the loss so small
    gradients survive, and skips the update (then lowers its scale) when a gradient overflowed.
    """
    with autocast(x.device, dtype):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return loss, logits, True
    scaler.scale(loss).backward()
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return loss, logits, scaler.get_scale() >= scale  # update() lowers the scale exactly when it skipped the step


def train(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    *,
    device: torch.device = CPU,
    dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    desc: str = "train",
) -> tuple[float, float]:
    """One epoch of training; returns (mean loss, accuracy %). A scheduler, if given, steps after every batch."""
    model.train()
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0  # no sync per batch
    bar = progress(loader, desc)
    for step, (x, y) in enumerate(bar, 1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, logits, stepped = train_step(
            model, x, y, optimizer, dtype=dtype, label_smoothing=label_smoothing, scaler=scaler
        )
        if stepped and scheduler is not None:
            scheduler.step()  # a step fp16 skipped does not advance the schedule
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if step % LOG_EVERY == 0 or step == len(loader):
            if not torch.isfinite(loss_sum):  # one NaN or inf loss poisons the sum: check it once per interval
                raise DivergedError(
                    f"{desc}: the loss became NaN or infinite by step {step} of {len(loader)} "
                    f"(lr {optimizer.param_groups[0]['lr']:.3g}); nothing from this epoch was saved. "
                    "Try a lower peak learning rate, or check the inputs for NaN."
                )
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.2f}")
    return loss_sum.item() / seen, 100 * correct.item() / seen


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device = CPU,
    dtype: torch.dtype | None = None,
    tta: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, labels) on the CPU for a whole loader, in its order.

    tta=True (flip test-time augmentation) averages the softmax of each image and of its mirror image and
    returns the log of that average, which argmax and cross-entropy read like logits.
    """
    model.eval()
    all_logits, all_labels = [], []
    for x, y in progress(loader, "predict"):
        x = x.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(x).float()
            if tta:
                mirrored = model(x.flip(3)).float()  # dim 3 is the width
                logits = torch.logaddexp(logits.log_softmax(1), mirrored.log_softmax(1)) - math.log(2)
        all_logits.append(logits.float().cpu())
        all_labels.append(y.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(plain cross-entropy, accuracy %) of predictions."""
    return F.cross_entropy(logits, labels).item(), 100 * (logits.argmax(1) == labels).float().mean().item()


def test(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device = CPU,
    dtype: torch.dtype | None = None,
    tta: bool = False,
) -> tuple[float, float]:
    """Loss and accuracy % on a held-out loader (tta: with flip test-time augmentation); never steers training."""
    return score(*predict(model, loader, device=device, dtype=dtype, tta=tta))


@dataclass
class FitResult:
    """What fit hands back: one dict per epoch, the final model's logits and labels on the evaluation split."""

    history: list[dict[str, float]]
    logits: torch.Tensor
    labels: torch.Tensor
    tta_logits: torch.Tensor | None  # with flip test-time augmentation; None when fit(tta=False)
    train_images: int
    hardware: str
    precision: str
    evaluated_on: str = "test"  # the split of the logits and of every epoch's test_* numbers ("validation": held out)

    @property
    def predictions(self) -> torch.Tensor:
        """The final model's predicted class for every evaluation image, in the loader's order."""
        return self.logits.argmax(1)

    @property
    def tta_accuracy(self) -> float | None:
        """Final accuracy % with flip TTA (None without it): beside, never instead of, the plain one."""
        return None if self.tta_logits is None else score(self.tta_logits, self.labels)[1]


def check_healthy(model: nn.Module, scaler: torch.amp.GradScaler | None, where: str) -> None:
    """Refuse to save or report a model with NaN/inf weights or statistics, or whose fp16 loss scale collapsed."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise DivergedError(
            f"{where}: {len(bad)} tensors hold NaN/inf (first: {bad[0]}); nothing was saved. Try a lower learning rate."
        )
    if scaler is not None and scaler.get_scale() < MIN_LOSS_SCALE:
        raise DivergedError(
            f"{where}: the fp16 loss scale collapsed to {scaler.get_scale():.3g}, so (nearly) every step was skipped "
            "for overflowing gradients; nothing was saved. Try a lower learning rate, or fp32 (Precision(None, ...))."
        )


def check_schedule(scheduler: Any | None, steps: int) -> None:
    """Refuse, before training, a schedule with fewer steps left than the epochs ahead (it would fail or end at 0)."""
    total = getattr(scheduler, "total_steps", None)  # OneCycleLR knows its length
    if total is not None and steps > total - scheduler.last_epoch:
        raise ValueError(
            f"the schedule has {total - scheduler.last_epoch} of its {total} steps left but this fit takes {steps}: "
            "build a new optimizer and scheduler for this fit, sized for all its epochs "
            "(total_steps=epochs * len(train_loader))"
        )


def epoch_line(h: dict[str, float], epochs: int, split: str = "test", note: str = "") -> str:
    """One epoch of the log, as fit prints it (note: e.g. '(restored)')."""
    return (
        f"epoch {int(h['epoch']):>3}/{epochs}  lr {h['lr']:.3g}  train {h['train_loss']:.3f} / {h['train_acc']:.2f}%  "
        f"{split} {h['test_loss']:.3f} / {h['test_acc']:.2f}%  {h['train_seconds']:.1f}s{note}"
    )


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    label_smoothing: float = 0.0,
    device: torch.device | None = None,
    precision: Precision | None = None,
    checkpoint: str | Path | None = None,
    config: dict[str, Any] | None = None,
    tta: bool = False,
) -> FitResult:
    """Train for `epochs`, evaluating after each; returns the history and the final epoch's predictions.

    scheduler: stepped after every batch (OneCycleLR, say); one that knows its total_steps must cover the epochs.
    checkpoint: saved after every epoch; a run that finds it resumes, printing the restored epochs first, but
    only the same run: `config` (e.g. recipe.record()) plus the epochs and data sizes must match.
    tta: also score the final model with flip test-time augmentation (FitResult.tta_accuracy).
    """
    device = device or pick_device()
    precision = precision or precision_policy(device)
    model.to(device, memory_format=torch.channels_last)  # the layout the convolutions prefer
    torch.backends.cudnn.benchmark = device.type == "cuda"  # few batch shapes: tuned once, then the fastest kernels
    scaler = grad_scaler(device, precision)
    split = getattr(test_loader.dataset, "split", "test")  # "validation" for make_loaders(hold_out(...))
    images = {"train_images": len(train_loader.dataset), f"{split}_images": len(test_loader.dataset)}
    config = {**(config or {}), "epochs": epochs, **images}
    machine = {"hardware": hardware(device), "precision": str(precision)}
    states = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    history = resume(checkpoint, config, machine, states) if checkpoint else []
    for h in history:
        tqdm.write(epoch_line(h, epochs, split, "  (restored)"))
    check_schedule(scheduler, (epochs - len(history)) * len(train_loader))
    steps = {"device": device, "dtype": precision.dtype, "label_smoothing": label_smoothing, "scaler": scaler}
    evaluate = functools.partial(predict, model, test_loader, device=device, dtype=precision.dtype)
    logits = labels = None
    for epoch in range(first := len(history) + 1, epochs + 1):
        if hasattr(train_loader.sampler, "set_epoch"):  # this kit's sampler: batches a function of (seed, epoch)
            train_loader.sampler.set_epoch(epoch)
        start, lr, desc = time.perf_counter(), optimizer.param_groups[0]["lr"], f"epoch {epoch}/{epochs}"
        train_loss, train_acc = train(model, train_loader, optimizer, scheduler, **steps, desc=desc)
        train_seconds = time.perf_counter() - start
        check_healthy(model, scaler, desc)
        logits, labels = evaluate()
        test_loss, test_acc = score(logits, labels)
        history.append(
            {"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss}
            | {"test_acc": test_acc, "train_seconds": train_seconds, "seconds": time.perf_counter() - start}
        )
        left = history[-1]["seconds"] * (epochs - epoch) / 60  # said once, after the first epoch this fit trains
        tqdm.write(
            epoch_line(history[-1], epochs, split, f"  (about {left:.0f} min to go)" * (epoch == first < epochs))
        )
        if checkpoint:
            save_checkpoint(checkpoint, config=config, machine=machine, history=history, **states)
    if logits is None:  # every epoch was restored: score the restored weights once
        logits, labels = evaluate()
    tta_logits = evaluate(tta=True)[0] if tta else None
    return FitResult(
        history, logits, labels, tta_logits, images["train_images"], machine["hardware"], str(precision), split
    )
