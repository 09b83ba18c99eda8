"""What a CNN sees and costs: its layer table with receptive fields, multiply-accumulates and parameters, traced
through every tensor the forward pass makes (residual branches, concatenations, functional pooling), not a chain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode


@dataclass
class RFRow:
    """One convolution or pooling of the receptive-field table, in the assignment's notation."""

    layer: str
    op: str  # "conv2d", "max_pool2d", "adaptive_avg_pool2d", ...
    c_in: int
    c_out: int
    kernel: int
    dilation: int
    stride: int
    padding: int
    groups: int
    params: int  # the convolution's weights and bias; 0 for a pooling
    size_in: int
    size_out: int
    rf_in: int
    rf_out: int
    jump_in: int
    jump_out: int


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors inside an op's arguments (lists and tuples too: torch.cat takes a list)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _pair(value: Any) -> int:
    """First of an int-or-tuple geometry argument (the table assumes square kernels)."""
    return value if isinstance(value, int) else value[0]


def _conv_geometry(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: ANN001, ANN202
    pad = padding if isinstance(padding, str) else _pair(padding)
    params = weight.numel() + (bias.numel() if bias is not None else 0)
    return weight.shape[-1], _pair(dilation), _pair(stride), pad, groups, params


def _max_pool_geometry(input, kernel_size, stride=None, padding=0, dilation=1, *args, **kwargs):  # noqa: ANN001, ANN202
    return _pair(kernel_size), _pair(dilation), _pair(stride or kernel_size), _pair(padding), 1, 0


def _avg_pool_geometry(input, kernel_size, stride=None, padding=0, *args, **kwargs):  # noqa: ANN001, ANN202
    return _pair(kernel_size), 1, _pair(stride or kernel_size), _pair(padding), 1, 0


def _adaptive_pool_geometry(input, output_size, *args, **kwargs):  # noqa: ANN001, ANN202
    size_in, size_out = input.shape[-1], _pair(output_size) or input.shape[-1]
    return -(-size_in // size_out), 1, size_in // size_out, 0, 1, 0


_GEOMETRY = {
    "conv2d": _conv_geometry,
    "max_pool2d": _max_pool_geometry,
    "avg_pool2d": _avg_pool_geometry,
    "adaptive_avg_pool2d": _adaptive_pool_geometry,
    "adaptive_max_pool2d": _adaptive_pool_geometry,
}


class _ReceptiveFieldTracer(TorchFunctionMode):
    """Gives every tensor forward makes the (receptive field, jump) of its longest path: convolutions and poolings
    grow the field by dilation * (kernel - 1) * jump and multiply the jump by the stride; every other op (a residual
    add, concat, BatchNorm, ReLU) takes the largest field among its inputs."""

    def __init__(self, module_names: list[str]):
        super().__init__()
        self.fields: dict[int, tuple[int, int]] = {}
        self.keep: list[torch.Tensor] = []  # holds every traced tensor, so no id() is ever reused
        self.rows: list[RFRow] = []
        self.module_names = module_names  # the stack of modules now running (innermost last)
        self.last_map_rf = 0
        self.macs = 0  # multiply-accumulates of every convolution and linear layer forward runs

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "").lstrip("_")
        traced = [self.fields[id(t)] for t in _tensors(args) + _tensors(list(kwargs.values())) if id(t) in self.fields]
        rf, jump = max(traced, default=(1, 1))
        if name in ("conv2d", "linear"):  # weight: out x in/groups x kh x kw, or out x in
            self.macs += out.numel() * args[1][0].numel()
        if name in _GEOMETRY and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            x, y = args[0], out[0] if isinstance(out, tuple) else out
            kernel, dilation, stride, padding, groups, params = _GEOMETRY[name](*args, **kwargs)
            rf_in, jump_in = self.fields.get(id(x), (1, 1))
            rf, jump = rf_in + dilation * (kernel - 1) * jump_in, jump_in * stride
            geometry = (kernel, dilation, stride, padding, groups, params, x.shape[-1], y.shape[-1])
            self.rows.append(RFRow(self.layer(name), name, x.shape[1], y.shape[1], *geometry, rf_in, rf, jump_in, jump))
        if name == "linear":  # a row of the head after the last map: a 1x1 "kernel" on a 1x1 map
            (c_out, c_in), params = args[1].shape, sum(t.numel() for t in _tensors(args[1:]))
            self.rows.append(
                RFRow(self.layer(name), name, c_in, c_out, 1, 1, 1, 0, 1, params, 1, 1, rf, rf, jump, jump)
            )
        for t in _tensors(out):
            self.fields[id(t)] = (rf, jump)
            self.keep.append(t)
            if t.dim() == 4 and t.shape[-1] * t.shape[-2] > 1:
                self.last_map_rf = rf  # the last spatial feature map forward produces
        return out

    def layer(self, op: str) -> str:
        """The name of the module running now: the row's name in the table."""
        return self.module_names[-1] if self.module_names else f"F.{op}"


@dataclass
class Measures:
    """What one traced forward pass tells of a network."""

    rows: list[RFRow]  # every convolution and pooling that keeps a map (> 1x1), in the order forward runs them
    head: list[RFRow]  # what runs after the last map: global pooling, then linear or 1x1 layers
    receptive_field: int  # of one unit of the last spatial map, before GAP: the number the assignment asks > 44
    macs: int  # multiply-accumulates per image of every convolution and linear layer: what the hardware pays
    params: int  # every weight, frozen ones included: the number the assignment caps at 200,000


def measure(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> Measures:
    """Trace one forward pass, naming each row by the module that ran it; a pooling down to 1x1 (global average
    pooling) sees the whole map and gets no row."""
    stack: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda m, i, name=name: stack.append(name)))
        hooks.append(m.register_forward_hook(lambda m, i, o: None if stack.pop() else None))  # None: keep the output
    tracer = _ReceptiveFieldTracer(stack)
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad(), tracer:
            model(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    last_map = max((i for i, row in enumerate(tracer.rows) if row.size_out > 1), default=-1)
    rows = [row for row in tracer.rows if row.size_out > 1]
    return Measures(rows, tracer.rows[last_map + 1 :], tracer.last_map_rf, tracer.macs, count_parameters(model))


def count_parameters(model: nn.Module) -> int:
    """Every weight, frozen ones included: the number the assignment caps at 200,000."""
    return sum(p.numel() for p in model.parameters())


def layer_table(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> str:
    """The network on one screen: a line per convolution (channels, kernel, dilation, groups > 1: depthwise, stride,
    padding, map in -> out, receptive field and jump in -> out, weights), then its receptive field, parameters and
    cost."""
    m = measure(model, input_size)
    head = f"{'layer':<14}{'channels':>10}{'k':>3}{'d':>3}{'g':>5}{'s':>3}{'p':>3}"
    head += f"{'map':>9}{'rf':>9}{'jump':>7}{'params':>9}"
    lines = [head, "-" * len(head)]
    for r in m.rows:
        lines.append(
            f"{r.layer:<14}{f'{r.c_in}->{r.c_out}':>10}{r.kernel:>3}{r.dilation:>3}{r.groups:>5}{r.stride:>3}"
            f"{r.padding:>3}{f'{r.size_in}->{r.size_out}':>9}{f'{r.rf_in}->{r.rf_out}':>9}"
            f"{f'{r.jump_in}->{r.jump_out}':>7}{r.params:>9,}"
        )
    growth = [r.rf_out - r.rf_in for r in m.rows if r.rf_out > r.rf_in]
    if 1 + sum(growth) == m.receptive_field:  # one path through every row: the field is the sum of its steps
        lines.append("receptive field: 1 + " + " + ".join(map(str, growth)) + f" = {m.receptive_field} pixels")
    else:  # parallel branches: the field is the longest path's
        lines.append(f"receptive field of the last feature map: {m.receptive_field} pixels")
    lines.append(f"parameters: {m.params:,} (BatchNorm's and frozen ones included)")
    lines.append(f"multiply-accumulates per image: {m.macs / 1e6:.1f} M")
    return "\n".join(lines)


MAX_PARAMETERS, MIN_RECEPTIVE_FIELD = 200_000, 44  # the S9 assignment's limits: < 200,000 and > 44


@dataclass
class Rule:
    """One rule of the S9 assignment, its value read off the traced network, and whether the network keeps it."""

    rule: str
    value: str
    passed: bool


def s9_rules(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> list[Rule]:
    """The assignment's architecture rules, each checked on one traced forward pass of `model`."""
    m = measure(model, input_size)
    convs = [r for r in m.rows if r.op == "conv2d"]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    shrinking = [r for r in m.rows if "max" in r.op or r.stride > 1] + [r for r in m.head if "max" in r.op]
    pooled = [f"{r.layer} ({r.op}, stride {r.stride})" for r in shrinking]  # a global average pool is not one
    depthwise = [
        a.layer for a, b in zip(convs, convs[1:]) if a.groups == a.c_in > 1 and b.kernel == 1 and b.c_in == a.c_out
    ]
    dilated = [f"{r.layer} d={r.dilation}" for r in convs if r.dilation > 1]
    pool, *layers = m.head or [None]
    gap = pool is not None and pool.op in ("adaptive_avg_pool2d", "avg_pool2d") and pool.size_out == 1 and layers
    head = [
        f"{r.op} "
        + (f"{r.size_in}x{r.size_in} -> 1x1" if "pool" in r.op else f"{r.c_in} -> {r.c_out}")
        + f" ({r.layer})"
        for r in m.head
    ]
    return [
        Rule(
            f"parameters < {MAX_PARAMETERS:,}, frozen ones counted",
            f"{m.params:,} ({frozen:,} frozen)",
            m.params < MAX_PARAMETERS,
        ),
        Rule(
            f"receptive field > {MIN_RECEPTIVE_FIELD}", str(m.receptive_field), m.receptive_field > MIN_RECEPTIVE_FIELD
        ),
        Rule("no MaxPooling, no stride > 1 (the bonus)", ", ".join(pooled) or "every stride is 1", not pooled),
        Rule(
            "a depthwise-separable convolution",
            f"{len(depthwise)} depthwise, each then a 1x1: " + ", ".join(depthwise) if depthwise else "none",
            bool(depthwise),
        ),
        Rule("a dilated convolution", f"{len(dilated)}: " + ", ".join(dilated) if dilated else "none", bool(dilated)),
        Rule("global average pooling, then a layer to the classes", ", then ".join(head) or "none", bool(gap)),
    ]


def rules_report(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> str:
    """The assignment's rules under the layer table, one line each: pass or FAIL, the rule, its value here."""
    rules = s9_rules(model, input_size)
    width = max(len(r.rule) for r in rules)
    return "\n".join(f"{'pass' if r.passed else 'FAIL'}  {r.rule:<{width}}  {r.value}" for r in rules)
