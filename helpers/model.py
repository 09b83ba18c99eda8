"""The S9 network: C1 C2 C3 C4 then the output, no pooling but the global average, no stride.

C1 opens with airbench's frozen 2x2 patch whitening (32 -> 31): the first learned layer reads decorrelated input
and learns faster (docs/ablation.md). C1..C3 each end in a 3x3 convolution of dilation 4 without padding: it
looks 9 pixels across and cuts 8 off the map (31 -> 23 -> 15 -> 7), a stride's job without skipping a pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .dataset import ImageData, normalize

WIDTHS = (32, 48, 96, 128)  # C1..C4 channels: 193,898 parameters (288 of them frozen), under the assignment's 200k
MIN_SIZE = 26  # the whitening takes 1 pixel and three shrinking convolutions 8 each: 26 is the smallest left 1x1


class PatchWhitening(nn.Conv2d):
    """A frozen 2x2 convolution that decorrelates pixel patches: the 12 principal directions of the data's 2x2
    patches at unit variance, and their negatives (the ReLU after it keeps both halves). 288 weights, all counted."""

    def __init__(self, eps: float = 5e-4):
        super().__init__(3, 24, 2, bias=False)
        self.weight.requires_grad_(False)
        self.eps = eps  # damps the directions of least variance, which are mostly noise

    @torch.no_grad()
    def fit(self, data: ImageData, images: int = 5000) -> PatchWhitening:
        """Set the weights from the first `images` training images: 12 x 12 patch statistics settle long before
        5,000 (airbench's sample). Never from the evaluation split's."""
        sample = normalize(torch.from_numpy(data.train_images[:images]), data.mean, data.std)
        patches = sample.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
        variances, directions = torch.linalg.eigh(patches.T @ patches / len(patches))
        w = (directions.T / torch.sqrt(variances + self.eps)[:, None]).reshape(12, 3, 2, 2)
        self.weight.copy_(torch.cat([w, -w]).to(self.weight))
        return self


class ConvBNReLU(nn.Sequential):
    """Dense 3x3 conv -> BatchNorm -> ReLU; padding=dilation keeps the size, padding=0 shrinks it."""

    def __init__(self, c_in: int, c_out: int, dilation: int = 1, padding: int | None = None):
        padding = dilation if padding is None else padding
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=padding, dilation=dilation, bias=False),  # BN has the bias
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 (one filter per channel, groups=c_in) then pointwise 1x1: ~8x fewer weights than dense."""

    def __init__(self, c_in: int, c_out: int, dilation: int = 1, padding: int | None = None):
        padding = dilation if padding is None else padding
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, padding=padding, dilation=dilation, groups=c_in, bias=False),
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
    """C1 C2 C3 C4 O for CIFAR-10 (3 x 32 x 32 in, 10 class scores out); `widths` are the channels of C1..C4.
    Call `fit_whitening(data)` once before training: until then C1's frozen first layer is random."""

    def __init__(self, widths: Sequence[int] = WIDTHS, num_classes: int = 10):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.c1 = nn.Sequential(  # 31x31, dense: few channels, many pixels
            PatchWhitening(),  # 32 -> 31, frozen
            nn.ReLU(inplace=True),
            ConvBNReLU(24, w1),
            Residual(ConvBNReLU(w1, w1), ConvBNReLU(w1, w1)),
            ConvBNReLU(w1, w2, dilation=4, padding=0),  # 31 -> 23
        )
        self.c2 = nn.Sequential(  # 23x23, dense
            Residual(ConvBNReLU(w2, w2), ConvBNReLU(w2, w2)),
            ConvBNReLU(w2, w3, dilation=4, padding=0),  # 23 -> 15
        )
        self.c3 = nn.Sequential(  # 15x15, depthwise-separable: wide for few weights
            Residual(SeparableConv(w3, w3), SeparableConv(w3, w3)),
            SeparableConv(w3, w4, dilation=4, padding=0),  # 15 -> 7
        )
        self.c4 = nn.Sequential(  # 7x7, separable with dilation 2: each unit sees the whole image
            Residual(SeparableConv(w4, w4, dilation=2), SeparableConv(w4, w4, dilation=2)),
        )
        self.output = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w4, num_classes))  # GAP

    def fit_whitening(self, data: ImageData) -> Net:
        """Fit C1's frozen whitening to the training images of `data`; returns the network."""
        self.c1[0].fit(data)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < MIN_SIZE or not x.is_floating_point():
            raise ValueError(
                f"Net expects a batch of normalized float RGB images N x 3 x H x W with H, W >= {MIN_SIZE} "
                f"(CIFAR-10: N x 3 x 32 x 32), got {x.dtype} {tuple(x.shape)}; convert HWC images with "
                "x.permute(0, 3, 1, 2), grayscale with x.expand(-1, 3, -1, -1), uint8 with dataset.normalize."
            )
        return self.output(self.c4(self.c3(self.c2(self.c1(x)))))
