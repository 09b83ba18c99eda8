"""CIFAR-10: loading, the assignment's albumentations pipeline, and a fast batched loader.

Images travel through the DataLoader as uint8 (4x smaller than float32) and are normalized
on the device by `normalize`; the albumentations transforms themselves run in the workers,
on whole batches at a time, so no per-image collate or PIL round trip is paid.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import albumentations as A
import cv2
import numpy as np
import torch
import torchvision
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset, Sampler

# Per-channel statistics of the 50,000 training images, 0..1 scale (tests recompute them).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# The same mean in the uint8 scale where the augmentations run: CoarseDropout's and
# ShiftScaleRotate's fill, which Normalize later maps to (almost exactly) zero.
MEAN_PIXEL = tuple(round(255 * m) for m in CIFAR10_MEAN)  # (125, 123, 114)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)

# Probabilities and limits of the train augmentations, justified in augmentations().
FLIP_P = 0.5
SHIFT_LIMIT, SCALE_LIMIT, ROTATE_LIMIT, SHIFT_SCALE_ROTATE_P = 0.0625, 0.1, 15, 0.5
HOLE_SIZE, COARSE_DROPOUT_P = 16, 0.5


class DatasetNotFoundError(RuntimeError):
    """CIFAR-10 is neither on disk nor downloadable (offline)."""


def data_root() -> Path:
    """Where CIFAR-10 lives: $CIFAR10_ROOT, else ./data (holding cifar-10-batches-py/)."""
    return Path(os.environ.get("CIFAR10_ROOT", "./data"))


def load_cifar10(train: bool, root: str | Path | None = None) -> torchvision.datasets.CIFAR10:
    """The raw split (uint8 `.data` N x 32 x 32 x 3, `.targets`); downloads once when online."""
    root = Path(root) if root is not None else data_root()
    try:
        # download=True verifies the md5 of a local copy and downloads only when it is missing.
        return torchvision.datasets.CIFAR10(root=str(root), train=train, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise DatasetNotFoundError(
            f"CIFAR-10 is not in {root.resolve()}/cifar-10-batches-py and could not be downloaded "
            f"({type(err).__name__}: {err}).\nFix one of: go online and rerun (it downloads 170 MB "
            f"once); unpack an offline copy there (python3 ../shared/cifar10/unpack.py {root}); "
            f"or set CIFAR10_ROOT to the folder that holds cifar-10-batches-py/."
        ) from err


def augmentations() -> list[A.BasicTransform]:
    """The assignment's train augmentations, in uint8 pixel space (before Normalize)."""
    with warnings.catch_warnings():
        # 2.x advises Affine, which ShiftScaleRotate wraps; the assignment names ShiftScaleRotate.
        warnings.filterwarnings("ignore", message="ShiftScaleRotate is a special case", category=UserWarning)
        shift_scale_rotate = A.ShiftScaleRotate(
            # CIFAR objects are centred and fill the frame: +-2 px shift, +-10% scale and +-15 deg keep
            # them recognisable (the 45 deg default tilts horizons and costs accuracy at 32x32).
            shift_limit=SHIFT_LIMIT,
            scale_limit=SCALE_LIMIT,
            rotate_limit=ROTATE_LIMIT,
            border_mode=cv2.BORDER_CONSTANT,
            fill=MEAN_PIXEL,  # opened borders become the mean (0 after Normalize), not black
            p=SHIFT_SCALE_ROTATE_P,
        )
    return [
        A.HorizontalFlip(p=FLIP_P),  # every CIFAR class is left-right symmetric
        shift_scale_rotate,
        # Cutout: one 16x16 hole of mean colour (2.x names; 1.x's max_holes/fill_value are ignored).
        # p=0.5 rather than 1: a 200k-parameter net in a short schedule underfits before it overfits.
        A.CoarseDropout(
            num_holes_range=(1, 1),
            hole_height_range=(HOLE_SIZE, HOLE_SIZE),
            hole_width_range=(HOLE_SIZE, HOLE_SIZE),
            fill=MEAN_PIXEL,
            p=COARSE_DROPOUT_P,
        ),
    ]


def train_transforms(seed: int | None = None) -> A.Compose:
    """HxWx3 uint8 image -> augmented, normalized 3xHxW float tensor (the per-image pipeline)."""
    return A.Compose([*augmentations(), A.Normalize(CIFAR10_MEAN, CIFAR10_STD), ToTensorV2()], seed=seed)


def test_transforms() -> A.Compose:
    """HxWx3 uint8 image -> normalized 3xHxW float tensor, no augmentation."""
    return A.Compose([A.Normalize(CIFAR10_MEAN, CIFAR10_STD), ToTensorV2()])


@functools.cache
def _pixel_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std in the 0..255 scale, made once per device (a copy per batch would stall the GPU)."""
    return torch.tensor(CIFAR10_MEAN, device=device) * 255, torch.tensor(CIFAR10_STD, device=device) * 255


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 batch N x H x W x 3 -> float N x 3 x H x W, normalized on the batch's own device.

    Same numbers as A.Normalize + ToTensorV2, laid out channels_last (what the convolutions prefer).
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"normalize expects a uint8 N x H x W x 3 batch, got {images.dtype} {tuple(images.shape)}")
    mean, std = _pixel_statistics(images.device)
    return ((images.float() - mean) / std).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def model_input(images: torch.Tensor) -> torch.Tensor:
    """A loader batch as Net wants it: uint8 N x H x W x 3 gets normalized, float N x 3 x H x W passes as is.

    So train/test work with make_loaders' fast uint8 batches and with classic train_transforms() loaders.
    """
    return normalize(images) if images.dtype == torch.uint8 else images


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalized float (N x) 3 x H x W -> displayable 0..1 (N x) H x W x 3, for plots."""
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    return (images.detach().cpu().float() * std + mean).clamp(0, 1).movedim(-3, -1)


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


class CIFAR10Images(Dataset):
    """uint8 images through an optional albumentations pipeline, fetched a whole batch at a time."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: A.Compose | None = None):
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images N x 32 x 32 x 3, got {images.dtype} {images.shape}")
        # torchvision keeps .data as a transposed view; one contiguous copy makes every lookup cheap
        self.images, self.labels, self.transform = np.ascontiguousarray(images), torch.as_tensor(labels), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image = self.images[index]
        return (self.transform(image=image)["image"] if self.transform else image), int(self.labels[index])

    def __getitems__(self, batch: SeededBatch | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One uint8 N x 32 x 32 x 3 tensor and its labels: DataLoader calls this instead of collate."""
        indices = batch.indices if isinstance(batch, SeededBatch) else list(batch)
        images = self.images[indices]
        if self.transform is not None:
            if isinstance(batch, SeededBatch):
                self.transform.set_random_seed(batch.seed)
            images = np.stack([self.transform(image=image)["image"] for image in images])
        return torch.from_numpy(images), self.labels[indices]


def _already_batched(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn for CIFAR10Images: __getitems__ already returns whole tensors."""
    return batch


def default_workers() -> int:
    """DataLoader workers: every core but one for the training loop (Colab: 2 CPUs -> 1 worker)."""
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def subset(dataset: torchvision.datasets.CIFAR10, size: int | None, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """(images, labels) of the whole split, or of a seeded random `size` of it (quick mode, tests)."""
    if size is None or size >= len(dataset.data):
        return dataset.data, list(dataset.targets)
    keep = np.random.default_rng(seed).choice(len(dataset.data), size, replace=False)
    return dataset.data[keep], [dataset.targets[i] for i in keep]


def make_loaders(
    batch_size: int,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    root: str | Path | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train (augmented, shuffled) and test loaders yielding (uint8 N x 32 x 32 x 3, labels).

    seed=None takes torch's seed, so seed_everything(seed) alone fixes order and augmentations too.
    """
    seed = torch.initial_seed() % 2**31 if seed is None else seed
    num_workers = default_workers() if num_workers is None else num_workers
    splits = []
    for train, size, transform in ((True, train_size, A.Compose(augmentations())), (False, test_size, None)):
        images, labels = subset(load_cifar10(train, root), size, seed)
        dataset = CIFAR10Images(images, labels, transform)
        sampler = SeededBatchSampler(len(dataset), batch_size, shuffle=train, seed=seed)
        splits.append(
            DataLoader(
                dataset,
                batch_sampler=sampler,
                collate_fn=_already_batched,
                # the test split needs no transform: indexing it in the main process is fastest
                num_workers=num_workers if train else 0,
                persistent_workers=train and num_workers > 0,
                pin_memory=torch.device(device).type == "cuda",
            )
        )
    return splits[0], splits[1]
