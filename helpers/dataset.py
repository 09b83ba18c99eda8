"""Image data: CIFAR-10 (or any uint8 image arrays), a validation split, and loaders whose batches arrive ready.

The loaders yield what torchvision's do, normalized float N x C x H x W on the device; inside, images travel as
uint8 (4x smaller than float32) and the albumentations transforms run in the workers a whole batch at a time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import urllib.error
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Sampler

# Per-channel statistics of the 50,000 training images, 0..1 scale (tests recompute them).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def mean_pixel(mean: Sequence[float]) -> tuple[int, ...]:
    """A 0..1 mean in the uint8 scale where the augmentations run: the fill that Normalize maps to ~0."""
    return tuple(round(255 * m) for m in mean)


MEAN_PIXEL = mean_pixel(CIFAR10_MEAN)  # (125, 123, 114): CoarseDropout's and ShiftScaleRotate's fill
CPU = torch.device("cpu")
CIFAR10_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"  # "CIFAR-10 python version": cifar-10-python.tar.gz


class DatasetNotFoundError(RuntimeError):
    """CIFAR-10 is neither on disk nor downloadable (offline), or a file of it is corrupt."""


@dataclass
class ImageData:
    """A labelled image-classification dataset in memory (uint8 N x H x W x C images): what make_loaders takes.

    mean/std (0..1, per channel) default to the train images'; `evaluation` names the test_* split: "test", or
    "validation" for training images held out by `hold_out`.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    evaluation: str = "test"

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), np.asarray(getattr(self, f"{split}_labels"))
            check_images(images)
            if len(labels) != len(images) or labels.min() < 0 or labels.max() >= len(self.classes):
                raise ValueError(
                    f"{split}: {len(images)} images but {len(labels)} labels in "
                    f"{labels.min()}..{labels.max()}; labels must be 0..{len(self.classes) - 1} (one per class name)"
                )
            setattr(self, f"{split}_labels", labels.astype(np.int64))
        if self.mean is None or self.std is None:
            self.mean, self.std = channel_statistics(self.train_images)
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    def subsample(self, *, train_images: int | None = 512, test_images: int | None = 256, seed: int = 0) -> ImageData:
        """A seeded random part of each split (None: all of it); the defaults are quick mode's smoke test."""
        picked = []
        for images, labels, size in (
            (self.train_images, self.train_labels, train_images),
            (self.test_images, self.test_labels, test_images),
        ):
            keep = slice(None) if size is None else np.random.default_rng(seed).permutation(len(images))[:size]
            picked += [images[keep], labels[keep]]
        return ImageData(*picked, self.classes, self.mean, self.std, self.evaluation)

    def hold_out(self, size: int, seed: int = 0) -> ImageData:
        """A seeded `size` of the training images as the evaluation split, no test set: choose recipes on it, then
        score the test set once. mean/std stay the full training split's (a statistic, not a choice)."""
        if not 0 < size < len(self.train_images):
            raise ValueError(f"hold out between 1 and {len(self.train_images) - 1} training images, got {size}")
        order = np.random.default_rng(seed).permutation(len(self.train_images))
        keep, held = np.sort(order[size:]), np.sort(order[:size])
        images, labels = self.train_images, self.train_labels
        return ImageData(
            images[keep], labels[keep], images[held], labels[held], self.classes, self.mean, self.std, "validation"
        )


def channel_statistics(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0..1 scale, a chunk of images at a time (not a 1.2 GB float copy)."""
    total = squares = 0.0
    for start in range(0, len(images), chunk):
        pixels = images[start : start + chunk].reshape(-1, images.shape[-1]).astype(np.float64) / 255
        total, squares = total + pixels.sum(0), squares + (pixels**2).sum(0)
    count = images.size / images.shape[-1]
    mean = total / count
    return tuple(float(m) for m in mean), tuple(float(s) for s in np.sqrt(squares / count - mean**2))


def check_images(images: np.ndarray) -> None:
    """Refuse anything but a uint8 N x H x W x C array (C = 1 or 3), with what was given."""
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[-1] not in (1, 3)
    ):
        raise ValueError(
            f"expected uint8 images N x H x W x C with C = 1 or 3, got {getattr(images, 'dtype', type(images))} "
            f"{getattr(images, 'shape', '')}; add a channel axis to grayscale (images[..., None]) and convert "
            "floats with (x * 255).astype(np.uint8)"
        )


def data_root() -> Path:
    """Where CIFAR-10 lives: $CIFAR10_ROOT, else ./data (holding cifar-10-batches-py/)."""
    return Path(os.environ.get("CIFAR10_ROOT", "./data"))


def _how_to_get_cifar10(root: Path) -> str:
    """What a student on a laptop or on Colab does when the data is missing or broken."""
    return (
        f"Fix one of:\n  - go online and rerun: it downloads the 170 MB archive once into {root};\n"
        f"  - or download 'CIFAR-10 python version' (cifar-10-python.tar.gz) from {CIFAR10_PAGE} and unpack it\n"
        f"    there (7-Zip on Windows): mkdir -p {root} && tar -xzf cifar-10-python.tar.gz -C {root};\n"
        f"  - or point CIFAR10_ROOT at the folder that holds cifar-10-batches-py/: export CIFAR10_ROOT=/path\n"
        f"    (Windows: set CIFAR10_ROOT=...; a notebook or Colab, before the data cell:\n"
        f"    os.environ['CIFAR10_ROOT'] = '/content/drive/MyDrive/data')."
    )


def load_cifar10(train: bool, root: str | Path | None = None) -> torchvision.datasets.CIFAR10:
    """The raw split (uint8 `.data` N x 32 x 32 x 3, `.targets`) from `root`/cifar-10-batches-py; downloads once."""
    root = Path(root) if root is not None else data_root()
    folder = root.resolve() / "cifar-10-batches-py"
    missing = [p for p in (root, *root.parents) if not p.exists()]  # folders a failed download must not leave behind
    try:
        # download=True verifies the md5 of a local copy and downloads only when it is missing or corrupt.
        return torchvision.datasets.CIFAR10(root=str(root), train=train, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        for empty in missing:  # deepest first; rmdir removes a folder only while it is empty
            with contextlib.suppress(OSError):
                empty.rmdir()
        sums = torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list  # (file, md5)
        corrupt = [
            name
            for name, md5 in sums
            if (folder / name).exists() and hashlib.md5((folder / name).read_bytes()).hexdigest() != md5
        ]
        if corrupt:
            raise DatasetNotFoundError(
                f"CIFAR-10 in {folder} is corrupt: {', '.join(corrupt)} failed the md5 check (truncated or "
                f"changed), and a fresh copy could not be downloaded ({type(err).__name__}).\n"
                f"Delete {folder}, then:\n{_how_to_get_cifar10(root.resolve())}"
            ) from err
        raise DatasetNotFoundError(
            f"CIFAR-10 is not in {folder} and could not be downloaded ({type(err).__name__}: {err}).\n"
            f"{_how_to_get_cifar10(root.resolve())}"
        ) from err


def cifar10(root: str | Path | None = None) -> ImageData:
    """The real CIFAR-10, both splits, with its published mean and std."""
    train, test = load_cifar10(True, root), load_cifar10(False, root)
    return ImageData(
        train.data, np.array(train.targets), test.data, np.array(test.targets), CLASSES, CIFAR10_MEAN, CIFAR10_STD
    )


def seed_pipeline(transform: A.Compose, seed: int) -> A.Compose:
    """Draw every transform from ONE generator seeded with `seed`: Compose.set_random_seed gives each its own
    generator with the same seed, so the first image's draws agree across transforms (all applied or none)."""
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform


@functools.cache
def _pixel_statistics(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std in the 0..255 scale, made once per device (a copy per batch would stall the GPU)."""
    return torch.tensor(mean, device=device) * 255, torch.tensor(std, device=device) * 255


def normalize(
    images: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
) -> torch.Tensor:
    """uint8 batch N x H x W x C -> float N x C x H x W, normalized on the batch's own device: A.Normalize +
    ToTensorV2's numbers, laid out channels_last (what the convolutions prefer)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != len(mean):
        raise ValueError(
            f"normalize expects a uint8 N x H x W x {len(mean)} batch (one mean per channel), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    m, s = _pixel_statistics(tuple(mean), tuple(std), images.device)
    return ((images.float() - m) / s).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


class SeededBatchSampler(Sampler[tuple[int, list[int]]]):
    """Batches (augmentation seed, indices) whose order and seeds depend only on (seed, epoch): reproducible whatever
    the number of workers, and a resumed run draws exactly the batches an uninterrupted one would have."""

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.size, self.batch_size, self.shuffle, self.seed, self.epoch = size, batch_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentations the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)  # the last batch may be partial

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**31 - 1, (len(self),), generator=generator)
        for b in range(len(self)):
            yield int(seeds[b]), order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


class ImageDataset(Dataset):
    """uint8 images augmented a whole batch at a time: indexed by (seed, indices), it returns (images, labels).
    Carries what the loader normalizes with (mean, std) and the class names."""

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int],
        *,
        transform: A.Compose | None = None,
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str],
    ):
        check_images(images)
        # torchvision keeps .data as a transposed view; one contiguous copy makes every lookup cheap
        self.images, self.labels, self.transform = np.ascontiguousarray(images), torch.as_tensor(labels), transform
        self.mean, self.std, self.classes = tuple(mean), tuple(std), tuple(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, batch: tuple[int, list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's images as one uint8 N x H x W x C tensor, augmented with the batch's seed, and its labels."""
        seed, indices = batch
        images = self.images[indices]
        if self.transform is not None:
            seed_pipeline(self.transform, seed)
            images = np.stack([self.transform(image=image)["image"] for image in images])
            images = images[..., None] if images.ndim == 3 else images  # some transforms drop a single channel
        return torch.from_numpy(images), self.labels[indices]


class ReadyLoader(DataLoader):
    """A DataLoader whose batches arrive as torchvision's do, normalized float N x C x H x W, here on `device`. As in
    airbench, the speed stays inside: workers augment whole uint8 batches, and the device normalizes them."""

    def __init__(self, dataset: ImageDataset, sampler: SeededBatchSampler, device: torch.device, num_workers: int):
        super().__init__(
            dataset,
            batch_size=None,  # the sampler yields whole batches and the dataset builds them
            sampler=sampler,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=device.type == "cuda",
        )
        self.device = device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in super().__iter__():
            images = normalize(images.to(self.device, non_blocking=True), self.dataset.mean, self.dataset.std)
            yield images, labels.to(self.device, non_blocking=True)


def default_workers(device: torch.device) -> int:
    """Loader workers: every core on a GPU, where the main process mostly waits (Colab's T4: 2); one core fewer on
    the CPU, where the main process computes (on 2 cores a second worker was slower, docs/speed.md)."""
    cores = os.cpu_count() or 2
    return max(1, min(16, cores if device.type == "cuda" else cores - 1))


def make_loaders(
    data: ImageData,
    *,
    batch_size: int,
    augment: Sequence[A.BasicTransform] = (),
    seed: int | None = None,
    device: torch.device = CPU,
    num_workers: int | None = None,
) -> tuple[ReadyLoader, ReadyLoader]:
    """Train (augmented, shuffled) and test loaders over `data`, yielding normalized float N x C x H x W on `device`.

    augment: the train transforms, on uint8 pixels. Batches and augmentations depend only on (seed, epoch);
    seed=None takes torch's. `cifar10().hold_out(5000)` as `data` makes the second a validation loader.
    """
    seed = torch.initial_seed() % 2**31 if seed is None else seed
    workers = default_workers(device) if num_workers is None else num_workers
    pipeline = A.Compose(list(augment)) if augment else None
    loaders = []
    for train, images, labels in (
        (True, data.train_images, data.train_labels),
        (False, data.test_images, data.test_labels),
    ):
        sampler = SeededBatchSampler(len(images), batch_size, shuffle=train, seed=seed)  # refuses a bad batch_size
        transform = pipeline if train else None
        dataset = ImageDataset(images, labels, transform=transform, mean=data.mean, std=data.std, classes=data.classes)
        # the evaluation split has no transform: indexing it in the main process is fastest
        loaders.append(ReadyLoader(dataset, sampler, device, workers if train else 0))
    return loaders[0], loaders[1]
