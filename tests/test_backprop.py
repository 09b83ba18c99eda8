"""Training: it learns, it resumes bit for bit, it never looks at the test set, checkpoints are safe, flip TTA."""

import random

import albumentations as A
import numpy as np
import pytest
import torch

from helpers import backprop as B
from helpers import checkpoint as C
from helpers.dataset import make_loaders, normalize
from helpers.device import Precision
from helpers.lr_finder import LRRangeTest
from helpers.model import Net

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small(cifar_root):
    """Loader factory over a small real subset, single-process for speed."""
    return lambda seed=0: make_loaders(64, seed=seed, num_workers=0, train_size=256, test_size=128, root=cifar_root)


def _fit(loaders, epochs=3, checkpoint=None, **kw):
    B.seed_everything(0)
    model = Net()
    history = B.fit(model, *loaders, epochs, device=CPU, checkpoint=checkpoint, **kw).history
    return model, history


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    B.seed_everything(7)
    first = draw()
    B.seed_everything(7)
    assert draw() == first


def test_schedule_warms_up_to_the_peak_then_decays_to_zero():
    opt = B.make_optimizer(Net(), 0.2)
    sched = B.make_scheduler(opt, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.02) and max(lrs) == pytest.approx(0.2) and lrs.index(max(lrs)) == 25
    assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[25:], lrs[26:]))


def test_weight_decay_skips_batchnorm_and_biases():
    decay, no_decay = B.make_optimizer(Net(), 0.1).param_groups
    assert decay["weight_decay"] > 0 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0 and all(p.ndim == 1 for p in no_decay["params"])


def test_training_lowers_the_loss(small):
    _, history = _fit(small(), epochs=4)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert set(history[0]) == {
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "train_seconds",
        "seconds",
    }


def test_the_test_set_never_changes_training(small, cifar_root):
    loaders = small()
    other_test = make_loaders(64, seed=9, num_workers=0, train_size=256, test_size=64, root=cifar_root)[1]
    a, _ = _fit(loaders, epochs=2)
    b, _ = _fit((small()[0], other_test), epochs=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_killed_and_resumed_run_matches_an_uninterrupted_one_bit_for_bit(small, tmp_path, monkeypatch):
    straight, straight_history = _fit(small(), epochs=3)

    real_train, calls = B.train, []

    def dies_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the run were killed during epoch 3
        return real_train(*args, **kwargs)

    monkeypatch.setattr(B, "train", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _fit(small(), epochs=3, checkpoint=tmp_path / "run.pt")
    monkeypatch.setattr(B, "train", real_train)
    assert C.load_checkpoint(tmp_path / "run.pt")["epoch"] == 2

    B.seed_everything(123)  # a fresh process would start from other RNG states: the checkpoint restores them
    resumed = Net()
    resumed_history = B.fit(resumed, *small(), 3, device=CPU, checkpoint=tmp_path / "run.pt").history
    assert all(torch.equal(x, y) for x, y in zip(straight.state_dict().values(), resumed.state_dict().values()))
    strip = lambda hs: [{k: v for k, v in h.items() if "seconds" not in k} for h in hs]  # noqa: E731
    assert strip(resumed_history) == strip(straight_history)


def test_saving_never_leaves_a_half_written_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    C.save_checkpoint(path, value=1)

    def crash(obj, f, *args, **kwargs):
        open(f, "wb").write(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        C.save_checkpoint(path, value=2)
    assert torch.load(path, weights_only=True)["value"] == 1


def test_corrupt_checkpoint_gets_a_clear_error(small, tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(C.CheckpointError, match="delete it"):
        _fit(small(), epochs=1, checkpoint=path)


def test_mismatched_checkpoint_gets_a_clear_error(small, tmp_path):
    path = tmp_path / "run.pt"
    _fit(small(), epochs=1, checkpoint=path)
    with pytest.raises(C.CheckpointError, match="another run"):
        _fit(small(), epochs=2, checkpoint=path)
    with pytest.raises(C.CheckpointError, match="another run.*network"):
        B.fit(Net(widths=(16, 32, 64, 64)), *small(), 1, device=CPU, checkpoint=path)


def test_lr_range_suggestion_ignores_the_dip_after_divergence():
    # Shaped like the real curve on Net: a descent centred at 0.03, lowest near 0.17, a blow-up, then a fake dip.
    lrs = np.geomspace(1e-4, 10, 100)
    falling = 2.35 - 0.5 / (1 + np.exp(-3 * (np.log10(lrs) + 1.5)))
    losses = np.where(lrs > 1, 3.0 - 0.5 * np.log10(lrs), falling + 2 * np.maximum(0, np.log10(lrs / 0.17)))
    sweep = LRRangeTest(list(lrs), list(losses))
    assert sweep.steepest == pytest.approx(0.03, rel=0.15) and sweep.minimum == pytest.approx(0.17, rel=0.1)


def test_a_checkpoint_resumes_only_with_the_same_augmentations_and_optimizer(small, tmp_path, cifar_root):
    path = tmp_path / "run.pt"
    _fit(small(), epochs=1, checkpoint=path)
    other_augment = make_loaders(
        64, seed=0, num_workers=0, train_size=256, test_size=128, root=cifar_root, augment=[A.HorizontalFlip(p=1.0)]
    )
    with pytest.raises(C.CheckpointError, match="differs in: augmentations"):
        _fit(other_augment, epochs=1, checkpoint=path)
    with pytest.raises(C.CheckpointError, match="differs in: param_groups"):
        _fit(small(), epochs=1, checkpoint=path, optimizer=lambda m: B.make_optimizer(m, weight_decay=1e-3))


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


def test_fit_reports_flip_tta_beside_the_plain_accuracy(small):
    B.seed_everything(0)
    result = B.fit(Net(), *small(), 1, device=CPU)
    assert result.tta_accuracy == B.score(result.tta_logits, result.labels)[1]
    assert result.history[-1]["test_acc"] == B.score(result.logits, result.labels)[1]
    assert B.fit(Net(), *small(), 1, device=CPU, tta=False).tta_accuracy is None


def _interrupted(monkeypatch, in_epoch: int):
    """Make train raise KeyboardInterrupt in epoch `in_epoch`, as a runtime reset would; returns the undo."""
    real_train, calls = B.train, []

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) == in_epoch:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(B, "train", train)
    return lambda: monkeypatch.setattr(B, "train", real_train)


def _epoch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("epoch ")]


def test_a_resumed_run_prints_every_epoch_once_in_order_restored_ones_marked(small, tmp_path, monkeypatch, capsys):
    undo = _interrupted(monkeypatch, in_epoch=3)
    with pytest.raises(KeyboardInterrupt):
        _fit(small(), epochs=4, checkpoint=tmp_path / "run.pt", tta=False)
    undo()
    capsys.readouterr()
    _, history = _fit(small(), epochs=4, checkpoint=tmp_path / "run.pt", tta=False)
    lines = _epoch_lines(capsys.readouterr().out)
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert [line.endswith("(restored)") for line in lines] == [True, True, False, False]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_a_resume_on_another_precision_says_so_and_goes_on(small, tmp_path, monkeypatch, capsys):
    fp32, bf16 = Precision(None, "fp32 for the test"), Precision(torch.bfloat16, "bf16 for the test")
    undo = _interrupted(monkeypatch, in_epoch=2)
    with pytest.raises(KeyboardInterrupt):
        _fit(small(), epochs=2, checkpoint=tmp_path / "run.pt", tta=False, precision=fp32)
    undo()
    capsys.readouterr()
    _, history = _fit(small(), epochs=2, checkpoint=tmp_path / "run.pt", tta=False, precision=bf16)
    out = capsys.readouterr().out
    assert "the checkpoint was made on" in out and "(fp32: fp32 for the test); this run goes on on" in out
    assert "(bf16 autocast: bf16 for the test)" in out and len(history) == 2


def test_the_schedule_refuses_to_step_past_its_end_instead_of_training_at_lr_0():
    opt = B.make_optimizer(Net(), 0.2)
    sched = B.make_scheduler(opt, 4)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0  # the end of the cycle
    with pytest.raises(B.ScheduleExhaustedError, match="built for 4 steps"):
        sched.step()


def test_fit_refuses_a_schedule_too_short_for_its_epochs_before_training(small, monkeypatch):
    loaders = small()
    model = Net()
    sgd = B.make_optimizer(model)
    one_cycle = B.make_scheduler(sgd, 2 * len(loaders[0]))
    B.fit(model, *loaders, 2, optimizer=sgd, scheduler=one_cycle, device=CPU, tta=False)
    monkeypatch.setattr(B, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(B.ScheduleExhaustedError, match="0 of its 8 steps left but this fit takes 8"):
        B.fit(model, *loaders, 2, optimizer=sgd, scheduler=one_cycle, device=CPU)  # a second fit, same schedule
    adam = torch.optim.Adam(model.parameters())
    short = torch.optim.lr_scheduler.OneCycleLR(adam, max_lr=0.01, total_steps=len(loaders[0]))
    with pytest.raises(B.ScheduleExhaustedError, match="4 of its 4 steps left but this fit takes 12"):
        B.fit(model, *loaders, 3, optimizer=adam, scheduler=short, device=CPU)
