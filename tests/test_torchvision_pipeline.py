"""S10 and S11 as most students build them: torchvision's CIFAR10 with ToTensor + Normalize, a plain shuffled
DataLoader and torchvision's ResNet18, through train and test, the LR range test and GradCAM, on the real data."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from torch.utils.data import DataLoader, Subset

from helpers import backprop as B
from helpers import dataset as ds
from helpers import utils
from helpers.lr_finder import lr_range_test

TRAIN_IMAGES, TEST_IMAGES = 2048, 512


@pytest.fixture(scope="module")
def splits(cifar_root):
    """torchvision's CIFAR10 as the course builds it: ToTensor + Normalize, float N x C x H x W batches."""
    transform = T.Compose([T.ToTensor(), T.Normalize(ds.CIFAR10_MEAN, ds.CIFAR10_STD)])
    train = torchvision.datasets.CIFAR10(str(cifar_root), train=True, download=True, transform=transform)
    test = torchvision.datasets.CIFAR10(str(cifar_root), train=False, download=True, transform=transform)
    return Subset(train, range(TRAIN_IMAGES)), Subset(test, range(TEST_IMAGES))


def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def test_train_and_test_run_torchvision_resnet18_from_a_plain_shuffled_dataloader(splits, tmp_path):
    train_loader = DataLoader(splits[0], batch_size=128, shuffle=True)
    test_loader = DataLoader(splits[1], batch_size=256)
    model = resnet18()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses, accuracies = [], []
    for _ in range(3):  # the course's loop, the functions copied unchanged
        losses.append(B.train(model, train_loader, sgd)[0])
        accuracies.append(B.test(model, test_loader)[1])
    print(f"train losses {losses}, test accuracy {accuracies}")
    assert losses[-1] < losses[0] and accuracies[-1] > 15  # chance: 10%
    _, tta_accuracy, predictions = B.test(model, test_loader, tta=True, predictions=True)
    assert predictions.shape == (TEST_IMAGES,) and 0 <= tta_accuracy <= 100


def test_lr_range_test_sweeps_resnet18_with_adam_on_torchvision_batches_and_restores_it(splits):
    loader = DataLoader(splits[0], batch_size=64, shuffle=True)
    model = resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    sweep = lr_range_test(model, loader, optimizer=adam, lrs=np.geomspace(1e-5, 1.0, 24))
    assert len(sweep.lrs) == len(sweep.losses) > 10 and sweep.lrs[0] == pytest.approx(1e-5)
    assert min(sweep.losses) < sweep.losses[0]  # it learned at some rate
    assert sweep.lrs[0] < sweep.steepest < sweep.lrs[-1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradcam_explains_resnet18_mistakes_and_leaves_the_model_as_it_was(splits, cifar_root, tmp_path):
    images = ds.load_cifar10(False, cifar_root).data[:TEST_IMAGES]  # uint8 pictures of the same test images
    test_loader = DataLoader(splits[1], batch_size=256)
    model = resnet18().to(torch.bfloat16)
    _, _, predictions = B.test(model, test_loader, dtype=torch.bfloat16, predictions=True)
    labels = torch.tensor([label for _, label in splits[1]])
    model.train()  # as a student might hold it mid-training: bf16 weights, train mode
    pictures = ds.ImageData(images, labels, images, labels, ds.CLASSES, ds.CIFAR10_MEAN, ds.CIFAR10_STD)  # for the plot
    fig = utils.plot_gradcam(
        model, pictures, predictions=predictions, layer=model.layer4[-1], count=4, path=tmp_path / "g.png"
    )
    assert sum(ax.get_title().startswith("said: ") for ax in fig.axes) == 4
    plt.close(fig)
    assert model.training and all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_gradcam_with_no_mistakes_says_so_instead_of_calling_grad_cam(cifar_root, monkeypatch, tmp_path):
    images = ds.load_cifar10(False, cifar_root).data[:8]
    labels = torch.arange(8) % 10
    with pytest.raises(ValueError, match="no images"):
        utils.gradcam(resnet18(), images[:0], targets=[], layer=None)
    monkeypatch.setattr(utils, "gradcam", lambda *a, **k: pytest.fail("grad-cam was handed an empty batch"))
    data = ds.ImageData(images, labels, images, labels, ds.CLASSES, ds.CIFAR10_MEAN, ds.CIFAR10_STD)
    fig = utils.plot_gradcam(resnet18(), data, predictions=labels, layer=None, path=tmp_path / "n.png")
    assert "no misclassified images among 8" in fig.axes[0].texts[0].get_text()
    plt.close(fig)


def test_uint8_images_handed_to_net_get_a_clear_error():
    from helpers.model import Net

    with pytest.raises(ValueError, match="normalized float.*got torch.uint8"):
        Net()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
