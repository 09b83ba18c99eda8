"""Training: plain train/test epochs a student can copy, and `fit`, which adds the modern recipe.

Recipe (all chosen before looking at the test set, which only ever gets reported):
  SGD + Nesterov momentum 0.9, weight decay 5e-4 on conv/linear weights (not on BN or biases),
  one-cycle learning rate (linear up, linear down) stepped every batch, label smoothing 0.1, bf16 autocast where the
  hardware has bf16 units, channels_last memory, resumable checkpoints after every epoch.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .dataset import model_input

MAX_LR, WEIGHT_DECAY, MOMENTUM, LABEL_SMOOTHING, WARMUP_FRACTION = 0.2, 5e-4, 0.9, 0.1, 0.25
PROGRESS_EVERY = 20  # batches between progress-bar updates: each one waits for the GPU


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable or belongs to another run configuration."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA); make_loaders then derives the augmentation seeds from it."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 where the chip computes it natively (CUDA, CPUs with AMX/AVX512-BF16), else None (fp32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def train(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    dtype: torch.dtype | None = None,
    label_smoothing: float = LABEL_SMOOTHING,
    desc: str = "train",
) -> tuple[float, float]:
    """One epoch of training; returns (mean loss, accuracy %)."""
    model.train()
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per batch
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(loader, desc=desc, leave=False)
    for step, (images, labels) in enumerate(bar, 1):
        x = model_input(images.to(device, non_blocking=True))
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()  # the one-cycle schedule moves every batch
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if step % PROGRESS_EVERY == 0 or step == len(loader):
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.2f}")
    return loss_sum.item() / seen, 100 * correct.item() / seen


@torch.no_grad()
def test(model: nn.Module, loader: DataLoader, device: torch.device, dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Loss (plain cross-entropy) and accuracy % on a held-out loader; never used to steer training."""
    logits, labels = predict(model, loader, device, dtype)
    return F.cross_entropy(logits, labels).item(), 100 * (logits.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, dtype: torch.dtype | None = None, desc: str = "test"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, labels) on the CPU for a whole loader, in its order: for metrics and galleries."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, leave=False):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(model_input(images.to(device, non_blocking=True)))
        all_logits.append(logits.float())
        all_labels.append(labels)
    return torch.cat(all_logits).cpu(), torch.cat(all_labels)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = WEIGHT_DECAY) -> torch.optim.SGD:
    """SGD with Nesterov momentum; decay only conv/linear weights (decaying BN scales just fights BN)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, nesterov=True)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """One cycle, stepped per batch: linear warm-up from lr/10 over the first quarter, linear decay to 0."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, in tensors and ints (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, **state: Any) -> None:
    """Write then rename: a crash mid-save leaves the previous checkpoint whole, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint, with an error that says what to do when it is broken."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable checkpoint of this kit ({type(err).__name__}: {err}); "
            "delete it to start the run from scratch."
        ) from err


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    epochs: int,
    max_lr: float = MAX_LR,
    weight_decay: float = WEIGHT_DECAY,
    label_smoothing: float = LABEL_SMOOTHING,
    device: torch.device | None = None,
    amp: bool = True,
    channels_last: bool = True,
    checkpoint: str | Path | None = None,
) -> list[dict[str, float]]:
    """Train for `epochs` and return one dict per epoch (lr, train/test loss and acc, seconds).

    With `checkpoint`, the state is saved there after every epoch and a run finds it and resumes.
    """
    device = device or pick_device()
    dtype = amp_dtype(device) if amp else None
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = make_optimizer(model, max_lr, weight_decay)
    scheduler = make_scheduler(optimizer, epochs * len(train_loader))
    run = {"epochs": epochs, "steps_per_epoch": len(train_loader), "max_lr": max_lr, "weight_decay": weight_decay,
           "label_smoothing": label_smoothing, "batch_size": train_loader.batch_sampler.batch_size}  # fmt: skip
    history: list[dict[str, float]] = []
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint)
        if state.get("run") != run:
            raise CheckpointError(f"{checkpoint} belongs to another run {state.get('run')}, not {run}; delete it or match it.")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(f"{checkpoint} holds weights of another network: {err}") from err
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        _set_rng_state(state["rng"])
    sampler = train_loader.batch_sampler
    for epoch in range(len(history) + 1, epochs + 1):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # batch order and augmentations are a function of (seed, epoch)
        start = time.perf_counter()
        train_loss, train_acc = train(model, train_loader, optimizer, scheduler, device, dtype, label_smoothing,
                                      desc=f"epoch {epoch}/{epochs}")  # fmt: skip
        train_seconds = time.perf_counter() - start
        test_loss, test_acc = test(model, test_loader, device, dtype)
        history.append({
            "epoch": epoch, "lr": scheduler.get_last_lr()[0], "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": test_loss, "test_acc": test_acc, "train_seconds": train_seconds,
            "seconds": time.perf_counter() - start,
        })  # fmt: skip
        tqdm.write(
            f"epoch {epoch:>3}/{epochs}  lr {history[-1]['lr']:.4f}  train {train_loss:.3f} / {train_acc:.2f}%  "
            f"test {test_loss:.3f} / {test_acc:.2f}%  {train_seconds:.1f}s"
        )
        if checkpoint is not None:
            save_checkpoint(checkpoint, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), epoch=epoch, history=history, run=run, rng=_rng_state())  # fmt: skip
    return history
