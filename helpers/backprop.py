"""`train` and `test`: one epoch of training and one evaluation, the shape the course has used since Session 5.

This file is the unit to copy into any project: it needs torch only. The device comes from the model; the loader
yields normalized float N x C x H x W batches (torchvision's or `make_loaders`'); precision is an autocast dtype
(None: fp32) and, for fp16 only, a GradScaler, chosen once by the caller. The epoch loop is written where it runs.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite, or fp16 loss scaling collapsed: nothing after it is worth saving."""


# The schedulers PyTorch steps after every batch; the others (StepLR, CosineAnnealingLR, ...) count epochs.
PER_BATCH_SCHEDULERS = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


def train(model, loader, optimizer, *, scheduler=None, scaler=None, dtype=None, label_smoothing=0.0):
    """One epoch of training; returns (mean loss, accuracy %). A scheduler steps after every batch it updated."""
    if scheduler is not None and not isinstance(scheduler, PER_BATCH_SCHEDULERS):
        raise TypeError(
            f"train steps its scheduler after every batch, as OneCycleLR and CyclicLR expect; "
            f"{type(scheduler).__name__} counts epochs. Leave it out of train(...) and step it yourself after each "
            "epoch: scheduler.step(), or scheduler.step(test_loss) for ReduceLROnPlateau."
        )
    device = next(model.parameters()).device
    scale = None if scaler is None else scaler.get_scale()  # fp16: the loss scale, read once per step below
    model.train()
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0  # no sync per batch
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
            stepped = True
        else:  # fp16: scale the loss so small gradients survive; an overflow skips the step and lowers the scale
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            previous, scale = scale, scaler.get_scale()  # one host sync per step
            stepped = scale >= previous  # the scale drops exactly when the step was skipped
        if scheduler is not None and stepped:
            scheduler.step()  # a step fp16 skipped does not advance the schedule
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    if not torch.isfinite(loss_sum) or (scale is not None and scale < 1e-4):
        raise DivergedError(
            f"the training loss became NaN or infinite, or fp16 skipped (nearly) every step, at lr "
            f"{optimizer.param_groups[0]['lr']:.3g}; nothing from this epoch was saved. Try a lower learning rate."
        )
    return loss_sum.item() / seen, 100 * correct.item() / seen


@torch.no_grad()
def test(model, loader, *, dtype=None, tta=False, predictions=False):
    """Mean loss and accuracy % on a held-out loader, plus each image's predicted class when `predictions`.

    tta=True (flip test-time augmentation) averages the softmax of each image and of its mirror image.
    """
    device = next(model.parameters()).device
    model.eval()
    log_probs, labels = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype):
            out = model(x).float().log_softmax(1)
            if tta:  # dim 3 is the width; log of the mean of the two softmaxes
                out = torch.logaddexp(out, model(x.flip(3)).float().log_softmax(1)) - math.log(2)
        log_probs.append(out.cpu())
        labels.append(y.cpu())
    log_probs, labels = torch.cat(log_probs), torch.cat(labels)
    loss, predicted = F.nll_loss(log_probs, labels).item(), log_probs.argmax(1)
    accuracy = 100 * (predicted == labels).float().mean().item()
    return (loss, accuracy, predicted) if predictions else (loss, accuracy)


def epoch_line(h: dict[str, float], epochs: int, split: str = "test") -> str:
    """One epoch of the log, as the training loops print it, with the minutes left at this epoch's pace."""
    left = f"  ~{h['seconds'] * (epochs - h['epoch']) / 60:.0f} min left" if h["epoch"] < epochs else ""
    return (
        f"epoch {int(h['epoch']):>3}/{epochs}  lr {h['lr']:.3g}  train {h['train_loss']:.3f} / {h['train_acc']:.2f}%  "
        f"{split} {h['test_loss']:.3f} / {h['test_acc']:.2f}%  {h['train_seconds']:.1f}s{left}"
    )
