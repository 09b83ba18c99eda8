"""The S9 network: C1 C2 C3 C4 O, no pooling but GAP, no stride, dilated kernels to shrink.

Each block ends in a 3x3 convolution with dilation 4 and no padding: it looks 8 pixels across
and cuts 8 pixels off the map (32 -> 24 -> 16 -> 8), doing a strided convolution's job (less
compute per layer, faster growth of the receptive field) without skipping any pixel.
`Net`'s keywords swap each technique for its classic alternative, for the ablation (docs/ablation.md).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torchsummary

from .dataset import CIFAR10_MEAN, CIFAR10_STD, CLASSES, check_images, normalize
from .receptive_field import count_macs
from .recipe import RECIPE

DOWNSAMPLING = ("dilated", "stride", "maxpool")  # how C1..C3 shrink the map; only "dilated" keeps S9's rules


class ConvBNReLU(nn.Sequential):
    """Dense 3x3 conv -> BatchNorm -> ReLU; padding=dilation keeps the size, padding=0 shrinks it."""

    def __init__(self, c_in: int, c_out: int, dilation: int = 1, padding: int | None = None, stride: int = 1):
        padding = dilation if padding is None else padding
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride, padding, dilation, bias=False),  # BN has the bias
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 (one filter per channel) then pointwise 1x1: ~8x fewer weights than a dense 3x3."""

    def __init__(self, c_in: int, c_out: int, dilation: int = 1, padding: int | None = None, stride: int = 1):
        padding = dilation if padding is None else padding
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride, padding, dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),  # no ReLU in between, as in Xception
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class Residual(nn.Module):
    """x + f(x): the identity path carries the gradient, so deep blocks train in few epochs."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.f = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class Net(nn.Module):
    """C1 C2 C3 C4 O for CIFAR-10; the defaults are the configuration we ship (under 200k weights).

    downsample: "dilated" (3x3, dilation 4, no padding: 32 -> 24 -> 16 -> 8), "stride" (3x3, stride 2)
    or "maxpool" (3x3 then 2x2 max pooling), both 32 -> 16 -> 8 -> 4. separable=False makes C3/C4 dense;
    residual=False drops the skip connections.
    """

    def __init__(
        self,
        widths: Sequence[int] = RECIPE.widths,
        num_classes: int = 10,
        *,
        downsample: str = "dilated",
        separable: bool = True,
        residual: bool = True,
    ):
        super().__init__()
        if downsample not in DOWNSAMPLING:
            raise ValueError(f"downsample must be one of {DOWNSAMPLING}, got {downsample!r}")
        w1, w2, w3, w4 = widths
        deep = SeparableConv if separable else ConvBNReLU  # the layer type of C3 and C4

        def pair(layer: type[nn.Module], width: int, dilation: int = 1) -> nn.Module:
            layers = (layer(width, width, dilation), layer(width, width, dilation))
            return Residual(*layers) if residual else nn.Sequential(*layers)

        def shrink(layer: type[nn.Module], c_in: int, c_out: int) -> nn.Module:
            if downsample == "stride":
                return layer(c_in, c_out, stride=2)
            if downsample == "maxpool":
                return nn.Sequential(layer(c_in, c_out), nn.MaxPool2d(2))
            return layer(c_in, c_out, dilation=4, padding=0)  # 8 pixels across, 8 pixels off the map

        self.c1 = nn.Sequential(ConvBNReLU(3, w1), pair(ConvBNReLU, w1), shrink(ConvBNReLU, w1, w2))  # 32 -> 24
        self.c2 = nn.Sequential(pair(ConvBNReLU, w2), shrink(ConvBNReLU, w2, w3))  # 24x24, still dense -> 16
        self.c3 = nn.Sequential(pair(deep, w3), shrink(deep, w3, w4))  # 16x16: separable keeps width cheap -> 8
        self.c4 = nn.Sequential(pair(deep, w4, dilation=2))  # 8x8: dilation 2 widens the view to the whole image
        self.output = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w4, num_classes))
        trimmed = sum(
            m.dilation[0] * (m.kernel_size[0] - 1) - 2 * m.padding[0]
            for m in self.modules()
            if isinstance(m, nn.Conv2d)
        )
        self.min_size = 1 + trimmed if downsample == "dilated" else 8  # three halvings need 8 pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"Net expects a batch of RGB images N x 3 x H x W with H, W >= {self.min_size} "
                f"(CIFAR-10: N x 3 x 32 x 32), got {tuple(x.shape)}; "
                "convert HWC images with x.permute(0, 3, 1, 2) and grayscale with x.expand(-1, 3, -1, -1)."
            )
        return self.output(self.c4(self.c3(self.c2(self.c1(x)))))


def count_parameters(model: nn.Module) -> int:
    """Trainable weights: the number the assignment caps at 200,000."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summary(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> None:
    """torchsummary's table, computed on a CPU copy (its default "cuda" fails elsewhere, and mps is unknown to it).

    The copy also leaves the real BatchNorm statistics untouched by the summary's forward pass.
    """
    torchsummary.summary(copy.deepcopy(model).cpu().float(), input_size, device="cpu")
    print(f"Multiply-accumulates per image: {count_macs(model, input_size) / 1e6:.1f} M")


def load_model(path: str | Path = "Results/s9_net.pt", *, model: nn.Module | None = None) -> nn.Module:
    """Weights saved by this kit (a state_dict) in `model` (default: the shipped Net), on the CPU, in eval mode.

    eval() matters: in train mode BatchNorm normalizes by the batch, and one image alone scores near chance.
    """
    model = Net() if model is None else model
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
        from PIL import Image  # torchvision's dependency; only needed for files

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
