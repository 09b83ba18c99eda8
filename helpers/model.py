"""The S9 network: C1 C2 C3 C4 then the output, no pooling but the global average, no stride.

Each of C1..C3 ends in a 3x3 convolution with dilation 4 and no padding: it looks 8 pixels across and cuts
8 pixels off the map (32 -> 24 -> 16 -> 8), doing a strided convolution's job without skipping any pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

WIDTHS = (32, 48, 96, 128)  # C1..C4 channels: 187,562 parameters, under the assignment's 200k
MIN_SIZE = 25  # three shrinking convolutions take 8 pixels each off the map: 25 is the smallest image left 1x1


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
    """C1 C2 C3 C4 O for CIFAR-10 (3 x 32 x 32 in, 10 class scores out); `widths` are the channels of C1..C4."""

    def __init__(self, widths: Sequence[int] = WIDTHS, num_classes: int = 10):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.c1 = nn.Sequential(  # 32x32, dense: few channels, many pixels
            ConvBNReLU(3, w1),
            Residual(ConvBNReLU(w1, w1), ConvBNReLU(w1, w1)),
            ConvBNReLU(w1, w2, dilation=4, padding=0),  # 32 -> 24
        )
        self.c2 = nn.Sequential(  # 24x24, dense
            Residual(ConvBNReLU(w2, w2), ConvBNReLU(w2, w2)),
            ConvBNReLU(w2, w3, dilation=4, padding=0),  # 24 -> 16
        )
        self.c3 = nn.Sequential(  # 16x16, depthwise-separable: wide for few weights
            Residual(SeparableConv(w3, w3), SeparableConv(w3, w3)),
            SeparableConv(w3, w4, dilation=4, padding=0),  # 16 -> 8
        )
        self.c4 = nn.Sequential(  # 8x8, separable with dilation 2: each unit sees the whole image
            Residual(SeparableConv(w4, w4, dilation=2), SeparableConv(w4, w4, dilation=2)),
        )
        self.output = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w4, num_classes))  # GAP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < MIN_SIZE or not x.is_floating_point():
            raise ValueError(
                f"Net expects a batch of normalized float RGB images N x 3 x H x W with H, W >= {MIN_SIZE} "
                f"(CIFAR-10: N x 3 x 32 x 32), got {x.dtype} {tuple(x.shape)}; convert HWC images with "
                "x.permute(0, 3, 1, 2), grayscale with x.expand(-1, 3, -1, -1), uint8 with dataset.normalize."
            )
        return self.output(self.c4(self.c3(self.c2(self.c1(x)))))
