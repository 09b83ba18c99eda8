"""Image data: CIFAR-10 (or any uint8 image arrays), a validation split, and loaders whose batches arrive ready.

Every loader here yields what torchvision's do, normalized float N x C x H x W (already on the device), so
`for x, y in loader: model(x)` and tools made for torchvision loaders work unchanged. Inside, images travel
as uint8 (4x smaller than float32) and the albumentations transforms run in the workers a whole batch at a time.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import urllib.error
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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
    """A labelled image-classification dataset in memory: what make_loaders takes.

    Images are uint8 N x H x W x C arrays; mean/std (0..1 scale, per channel) are computed from the
    train images when not given. `evaluation` names what the test_* split is: "test", or "validation"
    for training images held out by `hold_out`.
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
        """A seeded random `train_images` and `test_images` of each split (None: all of it); the defaults are
        quick mode's, a smoke test of the whole path in a minute, not a result."""
        picked = []
        for images, labels, size in (
            (self.train_images, self.train_labels, train_images),
            (self.test_images, self.test_labels, test_images),
        ):
            keep = slice(None) if size is None else np.random.default_rng(seed).permutation(len(images))[:size]
            picked += [images[keep], labels[keep]]
        return ImageData(*picked, self.classes, self.mean, self.std, self.evaluation)

    def hold_out(self, size: int, seed: int = 0) -> ImageData:
        """The same data with a seeded `size` of its training images as the evaluation split, and no test set.

        Choose between recipes on this validation split; score the test set once, for the chosen one. The
        held-out images never train, and mean/std stay the full training split's (a statistic, not a choice).
        """
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
        shape = getattr(images, "shape", None)
        raise ValueError(
            f"expected uint8 images N x H x W x C with C = 1 or 3, "
            f"got {getattr(images, 'dtype', type(images))} {shape}; "
            "add a channel axis to grayscale (images[..., None]) and convert floats with (x * 255).astype(np.uint8)"
        )


def data_root() -> Path:
    """Where CIFAR-10 lives: $CIFAR10_ROOT, else ./data (holding cifar-10-batches-py/)."""
    return Path(os.environ.get("CIFAR10_ROOT", "./data"))


def _corrupt_files(folder: Path) -> list[str]:
    """Names of CIFAR-10 files that are present but do not match torchvision's md5 sums."""
    sums = torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list
    return [
        name
        for name, md5 in sums
        if (folder / name).exists() and hashlib.md5((folder / name).read_bytes()).hexdigest() != md5
    ]


def _how_to_get_cifar10(root: Path) -> str:
    """What a student on a laptop or on Colab does when the data is missing or broken."""
    return (
        f"Fix one of:\n"
        f"  - go online and rerun: it downloads the 170 MB archive once into {root};\n"
        f"  - or download 'CIFAR-10 python version' (cifar-10-python.tar.gz) from {CIFAR10_PAGE}\n"
        f"    and unpack it there: mkdir -p {root} && tar -xzf cifar-10-python.tar.gz -C {root}\n"
        f"    (7-Zip on Windows; this makes {root}/cifar-10-batches-py/);\n"
        f"  - or point CIFAR10_ROOT at the folder that already holds cifar-10-batches-py/:\n"
        f"    export CIFAR10_ROOT=/path/to/folder  (Windows: set CIFAR10_ROOT=..., a notebook or Colab:\n"
        f"    os.environ['CIFAR10_ROOT'] = '/content/drive/MyDrive/data' before the data cell)."
    )


def load_cifar10(train: bool, root: str | Path | None = None) -> torchvision.datasets.CIFAR10:
    """The raw split (uint8 `.data` N x 32 x 32 x 3, `.targets`) from `root`/cifar-10-batches-py; downloads once."""
    root = Path(root) if root is not None else data_root()
    folder = root.resolve() / "cifar-10-batches-py"
    try:
        # download=True verifies the md5 of a local copy and downloads only when it is missing or corrupt.
        return torchvision.datasets.CIFAR10(root=str(root), train=train, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        corrupt = _corrupt_files(folder)
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
    """Draw every transform of the pipeline from ONE generator seeded with `seed`.

    Compose.set_random_seed gives each transform its own generator with the same seed, so the first
    image's draws agree across transforms (all applied or none); one shared generator decorrelates them.
    """
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
    """uint8 batch N x H x W x C -> float N x C x H x W, normalized on the batch's own device.

    Same numbers as A.Normalize + ToTensorV2, laid out channels_last (what the convolutions prefer).
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != len(mean):
        raise ValueError(
            f"normalize expects a uint8 N x H x W x {len(mean)} batch (one mean per channel), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    m, s = _pixel_statistics(tuple(mean), tuple(std), images.device)
    return ((images.float() - m) / s).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


class SeededBatch(NamedTuple):
    """A batch of dataset indices and the seed its augmentations are drawn from."""

    seed: int
    indices: list[int]


class SeededBatchSampler(Sampler[SeededBatch]):
    """Shuffled batches whose order and augmentation seeds depend only on (seed, epoch).

    So a run is reproducible whatever the number of workers, and a resumed run draws
    exactly the batches and augmentations an uninterrupted one would have.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.size, self.batch_size, self.shuffle, self.seed, self.drop_last = size, batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentations the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[SeededBatch]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**31 - 1, (len(self),), generator=generator)
        for b in range(len(self)):
            yield SeededBatch(int(seeds[b]), order[b * self.batch_size : (b + 1) * self.batch_size].tolist())


class ImageDataset(Dataset):
    """uint8 images, augmented a whole batch at a time: indexed by a SeededBatch, it returns (images, labels).

    Carries what the loader normalizes with (mean, std) and the class names.
    """

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

    def __getitem__(self, batch: SeededBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One uint8 N x H x W x C tensor of the batch's images, augmented with the batch's seed, and its labels."""
        images = self.images[batch.indices]
        if self.transform is not None:
            seed_pipeline(self.transform, batch.seed)
            images = np.stack([self.transform(image=image)["image"] for image in images])
            images = images[..., None] if images.ndim == 3 else images  # some transforms drop a single channel
        return torch.from_numpy(images), self.labels[batch.indices]


class ReadyLoader(DataLoader):
    """A DataLoader whose batches arrive ready: normalized float N x C x H x W on `device`, as torchvision's do.

    As in airbench, the speed stays inside the loader: workers augment whole uint8 batches (no per-image
    collate, 4x less to ship than float32), and the normalization runs here, on the device.
    """

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
    """DataLoader workers per device: on a GPU every core loads, on the CPU one core is left for training.

    On the CPU the main process computes, so a worker per core but one (on 2 cores a second worker was
    slower, docs/speed.md). On a GPU the main process mostly waits, so every core loads (Colab's T4: 2).
    """
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

    augment: the train transforms, run on uint8 pixels (none by default). The order of batches and every
    augmentation depend only on (seed, epoch), whatever the number of workers: so a resumed run draws the
    batches an uninterrupted one would; seed=None takes torch's, so torch.manual_seed(seed) alone fixes them.
    `cifar10().hold_out(5000)` as `data` makes the second a validation loader.
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
        dataset = ImageDataset(
            images,
            labels,
            transform=pipeline if train else None,
            mean=data.mean,
            std=data.std,
            classes=data.classes,
        )
        # the evaluation split has no transform: indexing it in the main process is fastest
        loaders.append(ReadyLoader(dataset, sampler, device, workers if train else 0))
    return loaders[0], loaders[1]
