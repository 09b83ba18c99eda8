"""Benchmark: `python -m tools.bench` measures the input pipeline and the training step on this machine.

Side by side in one run: the naive loader (one albumentations call, Normalize, ToTensorV2 and a collate
per image, as the seed solution did) against make_loaders (whole uint8 batches per worker, normalized on
the device); one epoch with each; one epoch with 1, 2 and all cores as loader workers; and train-step
throughput in fp32 and the policy's precision x contiguous/channels_last. On CUDA every timed part runs
after a warm-up, with cudnn.benchmark as in real runs, between synchronizations; fp16 is timed with its
GradScaler, as training runs it. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import albumentations as A
import numpy as np
import torch
import torch.nn as nn
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset

from helpers.backprop import train
from helpers.dataset import CIFAR10_MEAN, CIFAR10_STD, ImageData, cifar10, default_workers, make_loaders
from helpers.device import Precision, precision_policy
from helpers.model import Net
from helpers.recipe import RECIPE

DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class NaiveCIFAR10(Dataset):
    """The per-image loader this kit replaced: augment, Normalize and ToTensorV2 per image, default collate."""

    def __init__(self, images: np.ndarray, labels: list[int], seed: int = 0):
        augment = RECIPE.augmentations(CIFAR10_MEAN)
        self.transform = A.Compose([*augment, A.Normalize(CIFAR10_MEAN, CIFAR10_STD), ToTensorV2()], seed=seed)
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.images[i])["image"], self.labels[i]


def naive_loader(data: ImageData, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """DataLoader over NaiveCIFAR10 with the usual shuffle/workers/pin_memory settings."""
    return DataLoader(
        NaiveCIFAR10(data.train_images, data.train_labels),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def loader_rate(loader: DataLoader, batches: int) -> float:
    """Images/s a loader delivers (after one warm-up batch that pays for starting the workers)."""
    it = iter(loader)
    next(it)
    seen, start = 0, time.perf_counter()
    for _, (images, _) in zip(range(batches), it):
        seen += len(images)
    return seen / (time.perf_counter() - start)


def _net_and_optimizer(model: nn.Module | None, device: torch.device, channels_last: bool):
    """A fresh Net (or `model`) on the device in the layout asked for, and the recipe's optimizer at a gentle lr."""
    model = (model or Net()).to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return model, replace(RECIPE, max_lr=0.01).optimizer(model)  # random batches: no step may diverge


def step_rate(
    precision: Precision,
    channels_last: bool,
    batch_size: int,
    steps: int,
    model: nn.Module | None = None,
) -> float:
    """Train-step images/s on one synthetic batch already on the device (fp16 with its GradScaler, as training)."""
    device, dtype = precision.device, precision.dtype
    model, optimizer = _net_and_optimizer(model, device, channels_last)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    batch = (x, torch.randint(0, 10, (batch_size,), device=device))
    scaler = precision.grad_scaler()
    train(model, [batch] * 3, optimizer, scaler=scaler, dtype=dtype)  # warm-up: cuDNN autotuning, oneDNN primitives
    synchronize(device)
    start = time.perf_counter()
    train(model, [batch] * steps, optimizer, scaler=scaler, dtype=dtype)
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def epoch_seconds(loader: DataLoader, precision: Precision) -> float:
    """Wall seconds of one training epoch over a loader, after a warm-up step."""
    device, dtype = precision.device, precision.dtype
    model, optimizer = _net_and_optimizer(None, device, True)
    scaler = precision.grad_scaler()
    train(model, [next(iter(loader))], optimizer, scaler=scaler, dtype=dtype)  # warm-up outside the timer
    synchronize(device)
    start = time.perf_counter()
    train(model, loader, optimizer, scaler=scaler, dtype=dtype)
    synchronize(device)
    return time.perf_counter() - start


def parser() -> argparse.ArgumentParser:
    """The command line; no abbreviated options, so a typo is an error instead of another option."""
    p = argparse.ArgumentParser(
        prog="python -m tools.bench",
        allow_abbrev=False,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: per device)")
    p.add_argument(
        "--loader-batches", type=int, default=None, help="batches timed per loader (default: 90 GPU, 10 CPU)"
    )
    p.add_argument("--steps", type=int, default=None, help="train steps timed per setting (default: 50 GPU, 3 CPU)")
    p.add_argument(
        "--epoch-images", type=int, default=None, help="images in a timed epoch (default: 50000 GPU, 5120 CPU)"
    )
    p.add_argument(
        "--compare-workers", type=int, nargs="*", default=None, help="worker counts to time (default: 1, 2, all cores)"
    )
    p.add_argument("--out", default=None, help="also write the report to this markdown file")
    return p


def loader_rows(
    data: ImageData, precision: Precision, batch_size: int, workers: int, batches: int, compare: list[int]
) -> Iterator[tuple[str, str, str]]:
    """Table rows (measurement, naive, make_loaders): images/s delivered, one epoch, one epoch per worker count."""
    device, augment = precision.device, RECIPE.augmentations(data.mean)
    naive = naive_loader(data, batch_size, workers, device)
    fast = make_loaders(data, batch_size=batch_size, augment=augment, device=device, num_workers=workers)[0]
    rates = f"{loader_rate(naive, batches):,.0f}", f"{loader_rate(fast, batches):,.0f}"
    yield f"loader images/s ({batches} batches)", *rates
    yield (
        f"one training epoch, s ({len(naive.dataset)} images, {workers} workers)",
        f"{epoch_seconds(naive, precision):.2f}",
        f"{epoch_seconds(fast, precision):.2f}",
    )
    for count in compare:
        loader = make_loaders(data, batch_size=batch_size, augment=augment, device=device, num_workers=count)[0]
        yield f"one training epoch, s, {count} loader workers", "", f"{epoch_seconds(loader, precision):.2f}"


def step_rows(precision: Precision, batch_size: int, steps: int) -> Iterator[tuple[str, str, str]]:
    """Table rows of train-step images/s: fp32 and the policy's precision, each contiguous and channels_last."""
    for dtype in dict.fromkeys((None, precision.dtype)):
        for channels_last in (False, True):
            rate = step_rate(replace(precision, dtype=dtype), channels_last, batch_size, steps)
            scaler = " + GradScaler" if dtype == torch.float16 else ""
            layout = "channels_last" if channels_last else "contiguous"
            yield f"train step images/s, {DTYPE_NAMES[dtype]}{scaler}, {layout}", "", f"{rate:,.0f}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: prints a markdown report (and writes it with --out)."""
    a = parser().parse_args(argv)
    precision = precision_policy()
    gpu = precision.device.type == "cuda"
    torch.backends.cudnn.benchmark = True  # as training sets it; no effect off CUDA
    workers = default_workers(precision.device) if a.workers is None else a.workers
    batches, steps = a.loader_batches or (90 if gpu else 10), a.steps or (50 if gpu else 3)
    size = a.epoch_images or (None if gpu else 5120)
    compare = a.compare_workers if a.compare_workers is not None else sorted({1, 2, os.cpu_count() or 1})
    torch.manual_seed(0)
    lines = [
        f"# Benchmark: {precision.hardware}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        "",
        f"batch {a.batch_size}, {workers} loader workers, {precision}",
        "",
        "| measurement | naive per-image loader | make_loaders |",
        "| --- | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    data = cifar10().subsample(train_images=size, test_images=1000)  # loaded once for every loader below
    rows = loader_rows(data, precision, a.batch_size, workers, batches, compare)
    for row in itertools.chain(rows, step_rows(precision, a.batch_size, steps)):
        lines.append(f"| {' | '.join(row)} |")
        print(lines[-1], flush=True)  # each row as it is measured
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
