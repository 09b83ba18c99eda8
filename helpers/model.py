"""The S9 network: C1 C2 C3 C4 O, no pooling but GAP, no stride, dilated kernels to shrink.

Each block ends in a 3x3 convolution with dilation 4 and no padding: it looks 8 pixels across
and cuts 8 pixels off the map (32 -> 24 -> 16 -> 8), doing a strided convolution's job (less
compute per layer, faster growth of the receptive field) without skipping any pixel.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torchsummary


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
    """Depthwise 3x3 (one filter per channel) then pointwise 1x1: ~8x fewer weights than a dense 3x3."""

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
    """C1 C2 C3 C4 O for CIFAR-10; the defaults are the configuration we ship (under 200k weights)."""

    def __init__(self, widths: tuple[int, int, int, int] = (32, 48, 96, 128), num_classes: int = 10):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.c1 = nn.Sequential(  # 32x32: few channels, dense convs see every colour together
            ConvBNReLU(3, w1),
            Residual(ConvBNReLU(w1, w1), ConvBNReLU(w1, w1)),
            ConvBNReLU(w1, w2, dilation=4, padding=0),  # 32 -> 24
        )
        self.c2 = nn.Sequential(  # 24x24: still dense, the cheapest compute per accuracy at this width
            Residual(ConvBNReLU(w2, w2), ConvBNReLU(w2, w2)),
            ConvBNReLU(w2, w3, dilation=4, padding=0),  # 24 -> 16
        )
        self.c3 = nn.Sequential(  # 16x16: separable convs from here on, so width stays affordable
            Residual(SeparableConv(w3, w3), SeparableConv(w3, w3)),
            SeparableConv(w3, w4, dilation=4, padding=0),  # 16 -> 8
        )
        self.c4 = nn.Sequential(  # 8x8: dilation 2 widens the view to the whole image
            Residual(SeparableConv(w4, w4, dilation=2), SeparableConv(w4, w4, dilation=2)),
        )
        self.output = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w4, num_classes))
        self.min_size = 1 + sum(
            m.dilation[0] * (m.kernel_size[0] - 1) - 2 * m.padding[0] for m in self.modules() if isinstance(m, nn.Conv2d)
        )

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


@dataclass
class RFRow:
    """One layer of the receptive-field table, in the assignment's notation."""

    layer: str
    kernel: int
    dilation: int
    stride: int
    padding: int
    size_in: int
    size_out: int
    rf_in: int
    rf_out: int
    jump_in: int
    jump_out: int


def _traced_layers(model: nn.Module, input_size: tuple[int, int, int], kinds: tuple[type, ...]):
    """(name, module, input, output) for every module of `kinds`, in the order forward runs them."""
    names = {m: n for n, m in model.named_modules()}
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((names[m], m, i[0], o))) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return calls


def receptive_field(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> list[RFRow]:
    """The receptive-field table, derived layer by layer from the convolutions forward actually runs.

    rf_out = rf_in + (dilation * (kernel - 1)) * jump_in; jump_out = jump_in * stride. Residual
    branches are centred (same padding), so the deepest path sets the RF, which is this chain.
    The last row is the global average pool, whose kernel is the whole final map.
    """
    rows: list[RFRow] = []
    rf, jump = 1, 1
    for name, m, x, y in _traced_layers(model, input_size, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        if isinstance(m, nn.AdaptiveAvgPool2d):
            k, d, s, p = x.shape[-1], 1, 1, 0
        else:
            k, s, p = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride, m.padding))
            d = m.dilation if isinstance(m.dilation, int) else m.dilation[0]
        rf_out, jump_out = rf + d * (k - 1) * jump, jump * s
        rows.append(RFRow(name, k, d, s, p, x.shape[-1], y.shape[-1], rf, rf_out, jump, jump_out))
        rf, jump = rf_out, jump_out
    return rows


def total_receptive_field(model: nn.Module) -> int:
    """RF of one unit of the last spatial feature map (before GAP): the number the assignment asks > 44."""
    return [r for r in receptive_field(model) if r.layer and not r.layer.startswith("output")][-1].rf_out


def format_receptive_field(rows: list[RFRow]) -> str:
    """The RF table as aligned text, one layer per line, for the notebook and logs."""
    head = f"{'layer':<16}{'k':>3}{'d':>3}{'s':>3}{'p':>3}{'n_in':>6}{'n_out':>6}{'r_in':>6}{'r_out':>6}{'j_in':>6}{'j_out':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.layer:<16}{r.kernel:>3}{r.dilation:>3}{r.stride:>3}{r.padding:>3}{r.size_in:>6}{r.size_out:>6}"
            f"{r.rf_in:>6}{r.rf_out:>6}{r.jump_in:>6}{r.jump_out:>6}"
        )
    return "\n".join(lines)


def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> int:
    """Multiply-accumulates per image of every conv and linear layer (what the hardware pays)."""
    total = 0
    for _, m, x, y in _traced_layers(model, input_size, (nn.Conv2d, nn.Linear)):
        if isinstance(m, nn.Conv2d):
            total += y[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += m.in_features * m.out_features
    return total


def summary(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> None:
    """torchsummary's table on the model's own device (its default "cuda" fails for CPU models)."""
    device = next(model.parameters()).device
    # A copy, so the summary's forward pass leaves the real BatchNorm statistics untouched.
    torchsummary.summary(copy.deepcopy(model), input_size, device="cuda" if device.type == "cuda" else "cpu")
    print(f"Multiply-accumulates per image: {count_macs(model, input_size) / 1e6:.1f} M")
