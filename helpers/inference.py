"""Using a trained network: load its weights, classify one image (an array or an image file)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .dataset import CIFAR10_MEAN, CIFAR10_STD, CLASSES, check_images, normalize


def load_model(path: str | Path, model: nn.Module) -> nn.Module:
    """Weights saved by this kit (a state_dict, e.g. Results/s9_net.pt) in `model`, on the CPU, in eval mode.

    eval() matters: in train mode BatchNorm normalizes by the batch, and one image alone scores near chance.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" in state:
        raise ValueError(
            f"{path} is not a weights file (a state_dict); a training checkpoint keeps them under ['model']"
        )
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def classify(
    model: nn.Module,
    image: np.ndarray | str | Path,
    *,
    classes: Sequence[str] = CLASSES,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    size: tuple[int, int] = (32, 32),
    resize: bool = False,
) -> tuple[str, dict[str, float]]:
    """One uint8 H x W x C image (or an image file) -> (predicted class, probability of each class).

    size: the (height, width) the network was trained on; another size is refused, or with resize=True
    shrunk to it (area interpolation), since a fully convolutional net would answer for any size, wrongly.
    Runs in eval mode (and restores the model's mode): BatchNorm must use its running statistics.
    """
    if isinstance(image, (str, Path)):
        image = np.asarray(Image.open(image).convert("RGB" if len(mean) == 3 else "L"))
        image = image[..., None] if image.ndim == 2 else image
    check_images(image[None])
    if image.shape[:2] != tuple(size):
        if not resize:
            raise ValueError(
                f"the image is {image.shape[0]}x{image.shape[1]} but the network takes {size[0]}x{size[1]}: "
                "pass resize=True to shrink it, or resize it yourself"
            )
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA).reshape(*size, image.shape[-1])
    p = next(model.parameters())
    was_training = model.training
    try:
        x = normalize(torch.tensor(image[None], device=p.device), mean, std).to(p.dtype)
        probabilities = model.eval()(x).float().softmax(1)[0].cpu()
    finally:
        model.train(was_training)
    return classes[int(probabilities.argmax())], {c: float(v) for c, v in zip(classes, probabilities)}
