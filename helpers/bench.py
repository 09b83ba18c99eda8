"""Benchmark: `python -m helpers.bench` measures the input pipeline and the training step here.

Side by side in one run: the naive loader (one albumentations call, one float tensor and one
collate per image, as the seed solution did) against make_loaders (whole uint8 batches per
worker, normalized on the device); train-step throughput in fp32/bf16 x contiguous/channels_last;
one real epoch with each loader; optionally (--fit-epochs) a full fit with each, to time 85%.
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import utils
from .backprop import (
    autocast,
    fit,
    grad_scaler,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    pick_device,
    precision_policy,
    seed_everything,
    train,
)
from .dataset import ImageData, cifar10, default_workers, make_loaders, subset, train_transforms
from .model import Net
from .recipe import RECIPE
from .train import time_to_target

DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class NaiveCIFAR10(Dataset):
    """The per-image loader this kit replaced: Normalize + ToTensorV2 per image, default collate."""

    def __init__(self, images: np.ndarray, labels: list[int], seed: int = 0):
        self.images, self.labels, self.transform = images, labels, train_transforms(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.images[i])["image"], self.labels[i]


def naive_loader(data: ImageData, batch_size: int, workers: int, device: torch.device, size: int | None) -> DataLoader:
    """DataLoader over NaiveCIFAR10 with the usual shuffle/workers/pin_memory settings."""
    images, labels = subset(data.train_images, data.train_labels, size)
    return DataLoader(
        NaiveCIFAR10(images, labels),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def loader_rate(loader: DataLoader, batches: int) -> float:
    """Images/s a loader delivers (after one warm-up batch that pays for starting the workers)."""
    it = iter(loader)
    next(it)
    seen, start = 0, time.perf_counter()
    for _, (images, _) in zip(range(batches), it):
        seen += len(images)
    return seen / (time.perf_counter() - start)


def step_rate(
    device: torch.device, batch_size: int, dtype: torch.dtype | None, channels_last: bool, steps: int
) -> float:
    """Train-step images/s on a synthetic batch already on the device: the model's own speed limit."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = Net().to(device, memory_format=fmt)
    optimizer = make_optimizer(model, 0.01)
    x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x), y)
        optimizer_step(loss, optimizer)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def epoch_seconds(loader: DataLoader, device: torch.device) -> float:
    """Wall seconds of one real training epoch (train()) over a loader."""
    model = Net().to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer, len(loader))
    precision = precision_policy(device)
    start = time.perf_counter()
    train(
        model,
        loader,
        optimizer,
        scheduler,
        device,
        precision.dtype,
        RECIPE.label_smoothing,
        grad_scaler(device, precision),
        desc="bench epoch",
    )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: prints a markdown report (and writes it with --out)."""
    p = argparse.ArgumentParser(prog="python -m helpers.bench", description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 1)")
    p.add_argument(
        "--loader-batches", type=int, default=None, help="batches timed per loader (default: 90 GPU, 10 CPU)"
    )
    p.add_argument("--steps", type=int, default=None, help="train steps timed per setting (default: 50 GPU, 3 CPU)")
    p.add_argument(
        "--epoch-images", type=int, default=None, help="images in the timed epoch (default: 50000 GPU, 5120 CPU)"
    )
    p.add_argument("--fit-epochs", type=int, default=0, help="also fit this many epochs with each loader and time 85%%")
    p.add_argument(
        "--compare-workers",
        type=int,
        nargs="*",
        default=[],
        help="also time one epoch with each of these worker counts",
    )
    p.add_argument("--out", default=None, help="also write the report to this markdown file")
    a = p.parse_args(argv)
    device = pick_device()
    gpu = device.type == "cuda"
    workers = default_workers() if a.workers is None else a.workers
    batches = a.loader_batches or (90 if gpu else 10)
    steps = a.steps or (50 if gpu else 3)
    size = a.epoch_images or (None if gpu else 5120)
    seed_everything(0)
    lines = [
        f"# Benchmark: {utils.hardware(device)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        "",
        f"batch {a.batch_size}, {workers} loader workers",
        "",
        "| measurement | naive per-image loader | make_loaders |",
        "| --- | ---: | ---: |",
    ]

    def row(name: str, naive: str, fast: str) -> None:
        lines.append(f"| {name} | {naive} | {fast} |")
        print(lines[-1], flush=True)

    print("\n".join(lines), flush=True)
    data = cifar10()  # loaded once for every loader below
    naive = naive_loader(data, a.batch_size, workers, device, size)
    fast, test = make_loaders(a.batch_size, 0, device, workers, size, None if a.fit_epochs else 1000, data=data)
    row(
        f"loader images/s ({batches} batches)",
        f"{loader_rate(naive, batches):,.0f}",
        f"{loader_rate(fast, batches):,.0f}",
    )
    row(
        f"one training epoch, s ({len(naive.dataset)} images)",
        f"{epoch_seconds(naive, device):.2f}",
        f"{epoch_seconds(fast, device):.2f}",
    )
    if a.fit_epochs:
        outcomes = []
        for loader in (naive, fast):
            seed_everything(0)
            history = fit(Net(), loader, test, a.fit_epochs, device=device).history
            epoch, seconds = time_to_target(history)
            outcomes.append(
                f"{history[-1]['test_acc']:.2f}%, 85% "
                + (f"at epoch {epoch}, {seconds:.1f} s" if epoch else "not reached")
            )
        row(f"fit {a.fit_epochs} epochs: final test acc, time to 85%", *outcomes)
    for workers_now in a.compare_workers:
        loader = make_loaders(a.batch_size, 0, device, workers_now, size, 1000, data=data)[0]
        row(
            f"one training epoch, s ({len(loader.dataset)} images), {workers_now} loader workers",
            "",
            f"{epoch_seconds(loader, device):.2f}",
        )
    chosen = precision_policy(device).dtype
    for dtype in dict.fromkeys((None, chosen)):
        for channels_last in (False, True):
            name = f"train step images/s, {DTYPE_NAMES[dtype]}, {'channels_last' if channels_last else 'contiguous'}"
            row(name, "", f"{step_rate(device, a.batch_size, dtype, channels_last, steps):,.0f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
