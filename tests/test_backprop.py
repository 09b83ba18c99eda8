"""Training: it learns, it resumes bit for bit, it never looks at the test set, checkpoints are safe, flip TTA."""

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import train as script
from helpers import backprop as B
from helpers import checkpoint as C
from helpers.dataset import make_loaders, normalize
from helpers.device import Precision
from helpers.lr_finder import LRRangeTest
from helpers.model import Net
from helpers.recipe import RECIPE


@pytest.fixture(scope="module")
def data(cifar):
    return cifar.subsample(train_images=256, test_images=128)


FP32 = Precision(torch.device("cpu"), None, "the tests' exact arithmetic", "CPU")


def _loaders(data, batch_size=64):
    return make_loaders(data, batch_size=batch_size, augment=RECIPE.augmentations(data.mean), seed=0, num_workers=0)


def _run(data, epochs=3, checkpoint=None, recipe=RECIPE, model=None, test_data=None):
    """train.py's epoch loop on `data` (scored on `test_data`, default its own test split); returns (model, history)."""
    torch.manual_seed(0)
    recipe = replace(recipe, epochs=epochs)
    model = model or Net(recipe.widths)
    train_loader, test_loader = _loaders(data)
    if test_data is not None:
        test_loader = _loaders(test_data)[1]
    config = recipe.run_config(data)
    history = script.train_epochs(
        model, recipe, train_loader, test_loader, precision=FP32, checkpoint=checkpoint, config=config
    )
    return model, history


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _strip(history):
    return [{k: v for k, v in h.items() if "seconds" not in k} for h in history]


def test_the_recipes_schedule_warms_up_to_the_peak_then_decays_to_zero():
    optimizer = RECIPE.optimizer(Net())
    schedule = RECIPE.schedule(optimizer, steps_per_epoch=100 // RECIPE.epochs + 1)
    lrs = []
    for _ in range(schedule.total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    peak = lrs.index(max(lrs))
    assert lrs[0] == pytest.approx(0.02) and max(lrs) == pytest.approx(0.2)
    assert peak == pytest.approx(RECIPE.warmup_fraction * len(lrs), abs=1.5)
    assert lrs[-1] < 1e-3 and all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))


def test_weight_decay_skips_batchnorm_and_biases_and_the_frozen_whitening():
    net = Net()
    decay, no_decay = RECIPE.optimizer(net).param_groups
    assert decay["weight_decay"] > 0 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0 and all(p.ndim == 1 for p in no_decay["params"])
    assert not any(p is net.c1[0].weight for p in decay["params"])


def test_training_lowers_the_loss_and_records_every_field(data):
    _, history = _run(data, epochs=4, recipe=replace(RECIPE, max_lr=0.05))  # a peak 16 steps on 256 images take
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert set(history[0]) == {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc"} | {
        "train_seconds",
        "seconds",
        "machine",
    }
    assert history[0]["machine"] == FP32.machine


def test_the_test_set_never_changes_training(data, cifar):
    a, _ = _run(data, epochs=2)
    b, _ = _run(data, epochs=2, test_data=cifar.subsample(train_images=256, test_images=64, seed=9))
    assert _same_weights(a, b)


def test_a_killed_and_resumed_run_matches_an_uninterrupted_one_bit_for_bit(data, tmp_path, killed_in_epoch):
    straight, straight_history = _run(data, epochs=3)
    undo = killed_in_epoch(script, 3)
    with pytest.raises(KeyboardInterrupt):
        _run(data, epochs=3, checkpoint=tmp_path / "run.pt")
    undo()
    torch.manual_seed(123)  # a fresh process starts from other RNG states: nothing in training may depend on them
    resumed, resumed_history = _run(data, epochs=3, checkpoint=tmp_path / "run.pt")
    assert _same_weights(straight, resumed) and _strip(resumed_history) == _strip(straight_history)


def test_a_resumed_run_prints_every_epoch_once_in_order_restored_ones_marked(data, tmp_path, killed_in_epoch, capsys):
    undo = killed_in_epoch(script, 3)
    with pytest.raises(KeyboardInterrupt):
        _run(data, epochs=4, checkpoint=tmp_path / "run.pt")
    undo()
    capsys.readouterr()
    _, history = _run(data, epochs=4, checkpoint=tmp_path / "run.pt")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert [line.endswith("(restored)") for line in lines] == [True, True, False, False]
    assert "after epoch 2" in out and [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert "min left" in lines[2] and "min left" not in lines[3]  # the last epoch has none left


def test_saving_never_leaves_a_half_written_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    C.write_atomically(path, lambda tmp: torch.save({"value": 1}, tmp))

    def crash(obj, f, *args, **kwargs):
        open(f, "wb").write(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        C.save_checkpoint(path, model=Net(), config={}, history=[])
    assert torch.load(path, weights_only=True)["value"] == 1


def test_a_model_with_nan_weights_is_never_saved(tmp_path):
    net = Net()
    with torch.no_grad():
        net.c4[0].f[0][2].running_var[3] = float("nan")  # a BatchNorm statistic, not only a weight
    with pytest.raises(C.CheckpointError, match="1 tensors hold NaN/inf \\(first: c4.0.f.0.2.running_var\\)"):
        C.save_checkpoint(tmp_path / "run.pt", model=net, config={}, history=[])
    assert not (tmp_path / "run.pt").exists()


def test_corrupt_checkpoint_gets_a_clear_error(data, tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(C.CheckpointError, match="not a readable checkpoint.*another path"):
        _run(data, epochs=2, checkpoint=path)


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(data, cifar, tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    _run(data, epochs=2, checkpoint=path)
    monkeypatch.setattr(script, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(
        C.CheckpointError, match=r"2 finished epochs of another run; it differs in\n  epochs: 2 then, 3 now"
    ):
        _run(data, epochs=3, checkpoint=path)
    with pytest.raises(C.CheckpointError, match=r"in\n  coarse_dropout_p: 0.5 then, 0.25 now\n  weight_decay: "):
        _run(data, epochs=2, checkpoint=path, recipe=replace(RECIPE, coarse_dropout_p=0.25, weight_decay=1e-3))
    with pytest.raises(C.CheckpointError, match=r"in\n  train_images: 256 then, 192 now\n[^ ]"):
        _run(cifar.subsample(train_images=192, test_images=128), epochs=2, checkpoint=path)
    with pytest.raises(C.CheckpointError, match=r"network: Net: 193,898 parameters .* then, Net: 74,890 parameters"):
        _run(data, epochs=2, checkpoint=path, recipe=replace(RECIPE, widths=(16, 32, 64, 64)))


def test_a_cpu_runs_checkpoint_resumes_on_a_t4_with_a_fresh_grad_scaler(tmp_path):
    net, path = Net((8, 8, 16, 16)), tmp_path / "run.pt"
    config = {"run": 1}
    C.save_checkpoint(path, model=net, config=config, history=[{"epoch": 1}], scaler=None)  # bf16 or fp32: none
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert C.load_checkpoint(path, config=config, model=Net((8, 8, 16, 16)), scaler=scaler) == [{"epoch": 1}]
    assert scaler.get_scale() == 1024.0


def test_lr_range_suggestion_ignores_the_dip_after_divergence():
    # Shaped like the real curve on Net: a descent centred at 0.03, lowest near 0.17, a blow-up, then a fake dip.
    lrs = np.geomspace(1e-4, 10, 100)
    falling = 2.35 - 0.5 / (1 + np.exp(-3 * (np.log10(lrs) + 1.5)))
    losses = np.where(lrs > 1, 3.0 - 0.5 * np.log10(lrs), falling + 2 * np.maximum(0, np.log10(lrs / 0.17)))
    sweep = LRRangeTest(list(lrs), list(losses))
    assert sweep.steepest == pytest.approx(0.03, rel=0.15) and sweep.minimum == pytest.approx(0.17, rel=0.1)


@pytest.fixture(scope="module")
def trained(data):
    return _run(data, epochs=2)[0].eval()


def test_flip_tta_averages_the_softmax_of_each_image_and_its_mirror(data, trained):
    test_loader = _loaders(data)[1]
    loss, accuracy, predictions = B.test(trained, test_loader, tta=True, predictions=True)
    images = normalize(torch.from_numpy(test_loader.dataset.images), data.mean, data.std)
    with torch.no_grad():
        expected = (trained(images).softmax(1) + trained(images.flip(3)).softmax(1)) / 2
    labels = test_loader.dataset.labels
    assert torch.equal(predictions, expected.argmax(1))
    assert loss == pytest.approx(F.nll_loss(expected.log(), labels).item(), abs=1e-5)
    assert accuracy == pytest.approx(100 * (expected.argmax(1) == labels).float().mean().item())
    assert B.test(trained, test_loader) != (loss, accuracy)  # a different evaluation, reported beside


def test_test_gives_the_same_answers_at_any_batch_size(data, trained):
    one = B.test(trained, _loaders(data, batch_size=128)[1], predictions=True)
    many = B.test(trained, _loaders(data, batch_size=24)[1], predictions=True)  # 128 = 5 x 24 + 8: a partial batch
    assert one[0] == pytest.approx(many[0], abs=1e-5) and one[1] == many[1] and torch.equal(one[2], many[2])


def test_train_averages_the_loss_over_images_when_the_last_batch_is_partial():
    torch.manual_seed(0)
    x, y = torch.randn(100, 3, 32, 32), torch.randint(0, 10, (100,))
    model = Net((8, 8, 16, 16))
    loss, accuracy = B.train(
        model, DataLoader(TensorDataset(x, y), batch_size=64), torch.optim.SGD(model.parameters(), lr=0)
    )
    with torch.no_grad():  # lr 0: the weights stay; train mode, batch by batch, as train ran them
        logits = torch.cat([model(x[:64]), model(x[64:])])
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)  # 64 and 36 images, weighed by size
    assert accuracy == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())


def test_the_kits_loader_yields_torchvisions_batches_ready_for_a_plain_loop(data):
    train_loader, test_loader = make_loaders(data, batch_size=64, augment=[A.HorizontalFlip(p=0.0)], num_workers=0)
    x, y = next(iter(train_loader))
    assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32) and y.dtype == torch.int64
    images = torch.from_numpy(train_loader.dataset.images)
    normalized = normalize(images, train_loader.dataset.mean, train_loader.dataset.std)
    order = [int(torch.nonzero((normalized == xi).flatten(1).all(1))[0]) for xi in x[:4]]
    assert torch.equal(y[:4], train_loader.dataset.labels[order])  # each batch: the normalized images and their labels
    model = Net().eval()
    with torch.no_grad():
        assert all(model(x).shape == (len(y), 10) for x, y in test_loader)  # nothing to convert


@pytest.mark.parametrize(
    "make", [lambda o: torch.optim.lr_scheduler.StepLR(o, 10), lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o)]
)
def test_an_epoch_wise_scheduler_is_refused_before_any_step_with_what_to_do(make):
    net = Net((8, 8, 16, 16))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.clone() for p in net.parameters()]
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    with pytest.raises(TypeError, match=r"counts epochs.*step it yourself after each epoch: scheduler.step\(\)"):
        B.train(net, batches, optimizer, scheduler=make(optimizer))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_backprop_py_copied_alone_trains_a_torchvision_resnet18(tmp_path):
    shutil.copy(Path(B.__file__), tmp_path / "backprop.py")  # the one file a student lifts into S10 or S11
    script = """
import torch, torchvision
from backprop import test, train
torch.manual_seed(0)
x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
model = torchvision.models.resnet18(num_classes=10)
adam = torch.optim.Adam(model.parameters(), lr=1e-3)
one_cycle = torch.optim.lr_scheduler.OneCycleLR(adam, max_lr=1e-3, total_steps=2 * len(batches))
first, _ = train(model, batches, adam, scheduler=one_cycle)
second, _ = train(model, batches, adam, scheduler=one_cycle)
loss, accuracy, predicted = test(model, batches, tta=True, predictions=True)
print(first, second, accuracy, predicted.shape[0])
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    first, second, accuracy, count = out.stdout.split()
    assert float(second) < float(first) and 0 <= float(accuracy) <= 100 and count == "32"
    assert not list(tmp_path.glob("helpers*")), "nothing else of the kit was needed"
