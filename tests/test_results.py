"""Assignment rule 7, on the committed evidence: a full real run reached >= 85% with < 200k weights."""

import json
from pathlib import Path

import pytest
import torch

from helpers import backprop
from helpers.dataset import make_loaders
from helpers.device import precision_policy
from helpers.model import Net, count_parameters

RESULTS = Path(__file__).resolve().parents[1] / "Results"


@pytest.fixture(scope="module")
def metrics() -> dict:
    if not (RESULTS / "metrics.json").exists():
        pytest.fail("no Results/metrics.json: run S9.ipynb or `python3 train.py` on the full data and commit Results/")
    return json.loads((RESULTS / "metrics.json").read_text())


def test_committed_run_is_a_full_run_that_meets_the_assignment(metrics):
    assert not metrics["config"]["quick"], "Results/metrics.json is from a quick run: commit a full run"
    assert metrics["config"]["train_images"] == 50_000 and metrics["test_images"] == 10_000
    assert metrics["final_test_acc"] >= 85.0
    assert metrics["params"] == count_parameters(Net()) < 200_000


def test_committed_weights_reproduce_the_reported_accuracy_on_the_real_test_set(metrics, cifar_root):
    net = Net()
    net.load_state_dict(torch.load(RESULTS / "s9_net.pt", weights_only=True))
    _, test_loader = make_loaders(500, num_workers=0, train_size=500, root=cifar_root)  # the whole test split
    assert len(test_loader.dataset) == 10_000
    dtype = precision_policy(torch.device("cpu")).dtype
    _, accuracy = backprop.test(net, test_loader, dtype=dtype)  # the same evaluation fit reports
    print(f"committed weights: {accuracy:.2f}% on the 10,000 real test images")
    assert accuracy >= 85.0
    assert abs(accuracy - metrics["final_test_acc"]) < 0.3  # GPU vs CPU bf16 rounding moves a few images


def test_flip_tta_on_the_committed_weights_beats_the_plain_accuracy(metrics, cifar_root):
    net = Net()
    net.load_state_dict(torch.load(RESULTS / "s9_net.pt", weights_only=True))
    _, test_loader = make_loaders(500, num_workers=0, train_size=500, root=cifar_root)
    dtype = precision_policy(torch.device("cpu")).dtype
    plain, tta = (backprop.test(net, test_loader, dtype=dtype, tta=flip)[1] for flip in (False, True))
    print(f"committed weights: {plain:.2f}% plain, {tta:.2f}% with flip TTA")
    assert tta > plain
