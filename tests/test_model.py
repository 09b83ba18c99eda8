"""The assignment's architecture rules, each checked on the shipped Net itself."""

import re

import pytest
import torch
import torch.nn as nn

from helpers import measure as RF
from helpers import model as M
from helpers.dataset import normalize
from helpers.recipe import RECIPE


def _convs(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def test_blocks_are_c1_c2_c3_c4_then_output():
    assert [name for name, _ in M.Net().named_children()] == ["c1", "c2", "c3", "c4", "output"]


def test_no_pooling_but_global_average_and_no_stride_anywhere():
    net = M.Net()
    pools = [m for m in net.modules() if "Pool" in type(m).__name__]
    assert len(pools) == 1 and isinstance(pools[0], nn.AdaptiveAvgPool2d) and pools[0].output_size in (1, (1, 1))
    assert all(conv.stride == (1, 1) for conv in _convs(net))


def test_blocks_shrink_the_map_with_dilated_kernels():
    shrinking = [c for c in _convs(M.Net()) if c.padding == (0, 0) and c.kernel_size == (3, 3)]
    assert len(shrinking) == 3 and all(c.dilation[0] > 1 for c in shrinking)
    sizes = [row.size_out for row in RF.measure(M.Net()).rows if row.layer.endswith(("c1.4.0", "c2.1.0", "c3.1.0"))]
    assert sizes == [23, 15, 7]  # after the whitening's 2x2 (32 -> 31), each takes 8 pixels off


def test_has_a_depthwise_conv_feeding_a_pointwise_conv():
    net = M.Net()
    outputs, pairs = {}, []

    def hook(module, inputs, output):
        if module.kernel_size == (1, 1) and id(inputs[0]) in outputs:
            pairs.append((outputs[id(inputs[0])], module))
        outputs[id(output)] = module

    handles = [c.register_forward_hook(hook) for c in _convs(net)]
    net.eval()(torch.randn(1, 3, 32, 32))
    for h in handles:
        h.remove()
    separable = [(dw, pw) for dw, pw in pairs if dw.groups == dw.in_channels == dw.out_channels > 1]
    assert separable, "no depthwise conv (groups = in_channels) whose output feeds a 1x1 conv"
    assert all(pw.in_channels == dw.out_channels for dw, pw in separable)


def test_global_average_pool_then_a_layer_to_ten_classes():
    output = M.Net().output
    assert isinstance(output[0], nn.AdaptiveAvgPool2d)
    last = [m for m in output.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    assert (last.out_features if isinstance(last, nn.Linear) else last.out_channels) == 10
    assert M.Net()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_under_200k_parameters():
    net = M.Net()
    params = RF.count_parameters(net)
    print(f"Net has {params:,} parameters")
    assert params < 200_000
    frozen = [p for p in net.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) == 288  # the whitening's 24 x 3 x 2 x 2, counted toward the cap
    assert params == sum(p.numel() for p in net.parameters())


def test_whitening_decorrelates_patches_of_images_it_did_not_see_and_never_trains(cifar):
    net = M.Net().fit_whitening(cifar)
    whitening = net.c1[0]
    unseen = normalize(torch.from_numpy(cifar.test_images[:2000]), cifar.mean, cifar.std)
    outputs = whitening(unseen)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    covariance = outputs.T @ outputs / len(outputs)
    assert (covariance - torch.diag(torch.diag(covariance))).abs().max() < 0.05  # the 12 directions: uncorrelated
    assert torch.diag(covariance)[4:].sub(1).abs().max() < 0.1  # unit variance but where eps damps the smallest
    optimizer = RECIPE.optimizer(net)
    assert all(p is not whitening.weight for group in optimizer.param_groups for p in group["params"])


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 32, 32, 3), (2, 3, 25, 25)])
def test_wrong_input_gets_a_clear_error(shape):
    with pytest.raises(
        ValueError,
        match=re.escape(f"N x 3 x H x W with H, W >= 26 (CIFAR-10: N x 3 x 32 x 32), got torch.float32 {shape}"),
    ):
        M.Net()(torch.randn(*shape))


def test_receptive_field_formula_on_a_known_stack():
    toy = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, dilation=2), nn.Conv2d(4, 4, 3, stride=2), nn.Conv2d(4, 4, 3)
    )
    rows = RF.measure(toy, (3, 32, 32)).rows
    assert [r.rf_out for r in rows] == [3, 7, 9, 13]  # +2, +4, +2, then +2 x jump 2
    assert [r.jump_out for r in rows] == [1, 1, 2, 2]
    assert [r.size_out for r in rows] == [30, 26, 12, 10]


def test_receptive_field_table_follows_forward_order_and_exceeds_44():
    net = M.Net()
    rows = RF.measure(net).rows
    conv_names = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert [r.layer for r in rows] == conv_names  # no row for the global average pool: it sees the whole map
    assert rows[-1].rf_out == RF.measure(net).receptive_field > 44
    table = RF.layer_table(net).splitlines()
    assert len(table) == 2 + len(rows) + 3  # head and rule, a line per row, field, parameters, cost
    steps = table[2 + len(rows)].split("=")[0].split(":")[1].split("+")  # "receptive field: 1 + 1 + 2 ... = 48 pixels"
    assert sum(int(step) for step in steps) == RF.measure(net).receptive_field


def test_gradient_of_one_central_unit_covers_exactly_the_computed_receptive_field():
    torch.manual_seed(0)
    net = M.Net().eval()
    rf = RF.measure(net).receptive_field
    grad = torch.zeros(128, 128)
    for _ in range(4):  # several random inputs, so ReLU zeros cannot hide a pixel
        x = torch.randn(1, 3, 128, 128, requires_grad=True)
        features = net.c4(net.c3(net.c2(net.c1(x))))
        centre = features.shape[-1] // 2
        features[0, :, centre, centre].sum().backward()
        grad += x.grad[0].abs().sum(0)
    rows, cols = torch.nonzero(grad).unbind(1)
    assert rows.max() - rows.min() + 1 == rf and cols.max() - cols.min() + 1 == rf
    square = grad[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert (square > 0).all(), "holes inside the receptive field"


def test_macs_counter_matches_hand_count():
    toy = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.Linear(8 * 32 * 32, 10)
    )
    expected = 32 * 32 * 8 * 3 * 9 + 32 * 32 * 8 * 1 * 9 + 8 * 32 * 32 * 10
    assert RF.measure(toy).macs == expected


SMALL = (16, 24, 48, 64)  # widths that leave room under 200k for a dense or undilated edit


def _replace(net: nn.Module, kind: type, make) -> nn.Module:
    """Every submodule of `kind` replaced by make(submodule)."""
    for name, module in [(n, m) for n, m in net.named_modules() if type(m) is kind]:
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent), child, make(module))
    return net


def _dense(net: nn.Module) -> nn.Module:
    """Each depthwise-separable convolution as a dense 3x3 of the same geometry."""
    return _replace(
        net,
        M.SeparableConv,
        lambda s: M.ConvBNReLU(s[0].in_channels, s[1].out_channels, *s[0].dilation[:1], s[0].padding[0]),
    )


def _undilated(net: nn.Module) -> nn.Module:
    """Each dilated kernel as an undilated one of the same span: the same maps and receptive field, no dilation."""

    def make(c: nn.Conv2d) -> nn.Module:
        if c.dilation[0] == 1:
            return c
        span = c.dilation[0] * (c.kernel_size[0] - 1) + 1
        return nn.Conv2d(c.in_channels, c.out_channels, span, padding=c.padding[0], groups=c.groups, bias=False)

    return _replace(net, nn.Conv2d, make)


def _max_pooled_c3(net: nn.Module) -> nn.Module:
    """C3 shrinks by a 3x3 and a 2x2 max pool (15 -> 7) instead of its dilated kernel."""
    net.c3[1] = nn.Sequential(M.SeparableConv(96, 128), nn.MaxPool2d(2))
    return net


def _undilated_c4(net: nn.Module) -> nn.Module:
    net.c4[0] = M.Residual(M.SeparableConv(128, 128), M.SeparableConv(128, 128))
    return net


def _flattened_head(net: nn.Module) -> nn.Module:
    net.output = nn.Sequential(nn.Flatten(), nn.Linear(SMALL[3] * 7 * 7, 10))
    return net


def test_the_shipped_network_keeps_every_rule():
    rules = RF.s9_rules(M.Net())
    assert all(r.passed for r in rules) and len(rules) == 6
    assert rules[0].value.startswith("193,898 (288 frozen)") and rules[1].value == "48"


@pytest.mark.parametrize(
    "edit, broken",
    [
        (lambda: M.Net((40, 48, 96, 128)), 0),  # 209,498 parameters
        (lambda: _undilated_c4(M.Net()), 1),  # receptive field 44
        (lambda: _max_pooled_c3(M.Net()), 2),
        (lambda: _dense(M.Net(SMALL)), 3),
        (lambda: _undilated(M.Net(SMALL)), 4),
        (lambda: _flattened_head(M.Net(SMALL)), 5),
    ],
)
def test_a_network_that_breaks_one_rule_fails_exactly_that_rule(edit, broken):
    rules = RF.s9_rules(edit())
    assert [r.passed for r in rules] == [i != broken for i in range(len(rules))], RF.rules_report(edit())
    assert "FAIL  " + rules[broken].rule in RF.rules_report(edit())
