"""The kit for the assignments after S9, through the public API only (no monkeypatching):
S10's custom ResNet with Adam + OneCycleLR at the LR-range-test peak and S10's augmentations,
ResNet18 with a GradCAM gallery, another dataset (100 classes, 40 x 40), and receptive fields of
residual networks checked against gradients."""

import albumentations as A
import cv2
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import backprop as B
from helpers import dataset as ds
from helpers import measure as RF
from helpers import model as M
from helpers import utils
from helpers.lr_finder import lr_range_test


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)] + ([nn.MaxPool2d(2)] if pool else [])
    return nn.Sequential(*layers, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class CustomResNet(nn.Module):
    """S10's network: prep, layer1 (conv-pool + residual), layer2 (conv-pool), layer3 (conv-pool + residual), pool."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.prep = conv_bn(3, w)
        self.layer1, self.res1 = (
            conv_bn(w, 2 * w, pool=True),
            nn.Sequential(conv_bn(2 * w, 2 * w), conv_bn(2 * w, 2 * w)),
        )
        self.layer2 = conv_bn(2 * w, 4 * w, pool=True)
        self.layer3, self.res3 = (
            conv_bn(4 * w, 8 * w, pool=True),
            nn.Sequential(conv_bn(8 * w, 8 * w), conv_bn(8 * w, 8 * w)),
        )
        self.pool, self.fc = nn.MaxPool2d(4), nn.Linear(8 * w, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.prep(x))
        x = self.layer3(self.layer2(x + self.res1(x)))
        return x + self.res3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # the 1x1 stride-2 shortcut conv the old RF code chained
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 adapted to CIFAR (3x3 stem, no max pool), as in kuangliu/pytorch-cifar, narrowed for speed."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        widths, c_in, layers = [width, 2 * width, 4 * width, 8 * width], width, []
        for i, w in enumerate(widths):
            layers.append(nn.Sequential(BasicBlock(c_in, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            c_in = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(c_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.avg_pool2d(self.features(x), 4).flatten(1))


def s10_augmentations() -> list[A.BasicTransform]:
    return [
        A.PadIfNeeded(40, 40, border_mode=cv2.BORDER_CONSTANT, fill=ds.MEAN_PIXEL),
        A.RandomCrop(32, 32),
        A.HorizontalFlip(),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(8, 8), hole_width_range=(8, 8), fill=ds.MEAN_PIXEL),
    ]


def test_s10_custom_resnet_with_adam_and_one_cycle_at_the_range_test_peak(cifar):
    train_loader, test_loader = ds.make_loaders(
        cifar.subsample(train_images=256, test_images=64),
        batch_size=64,
        augment=s10_augmentations(),
        seed=0,
        num_workers=0,
    )
    assert [type(t).__name__ for t in train_loader.dataset.transform.transforms] == [
        "PadIfNeeded",
        "RandomCrop",
        "HorizontalFlip",
        "CoarseDropout",
    ]
    torch.manual_seed(0)
    model = CustomResNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adam = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)  # what S10 students write
    sweep = lr_range_test(model, train_loader, adam, lrs=np.geomspace(1e-5, 1.0, 16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the range test restores the model"
    assert len(sweep.lrs) == len(sweep.losses) > 5 and sweep.lrs == sorted(sweep.lrs)
    peak = sweep.steepest
    assert sweep.lrs[0] < peak < sweep.lrs[-1]

    one_cycle = torch.optim.lr_scheduler.OneCycleLR(
        adam, max_lr=peak, total_steps=2 * len(train_loader), pct_start=0.2, div_factor=10, anneal_strategy="linear"
    )
    lrs = []
    for _ in range(2):  # the course's loop: train, then test, each epoch
        lrs.append(adam.param_groups[0]["lr"])
        B.train(model, train_loader, adam, scheduler=one_cycle)
        loss, _, predictions = B.test(model, test_loader, predictions=True)
    # OneCycleLR drove Adam: from peak/10, up to the peak by step 2 of 8, then down
    assert lrs[0] == pytest.approx(peak / 10) and peak / 10 < lrs[1] < peak
    assert predictions.shape == (64,) and np.isfinite(loss)


def test_train_runs_without_a_scheduler_and_without_label_smoothing_by_default(cifar):
    loader, _ = ds.make_loaders(cifar.subsample(train_images=64, test_images=64), batch_size=64, seed=0, num_workers=0)
    torch.manual_seed(0)
    model = CustomResNet()
    loss, _ = B.train(model, loader, torch.optim.SGD(model.parameters(), lr=0.0))  # lr 0: weights stay
    images, labels = next(iter(loader))  # the same (seed, epoch): the same batch
    with torch.no_grad():
        logits = model.train()(images)
    assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)
    assert loss != pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-4)


def test_resnet18_gradcam_gallery_on_misclassified_images_even_after_bf16_prediction(cifar, tmp_path):
    small = cifar.subsample(train_images=64, test_images=16)
    _, test_loader = ds.make_loaders(small, batch_size=16, seed=0, num_workers=0)
    torch.manual_seed(0)
    model = ResNet18()
    _, _, predictions = B.test(model, test_loader, dtype=torch.bfloat16, predictions=True)  # as on bf16 hardware
    labels = test_loader.dataset.labels
    wrong = utils.misclassified(labels, predictions, 4)
    assert len(wrong) == 4  # an untrained network is wrong on most images
    images = test_loader.dataset.images
    heatmaps = utils.gradcam(model, images[wrong], targets=predictions[wrong].tolist(), layer=model.layer4[-1])
    assert heatmaps.shape == (4, 32, 32) and heatmaps.min() >= 0 and heatmaps.max() <= 1 and heatmaps.max() > 0
    fig = utils.plot_gradcam(
        model, small, predictions=predictions, layer=model.layer4[-1], count=4, path=tmp_path / "cam.png"
    )
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 8 and sum(t.startswith("said: ") for t in titles) == 4
    assert (tmp_path / "cam.png").stat().st_size > 10_000
    plt.close(fig)


def test_gradcam_of_a_class_the_model_does_not_have_fails_with_a_clear_message(cifar_root):
    images = ds.load_cifar10(False, cifar_root).data[:2]
    model = M.Net()
    with pytest.raises(ValueError, match="one of the model's output classes"):
        utils.gradcam(model, images, targets=[3, 10], layer=model.c4)  # grad-cam would swallow the IndexError


def test_a_100_class_40x40_array_dataset_through_loaders_fit_confusion_matrix_and_plots(tmp_path):
    rng = np.random.default_rng(0)
    classes = tuple(f"class {i}" for i in range(100))
    data = ds.ImageData(
        rng.integers(0, 256, (300, 40, 40, 3), dtype=np.uint8),
        rng.integers(0, 100, 300),
        rng.integers(0, 256, (100, 40, 40, 3), dtype=np.uint8),
        rng.integers(0, 100, 100),
        classes,
    )
    assert data.mean == pytest.approx((0.5, 0.5, 0.5), abs=0.01)  # computed from the train images
    train_loader, test_loader = ds.make_loaders(data, batch_size=100, seed=0, num_workers=0)
    images, _ = next(iter(train_loader))
    assert images.shape == (100, 3, 40, 40) and train_loader.dataset.classes == classes
    model = M.Net(num_classes=100)
    train_loss, train_acc = B.train(model, train_loader, torch.optim.Adam(model.parameters()))
    test_loss, test_acc, predictions = B.test(model, test_loader, predictions=True)
    history = [
        {"epoch": 1, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc}
    ]
    labels = test_loader.dataset.labels
    matrix = utils.confusion_matrix(labels, predictions, classes=classes)
    assert matrix.shape == (100, 100) and matrix.sum() == 100
    texts = []
    for fig in (
        utils.plot_augmentations(data, [A.HorizontalFlip(p=0.5)], count=2, draws=2),
        utils.plot_history(history),
        utils.plot_gradcam(model, data, predictions=predictions, layer=model.c4, count=2),
        utils.plot_confusion_matrix(labels, predictions, classes=classes),
    ):
        texts += [t.get_text() for t in fig.findobj(plt.Text)]
        plt.close(fig)
    assert not [t for t in texts if "CIFAR" in t or "85%" in t or "assignment" in t or "smoothed" in t], (
        "a plot speaks of S9's run"
    )
    with pytest.raises(ValueError, match="only 10 class names"):
        utils.confusion_matrix(labels, predictions, classes=ds.CLASSES)


def test_grayscale_arrays_are_loaded_and_normalized_with_their_own_statistics():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    data = ds.ImageData(images, rng.integers(0, 10, 64), images[:16], rng.integers(0, 10, 16), tuple("0123456789"))
    train_loader, _ = ds.make_loaders(data, batch_size=32, augment=[A.HorizontalFlip()], seed=0, num_workers=0)
    x, _ = next(iter(train_loader))
    assert x.shape == (32, 1, 28, 28) and abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1


def _gradient_support(features, size: int) -> int:
    """Width of the input region that one central unit of the last feature map depends on."""
    grad = torch.zeros(size, size)
    for seed in range(3):  # several random inputs, so ReLU zeros cannot hide a pixel
        torch.manual_seed(seed)
        x = torch.randn(1, 3, size, size, requires_grad=True)
        out = features(x)
        out[0, :, out.shape[-2] // 2, out.shape[-1] // 2].sum().backward()
        grad += x.grad[0].abs().sum(0)
    rows, cols = torch.nonzero(grad).unbind(1)
    assert rows.max() - rows.min() == cols.max() - cols.min()
    return int(rows.max() - rows.min() + 1)


def _max_to_avg_pool(model: nn.Module) -> nn.Module:
    """Same geometry, dense gradients: a max pool's gradient reaches only the maxima, hiding the field."""
    for name, child in model.named_children():
        if isinstance(child, nn.MaxPool2d):
            setattr(model, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
        else:
            _max_to_avg_pool(child)
    return model


@pytest.mark.parametrize("make, expected, size", [(ResNet18, 109, 192), (CustomResNet, 64, 128)])
def test_receptive_field_of_residual_networks_matches_the_gradient(make, expected, size):
    model = make().eval()
    assert RF.measure(model).receptive_field == expected  # by hand: see the comments in receptive_field's tests
    assert _gradient_support(_max_to_avg_pool(model).features, size) == expected
    rows = RF.measure(model).rows
    assert all(r.rf_out >= r.rf_in for r in rows) and rows[-1].rf_out == expected  # the table ends at the last map


def test_receptive_field_handles_average_pooling_and_shortcut_convs():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
    assert [r.rf_out for r in RF.measure(net).rows] == [3, 4, 8] and RF.measure(net).receptive_field == 8
    block = BasicBlock(4, 8, stride=2)
    rows = RF.measure(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), block)).rows
    shortcut = next(r for r in rows if r.layer == "1.shortcut.0")
    assert (shortcut.rf_in, shortcut.rf_out, shortcut.jump_out) == (3, 3, 2)  # from the block input, not chained
