"""Training: plain `train` / `test` epochs a student can copy, and `fit`, the main loop around them.

Recipe (helpers/recipe.py; chosen before looking at the test set, which is only ever reported):
SGD + Nesterov momentum, weight decay on conv/linear weights only, a one-cycle learning rate stepped
every batch, label smoothing, channels_last memory, the precision of `device.precision_policy`, and a
resumable checkpoint after every epoch. Any optimizer and scheduler can replace SGD and the one-cycle.

Batches: every function here takes any loader of (images, labels), in either form:
  - float N x C x H x W, already normalized: torchvision's convention (ToTensor + Normalize, or
    albumentations ending in Normalize + ToTensorV2), with a plain DataLoader(..., shuffle=True);
  - uint8 N x H x W x C from this kit's make_loaders, normalized on the device with the dataset's mean/std.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import resume_run, run_signature, save_run
from .dataset import normalize
from .device import Precision, autocast, grad_scaler, hardware, pick_device, precision_policy
from .recipe import RECIPE, Recipe

CPU = torch.device("cpu")
LOG_EVERY = 20  # batches between progress updates and finiteness checks: each one waits for the GPU
MIN_LOSS_SCALE = 1e-4  # an fp16 GradScaler this low has skipped (nearly) every step: training has stopped

OptimizerArg = torch.optim.Optimizer | Callable[[nn.Module], torch.optim.Optimizer] | None
SchedulerArg = Any  # a scheduler, a factory (optimizer, total_steps) -> scheduler, or None (constant lr)


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite, or fp16 loss scaling collapsed: nothing after it is worth saving."""


class ScheduleExhaustedError(ValueError):
    """A learning-rate schedule asked to go past its last step: it would train on at lr 0 without a word."""


def progress(iterable: Any, desc: str) -> Any:
    """A live progress bar for a person watching; none with TQDM_DISABLE=1 (headless runs, the committed notebook)."""
    return tqdm(iterable, desc=desc, leave=False, disable=os.environ.get("TQDM_DISABLE", "0") not in ("", "0"))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA); make_loaders then derives the augmentation seeds from it."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any | None = None) -> bool:
    """Backward and update; returns False when fp16's GradScaler skipped the step (inf/NaN gradients).

    The scaler multiplies the loss so small fp16 gradients survive, unscales before stepping, and skips
    (then lowers its scale) when a gradient overflowed. Asking whether it skipped costs one host sync.
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return True
    scaler.scale(loss).backward()
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale  # update() lowers the scale exactly when this step was skipped


def batch_statistics(loader: DataLoader) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) a loader's uint8 batches are normalized with: its dataset's, looking through Subsets."""
    dataset = loader.dataset
    while not hasattr(dataset, "mean") and hasattr(dataset, "dataset"):  # a Subset of an ImageDataset
        dataset = dataset.dataset
    return (dataset.mean, dataset.std) if hasattr(dataset, "mean") and hasattr(dataset, "std") else None


def to_input(images: torch.Tensor, device: torch.device, stats: tuple | None) -> torch.Tensor:
    """A batch as the network takes it: normalized float N x C x H x W on `device`.

    uint8 N x H x W x C batches (this kit's loaders) are normalized with `stats` (mean, std); float batches
    are taken as already normalized (torchvision's convention) and only moved.
    """
    images = images.to(device, non_blocking=True)
    if images.dtype != torch.uint8:
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(
                f"expected float N x C x H x W or uint8 N x H x W x C batches, got {images.dtype} {tuple(images.shape)}"
            )
        return images
    if stats is None:
        raise ValueError(
            "this loader yields uint8 images but its dataset has no .mean/.std to normalize them with: "
            "add Normalize(...) and ToTensor to its transforms (torchvision), or build it with make_loaders"
        )
    return normalize(images, *stats)


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    scaler: Any | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The one training step (epoch loop, LR range test, benchmark): (loss, logits, whether the step was taken).

    Forward and loss under the precision's autocast, then backward and update (optimizer_step).
    """
    with autocast(x.device, dtype):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    return loss, logits, optimizer_step(loss, optimizer, scaler)


def train(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    *,
    device: torch.device = CPU,
    dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    scaler: Any | None = None,
    desc: str = "train",
) -> tuple[float, float]:
    """One epoch of training; returns (mean loss, accuracy %). A scheduler, if given, steps with the optimizer."""
    model.train()
    stats = batch_statistics(loader)  # this kit's datasets carry their mean/std; torchvision batches come normalized
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0  # no sync per batch
    bar = progress(loader, desc)
    for step, (images, labels) in enumerate(bar, 1):
        x, y = to_input(images, device, stats), labels.to(device, non_blocking=True)
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
    desc: str = "test",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, labels) on the CPU for a whole loader, in its order.

    tta=True (flip test-time augmentation) averages the softmax of each image and of its mirror image and
    returns the log of that average, which argmax and cross-entropy read like logits.
    """
    model.eval()
    stats = batch_statistics(loader)
    all_logits, all_labels = [], []
    for images, labels in progress(loader, desc):
        x = to_input(images, device, stats)
        with autocast(device, dtype):
            logits = model(x).float()
            if tta:
                mirrored = model(x.flip(3)).float()  # dim 3 is the width
                logits = torch.logaddexp(logits.log_softmax(1), mirrored.log_softmax(1)) - math.log(2)
        all_logits.append(logits.float())
        all_labels.append(labels)
    return torch.cat(all_logits).cpu(), torch.cat(all_labels)


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


def make_optimizer(
    model: nn.Module,
    lr: float = RECIPE.max_lr,
    momentum: float = RECIPE.momentum,
    weight_decay: float = RECIPE.weight_decay,
) -> torch.optim.SGD:
    """SGD with Nesterov momentum; decay only conv/linear weights (decaying BN scales just fights BN)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = RECIPE.warmup_fraction
) -> torch.optim.lr_scheduler.LambdaLR:
    """One cycle, stepped per batch: linear warm-up from lr/10 over `warmup_fraction` of the steps, linear to 0.

    Stepping it past `total_steps` is an error, not a silent lr of 0: build a new one for another run.
    """
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step > total_steps:
            raise ScheduleExhaustedError(
                f"the one-cycle schedule was built for {total_steps} steps and was stepped to {step}: "
                "its lr is 0 from here on. Build a new optimizer and scheduler for another fit, "
                "or build the schedule for all the epochs you train"
            )
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return (total_steps - step) / max(1, total_steps - warmup)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scheduler.total_steps = total_steps  # as OneCycleLR has it: fit checks that the schedule covers its epochs
    return scheduler


@dataclass
class FitResult:
    """What fit hands back: one dict per epoch, the final model's test logits and labels, and what ran it."""

    history: list[dict[str, float]]
    logits: torch.Tensor
    labels: torch.Tensor
    tta_logits: torch.Tensor | None  # with flip test-time augmentation; None when fit(tta=False)
    train_images: int
    hardware: str
    precision: str
    evaluated_on: str = "test"  # the split the logits and every epoch's test_* numbers are on ("validation": held out)

    @property
    def predictions(self) -> torch.Tensor:
        """The final model's predicted class for every test image, in the test loader's order."""
        return self.logits.argmax(1)

    @property
    def tta_accuracy(self) -> float | None:
        """Final test accuracy % with flip TTA (None without it): beside, never instead of, the plain one."""
        return None if self.tta_logits is None else score(self.tta_logits, self.labels)[1]


def check_finite(model: nn.Module, where: str) -> None:
    """Refuse to save or report a model whose weights or BatchNorm statistics hold NaN or inf."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise DivergedError(
            f"{where}: {len(bad)} tensors hold NaN/inf (first: {bad[0]}); nothing was saved. Try a lower learning rate."
        )


def check_loss_scale(scaler: Any | None, where: str) -> str:
    """fp16 only: the GradScaler's scale for the epoch line; an error once it collapsed (every step skipped)."""
    if scaler is None:
        return ""
    scale = scaler.get_scale()
    if scale < MIN_LOSS_SCALE:
        raise DivergedError(
            f"{where}: the fp16 loss scale collapsed to {scale:.3g}, so (nearly) every step was skipped for "
            "overflowing gradients; nothing was saved. Try a lower learning rate, or fp32 (Precision(None, ...))."
        )
    return f"  loss scale {scale:.3g}"


def _build(
    model: nn.Module, optimizer: OptimizerArg, scheduler: SchedulerArg, total_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and scheduler fit runs: instances as given, factories called, None for the recipe's SGD."""
    if optimizer is None or not hasattr(optimizer, "step"):
        optimizer = make_optimizer(model) if optimizer is None else optimizer(model)
    if callable(scheduler) and not hasattr(scheduler, "step"):
        scheduler = scheduler(optimizer, total_steps)
    return optimizer, scheduler


def check_schedule(scheduler: Any, steps: int) -> None:
    """Refuse, before training, a schedule with fewer steps left than the epochs ahead (it would end at lr 0)."""
    total = getattr(scheduler, "total_steps", None)  # OneCycleLR and make_scheduler know their length
    if total is None:
        return
    left = total - scheduler.last_epoch
    if steps > left:
        raise ScheduleExhaustedError(
            f"the schedule has {left} of its {total} steps left but this fit takes {steps}: build a new "
            "optimizer and scheduler for this fit, sized for all its epochs (total_steps=epochs * len(train_loader))"
        )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler the epoch where it has set_epoch (this kit's, DistributedSampler); else nothing."""
    for sampler in (loader.batch_sampler, loader.sampler):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def epoch_line(h: dict[str, float], epochs: int, note: str = "", split: str = "test") -> str:
    """One epoch of the log, as fit prints it (note: e.g. the fp16 loss scale, or '(restored)')."""
    return (
        f"epoch {int(h['epoch']):>3}/{epochs}  lr {h['lr']:.3g}  train {h['train_loss']:.3f} / {h['train_acc']:.2f}%  "
        f"{split} {h['test_loss']:.3f} / {h['test_acc']:.2f}%  {h['train_seconds']:.1f}s{note}"
    )


def _resume(checkpoint: Path, run: dict, machine: dict, epochs: int, split: str, *states: Any) -> list[dict]:
    """Restore the run, say so (and what machine changed), and print the restored epochs' lines."""
    history, saved_on = resume_run(checkpoint, run, *states)
    tqdm.write(f"resuming from epoch {len(history)} of {epochs} ({checkpoint})")
    if saved_on and saved_on != machine:
        tqdm.write(
            f"note: the checkpoint was made on {saved_on['hardware']} ({saved_on['precision']}); "
            f"this run goes on on {machine['hardware']} ({machine['precision']})"
        )
    for h in history:
        tqdm.write(epoch_line(h, epochs, "  (restored)", split))
    return history


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    epochs: int = RECIPE.epochs,
    *,
    optimizer: OptimizerArg = None,
    scheduler: SchedulerArg = make_scheduler,
    label_smoothing: float = RECIPE.label_smoothing,
    device: torch.device | None = None,
    precision: Precision | None = None,
    channels_last: bool = True,
    checkpoint: str | Path | None = None,
    signature: dict[str, Any] | None = None,
    tta: bool = True,
) -> FitResult:
    """Train for `epochs`, testing after each; returns the history and the final epoch's test predictions.

    Loaders: any that yield (images, labels), float NCHW normalized or this kit's uint8 NHWC (module docstring).
    optimizer: an optimizer, a factory model -> optimizer, or None for make_optimizer (the recipe's SGD).
    scheduler: a scheduler (stepped every batch; one that knows its total_steps must cover these epochs),
    a factory (optimizer, total_steps) -> scheduler, or None for a constant lr.
    checkpoint: a file saved after every epoch; a run that finds it resumes, but only the same run
    (network, data, augmentations, seed, optimizer, schedule, plus `signature`, e.g. recipe.record()),
    and prints the restored epochs first, so the log shows every epoch once.
    tta: also score the final model with flip test-time augmentation (FitResult.tta_accuracy).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    device = device or pick_device()
    precision = precision or precision_policy(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # four batch shapes (train/test, full/last): tuned once, then fastest
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer, scheduler = _build(model, optimizer, scheduler, epochs * len(train_loader))
    scaler = grad_scaler(device, precision)
    settings = {**(signature or {}), "epochs": epochs, "label_smoothing": label_smoothing}
    run = run_signature(model, train_loader, optimizer, scheduler, **settings, steps_per_epoch=len(train_loader))
    machine = {"hardware": hardware(device), "precision": str(precision)}
    split = getattr(test_loader.dataset, "split", "test")  # "validation" for make_loaders(data=hold_out(...))
    history = []
    if checkpoint is not None and Path(checkpoint).exists():
        history = _resume(Path(checkpoint), run, machine, epochs, split, model, optimizer, scheduler, scaler)
    check_schedule(scheduler, (epochs - len(history)) * len(train_loader))
    logits = labels = None
    step_settings = {"device": device, "dtype": precision.dtype, "label_smoothing": label_smoothing, "scaler": scaler}
    for epoch in range(len(history) + 1, epochs + 1):
        set_epoch(train_loader, epoch)  # this kit's loaders: batch order and augmentations a function of (seed, epoch)
        start, lr, desc = time.perf_counter(), optimizer.param_groups[0]["lr"], f"epoch {epoch}/{epochs}"
        train_loss, train_acc = train(model, train_loader, optimizer, scheduler, **step_settings, desc=desc)
        train_seconds = time.perf_counter() - start
        check_finite(model, desc)
        scale = check_loss_scale(scaler, desc)
        logits, labels = predict(model, test_loader, device=device, dtype=precision.dtype)
        test_loss, test_acc = score(logits, labels)
        record = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss}
        history.append(
            record | {"test_acc": test_acc, "train_seconds": train_seconds, "seconds": time.perf_counter() - start}
        )
        tqdm.write(epoch_line(history[-1], epochs, scale, split))
        if checkpoint is not None:
            save_run(checkpoint, run, history, machine, model, optimizer, scheduler, scaler)
    if logits is None:  # resumed a finished run: evaluate the restored weights once
        logits, labels = predict(model, test_loader, device=device, dtype=precision.dtype)
    tta_logits = predict(model, test_loader, device=device, dtype=precision.dtype, tta=True)[0] if tta else None
    images = len(train_loader.dataset)
    return FitResult(history, logits, labels, tta_logits, images, machine["hardware"], str(precision), split)


def fit_recipe(
    model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, recipe: Recipe = RECIPE, **settings: Any
) -> FitResult:
    """fit with every number from `recipe` (its SGD, one-cycle, label smoothing, epochs); checkpoints signed by it.

    settings: fit's other keywords (device, precision, checkpoint, tta, ...); a `signature` adds to the recipe's.
    """
    optimizer = make_optimizer(model, lr=recipe.max_lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * len(train_loader)
    scheduler = make_scheduler(optimizer, steps, warmup_fraction=recipe.warmup_fraction)
    signature = {**recipe.record(), **settings.pop("signature", {})}
    return fit(
        model,
        train_loader,
        test_loader,
        recipe.epochs,
        optimizer=optimizer,
        scheduler=scheduler,
        label_smoothing=recipe.label_smoothing,
        signature=signature,
        **settings,
    )
