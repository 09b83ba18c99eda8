"""The LR range test keeps torch-lr-finder's contract: it trains the model with the optimizer instance it is
given, and afterwards both are exactly as before; it sweeps the training's loss, and a curve that never falls
or a non-finite first loss gets a clear message. torch-lr-finder itself runs on the kit's loaders too."""

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers.dataset import make_loaders
from helpers.lr_finder import LRRangeTest, lr_range_test
from helpers.model import Net

NARROW = (8, 8, 16, 16)  # a narrow Net: the contract, not the accuracy, is under test


@pytest.fixture(scope="module")
def loader(cifar):
    return make_loaders(cifar.subsample(train_images=1024, test_images=64), batch_size=64, seed=0, num_workers=0)[0]


def _sweep(loader, optimizer_for):
    torch.manual_seed(0)
    model = Net(NARROW)
    optimizer = optimizer_for(model)
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    sweep = lr_range_test(model, loader, optimizer, lrs=np.geomspace(1e-4, 1.0, 40))
    return sweep, model, optimizer, before


def test_an_adam_instance_is_trained_and_then_restored_bit_for_bit(loader):
    sweep, model, adam, (weights, adam_state) = _sweep(loader, lambda m: torch.optim.Adam(m.parameters()))
    assert min(sweep.losses) < sweep.losses[0] - 0.1, "the model learned during the test: the curve falls"
    assert all(torch.equal(a, b) for a, b in zip(weights.values(), model.state_dict().values()))
    assert adam.state_dict() == adam_state and adam.param_groups[0]["lr"] == 1e-3


def test_torch_lr_finder_runs_on_the_kits_loader_and_net(loader):
    from torch_lr_finder import LRFinder

    model = Net(NARROW)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    finder = LRFinder(model, optimizer, torch.nn.CrossEntropyLoss(), device="cpu")
    finder.range_test(loader, end_lr=1.0, num_iter=6)
    assert len(finder.history["lr"]) == 6 and all(0 < loss < 10 for loss in finder.history["loss"])
    finder.reset()


def test_a_loss_that_never_falls_has_no_steepest_descent_and_says_so():
    rising = LRRangeTest(lrs=[1e-3, 1e-2, 1e-1, 1.0], losses=[2.0, 2.1, 2.5, 4.0])
    assert rising.minimum == 1e-3
    with pytest.raises(ValueError, match="lowest at step 1 of 4.*never fell.*first of lrs"):
        _ = rising.steepest


def test_a_non_finite_first_loss_is_a_clear_error_not_an_empty_curve():
    nan_images = torch.full((8, 3, 32, 32), float("nan"))
    loader = DataLoader(TensorDataset(nan_images, torch.zeros(8, dtype=torch.long)), batch_size=4)
    model = Net(NARROW)
    with pytest.raises(ValueError, match="first loss, at lr 0.0001, was not finite: check the inputs for NaN"):
        lr_range_test(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), lrs=np.geomspace(1e-4, 10, 5))


def test_the_sweep_measures_the_training_loss_label_smoothing_included(loader):
    curves = {}
    for smoothing in (0.0, 0.1):
        torch.manual_seed(0)
        model = Net(NARROW)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        curves[smoothing] = lr_range_test(model, loader, sgd, label_smoothing=smoothing, lrs=[1e-4, 2e-4, 4e-4])
    # same weights, same first batch: the first point differs only by the loss the sweep computes
    assert curves[0.1].losses[0] != pytest.approx(curves[0.0].losses[0], abs=1e-4)
