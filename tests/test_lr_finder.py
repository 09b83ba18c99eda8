"""The LR range test keeps torch-lr-finder's contract: it trains the model with the optimizer instance it is
given, and afterwards both are exactly as before; a factory gives the same curve."""

import copy

import pytest
import torch

from helpers.backprop import seed_everything
from helpers.dataset import make_loaders
from helpers.lr_finder import lr_range_test
from helpers.model import Net

CPU = torch.device("cpu")
NARROW = (8, 8, 16, 16)  # a narrow Net: the contract, not the accuracy, is under test


@pytest.fixture(scope="module")
def loader(cifar_root):
    return make_loaders(64, seed=0, num_workers=0, train_size=1024, test_size=64, root=cifar_root)[0]


def _sweep(loader, optimizer_for):
    seed_everything(0)
    model = Net(NARROW)
    optimizer = optimizer_for(model)
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict(), torch.get_rng_state()))
    sweep = lr_range_test(model, loader, optimizer, start_lr=1e-4, end_lr=1.0, steps=40, device=CPU)
    return sweep, model, optimizer, before


def test_an_adam_instance_is_trained_and_then_restored_bit_for_bit(loader):
    sweep, model, adam, (weights, adam_state, rng) = _sweep(loader, lambda m: torch.optim.Adam(m.parameters()))
    assert min(sweep.losses) < sweep.losses[0] - 0.1, "the model learned during the test: the curve falls"
    assert all(torch.equal(a, b) for a, b in zip(weights.values(), model.state_dict().values()))
    assert adam.state_dict() == adam_state and adam.param_groups[0]["lr"] == 1e-3
    assert torch.equal(torch.get_rng_state(), rng)


def test_an_instance_gives_the_curve_a_factory_gives(loader):
    instance, *_ = _sweep(loader, lambda m: torch.optim.Adam(m.parameters()))
    seed_everything(0)
    factory = lr_range_test(
        Net(NARROW), loader, lambda m: torch.optim.Adam(m.parameters()), start_lr=1e-4, end_lr=1.0, steps=40, device=CPU
    )
    assert instance.losses == factory.losses and instance.lrs == factory.lrs
