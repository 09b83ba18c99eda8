"""Training: it learns, it resumes bit for bit, it never looks at the test set, checkpoints are safe, flip TTA."""

import random

import albumentations as A
import numpy as np
import pytest
import torch

from helpers import backprop as B
from helpers import checkpoint as C
from helpers.dataset import normalize, subsample
from helpers.device import Precision
from helpers.lr_finder import LRRangeTest
from helpers.model import Net
from helpers.recipe import RECIPE

CPU = torch.device("cpu")


def _fit(loaders, epochs=3, checkpoint=None, recipe=RECIPE, model=None, **kw):
    """fit with the recipe's optimizer and schedule, as train.py runs it."""
    B.seed_everything(0)
    model = model or Net()
    optimizer, schedule = recipe.optimizer_and_schedule(model, len(loaders[0]))
    kw = {"config": recipe.record(), "label_smoothing": recipe.label_smoothing, **kw}
    result = B.fit(
        model, *loaders, epochs=epochs, optimizer=optimizer, scheduler=schedule, device=CPU, checkpoint=checkpoint, **kw
    )
    return model, result.history


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    B.seed_everything(7)
    first = draw()
    B.seed_everything(7)
    assert draw() == first


def test_the_recipes_schedule_warms_up_to_the_peak_then_decays_to_zero():
    optimizer, schedule = RECIPE.optimizer_and_schedule(Net(), steps_per_epoch=100 // RECIPE.epochs + 1)
    lrs = []
    for _ in range(schedule.total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    peak = lrs.index(max(lrs))
    assert lrs[0] == pytest.approx(0.02) and max(lrs) == pytest.approx(0.2)
    assert peak == pytest.approx(RECIPE.warmup_fraction * len(lrs), abs=1.5)
    assert lrs[-1] < 1e-3 and all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))


def test_weight_decay_skips_batchnorm_and_biases():
    decay, no_decay = B.make_optimizer(Net(), lr=0.1, momentum=0.9, weight_decay=5e-4).param_groups
    assert decay["weight_decay"] > 0 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0 and all(p.ndim == 1 for p in no_decay["params"])


def test_training_lowers_the_loss(small):
    _, history = _fit(small(), epochs=4)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert set(history[0]) == {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc"} | {
        "train_seconds",
        "seconds",
    }


def test_the_test_set_never_changes_training(small, cifar):
    other = subsample(cifar, train_images=256, test_images=64, seed=9)
    a, _ = _fit(small(), epochs=2)
    b, _ = _fit((small()[0], small(data=other)[1]), epochs=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _interrupted(monkeypatch, in_epoch: int):
    """Make train raise KeyboardInterrupt in epoch `in_epoch`, as a kill or a runtime reset would; returns the undo."""
    real_train, calls = B.train, []

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) == in_epoch:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(B, "train", train)
    return lambda: monkeypatch.setattr(B, "train", real_train)


def test_a_killed_and_resumed_run_matches_an_uninterrupted_one_bit_for_bit(small, tmp_path, monkeypatch):
    straight, straight_history = _fit(small(), epochs=3)
    undo = _interrupted(monkeypatch, in_epoch=3)
    with pytest.raises(KeyboardInterrupt):
        _fit(small(), epochs=3, checkpoint=tmp_path / "run.pt")
    undo()
    assert C.load_checkpoint(tmp_path / "run.pt")["epoch"] == 2

    B.seed_everything(123)  # a fresh process would start from other RNG states: the checkpoint restores them
    resumed = Net()
    optimizer, schedule = RECIPE.optimizer_and_schedule(resumed, len(small()[0]))
    resumed_history = B.fit(
        resumed,
        *small(),
        epochs=3,
        optimizer=optimizer,
        scheduler=schedule,
        label_smoothing=RECIPE.label_smoothing,
        device=CPU,
        checkpoint=tmp_path / "run.pt",
        config=RECIPE.record(),
    ).history
    assert all(torch.equal(x, y) for x, y in zip(straight.state_dict().values(), resumed.state_dict().values()))
    strip = lambda hs: [{k: v for k, v in h.items() if "seconds" not in k} for h in hs]  # noqa: E731
    assert strip(resumed_history) == strip(straight_history)


def test_saving_never_leaves_a_half_written_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    C.write_atomically(path, lambda tmp: torch.save({"value": 1}, tmp))

    def crash(obj, f, *args, **kwargs):
        open(f, "wb").write(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        C.save_checkpoint(path, config={}, machine={}, history=[], model=Net())
    assert torch.load(path, weights_only=True)["value"] == 1


def test_corrupt_checkpoint_gets_a_clear_error(small, tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(C.CheckpointError, match="delete it"):
        _fit(small(), epochs=1, checkpoint=path)


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(small, cifar, tmp_path):
    path = tmp_path / "run.pt"
    _fit(small(), epochs=1, checkpoint=path)
    with pytest.raises(C.CheckpointError, match=r"another run \(it differs in: epochs\)"):
        _fit(small(), epochs=2, checkpoint=path)
    with pytest.raises(C.CheckpointError, match="differs in: coarse_dropout_p, weight_decay"):
        _fit(small(), epochs=1, checkpoint=path, recipe=RECIPE.__class__(coarse_dropout_p=0.25, weight_decay=1e-3))
    with pytest.raises(C.CheckpointError, match="differs in: train_images"):
        _fit(small(data=subsample(cifar, train_images=192, test_images=128)), epochs=1, checkpoint=path)
    with pytest.raises(C.CheckpointError, match="differs in: widths"):
        wide = RECIPE.__class__(widths=(16, 32, 64, 64))
        _fit(small(), epochs=1, checkpoint=path, recipe=wide, model=Net(wide.widths))


def test_lr_range_suggestion_ignores_the_dip_after_divergence():
    # Shaped like the real curve on Net: a descent centred at 0.03, lowest near 0.17, a blow-up, then a fake dip.
    lrs = np.geomspace(1e-4, 10, 100)
    falling = 2.35 - 0.5 / (1 + np.exp(-3 * (np.log10(lrs) + 1.5)))
    losses = np.where(lrs > 1, 3.0 - 0.5 * np.log10(lrs), falling + 2 * np.maximum(0, np.log10(lrs / 0.17)))
    sweep = LRRangeTest(list(lrs), list(losses))
    assert sweep.steepest == pytest.approx(0.03, rel=0.15) and sweep.minimum == pytest.approx(0.17, rel=0.1)


def test_flip_tta_averages_the_softmax_of_each_image_and_its_mirror(small):
    model, _ = _fit(small(), epochs=1)
    test_loader = small()[1]
    logits, labels = B.predict(model, test_loader, tta=True)
    images = normalize(torch.from_numpy(test_loader.dataset.images), test_loader.dataset.mean, test_loader.dataset.std)
    with torch.no_grad():
        expected = (model(images).softmax(1) + model(images.flip(3)).softmax(1)) / 2
    assert torch.allclose(logits.exp(), expected, atol=1e-5) and torch.equal(labels, test_loader.dataset.labels)
    plain_loss, plain_acc = B.test(model, test_loader)
    assert B.test(model, test_loader, tta=True) != (plain_loss, plain_acc)  # a different evaluation, reported beside


def test_fit_reports_flip_tta_beside_the_plain_accuracy_when_asked(small):
    model = Net()
    result = B.fit(model, *small(), epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), tta=True)
    assert result.tta_accuracy == B.score(result.tta_logits, result.labels)[1]
    assert result.history[-1]["test_acc"] == B.score(result.logits, result.labels)[1]
    model = Net()
    assert B.fit(model, *small(), epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.05)).tta_accuracy is None


def _epoch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("epoch ")]


def test_a_resumed_run_prints_every_epoch_once_in_order_restored_ones_marked(small, tmp_path, monkeypatch, capsys):
    undo = _interrupted(monkeypatch, in_epoch=3)
    with pytest.raises(KeyboardInterrupt):
        _fit(small(), epochs=4, checkpoint=tmp_path / "run.pt")
    undo()
    capsys.readouterr()
    _, history = _fit(small(), epochs=4, checkpoint=tmp_path / "run.pt")
    out = capsys.readouterr().out
    lines = _epoch_lines(out)
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert [line.endswith("(restored)") for line in lines] == [True, True, False, False]
    assert "resumed after epoch 2 of 4" in out and [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert "min to go" in lines[2] and "min to go" not in lines[3]  # said once, after the first epoch trained


def test_a_resume_on_another_precision_says_so_and_goes_on(small, tmp_path, monkeypatch, capsys):
    fp32, bf16 = Precision(None, "fp32 for the test"), Precision(torch.bfloat16, "bf16 for the test")
    undo = _interrupted(monkeypatch, in_epoch=2)
    with pytest.raises(KeyboardInterrupt):
        _fit(small(), epochs=2, checkpoint=tmp_path / "run.pt", precision=fp32)
    undo()
    capsys.readouterr()
    _, history = _fit(small(), epochs=2, checkpoint=tmp_path / "run.pt", precision=bf16)
    out = capsys.readouterr().out
    assert "note: epochs 1-1 ran on" in out and "(fp32: fp32 for the test); the rest runs on" in out
    assert "(bf16 autocast: bf16 for the test)" in out and len(history) == 2


def test_fit_refuses_a_schedule_too_short_for_its_epochs_before_training(small, monkeypatch):
    loaders = small()
    model = Net()
    sgd, one_cycle = RECIPE.__class__(epochs=2).optimizer_and_schedule(model, len(loaders[0]))
    B.fit(model, *loaders, epochs=2, optimizer=sgd, scheduler=one_cycle, device=CPU)
    monkeypatch.setattr(B, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match="0 of its 8 steps left but this fit takes 8"):
        B.fit(model, *loaders, epochs=2, optimizer=sgd, scheduler=one_cycle, device=CPU)  # a second fit, same schedule
    adam = torch.optim.Adam(model.parameters())
    short = torch.optim.lr_scheduler.OneCycleLR(adam, max_lr=0.01, total_steps=len(loaders[0]))
    with pytest.raises(ValueError, match="4 of its 4 steps left but this fit takes 12"):
        B.fit(model, *loaders, epochs=3, optimizer=adam, scheduler=short, device=CPU)


def test_the_kits_loader_yields_torchvisions_batches_ready_for_a_plain_loop(small):
    train_loader, test_loader = small(augment=[A.HorizontalFlip(p=0.0)])
    x, y = next(iter(train_loader))
    assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32) and y.dtype == torch.int64
    images = torch.from_numpy(train_loader.dataset.images)
    normalized = normalize(images, train_loader.dataset.mean, train_loader.dataset.std)
    order = [int(torch.nonzero((normalized == xi).flatten(1).all(1))[0]) for xi in x[:4]]
    assert torch.equal(y[:4], train_loader.dataset.labels[order])  # each batch: the normalized images and their labels
    model = Net().eval()
    with torch.no_grad():
        assert all(model(x).shape == (len(y), 10) for x, y in test_loader)  # nothing to convert
