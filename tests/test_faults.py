"""Never lose a run, never publish garbage: one test per fault a user can meet."""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from helpers import backprop as B
from helpers import dataset as ds
from helpers.checkpoint import CheckpointError, load_checkpoint
from helpers.model import ConvBNReLU, Net
from helpers.recipe import RECIPE
from helpers.results import write_results

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--quick", "--workers", "0"]


@pytest.fixture
def no_data_loading(monkeypatch):
    """Any attempt to load data fails the test: settings must be refused before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the settings were checked")

    monkeypatch.setattr(train, "cifar10", refuse)


@pytest.fixture
def cli(cifar_root, monkeypatch):
    monkeypatch.setenv("CIFAR10_ROOT", str(cifar_root))
    return train.main


@pytest.mark.parametrize(
    "flags, complaint",
    [
        (["--lr", "nan"], "--lr: must be a finite number above 0, got 'nan'"),
        (["--lr", "-1"], "--lr: .*above 0"),
        (["--lr", "fast"], "--lr: must be a finite number above 0, got 'fast'"),
        (["--epochs", "0"], "--epochs: must be a whole number >= 1, got '0'"),
        (["--epochs", "abc"], "--epochs: must be a whole number >= 1, got 'abc'"),
        (["--epochs", "2.5"], "--epochs: must be a whole number >= 1, got '2.5'"),
        (["--batch-size", "0"], "--batch-size: must be a whole number >= 1"),
        (["--workers", "-1"], "--workers: must be a whole number >= 0, got '-1'"),
        (["--epoch", "3"], "unrecognized arguments: --epoch 3; did you mean --epochs\\?"),
    ],
)
def test_bad_settings_are_refused_before_any_data_is_loaded(flags, complaint, no_data_loading, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(QUICK + flags)
    assert exit_.value.code == 2
    assert re.search(complaint, capsys.readouterr().err)


def test_quick_with_epochs_runs_the_epochs_asked_for(cli, tmp_path):
    assert cli(QUICK + ["--epochs", "2", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["final_epoch"] == 2


def test_divergence_stops_training_and_writes_nothing(cli, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(QUICK + ["--lr", "1e6", "--batch-size", "64", "--epochs", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "step" in err and "lower" in err and "Traceback" not in err
    assert not any(
        (out / name).exists() for name in ("metrics.json", "s9_net.pt", "training_logs.md", train.CHECKPOINT_NAME)
    )


@pytest.mark.parametrize(
    "flags, complaint",
    [(["--epochs", "0"], "--epochs: must be a whole number >= 1, got '0'"), (["--out", "/proc/s9"], "cannot write to")],
)
def test_bad_settings_are_answered_before_torch_is_imported(flags, complaint):
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "train.py", *flags], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2 and complaint in out.stderr
    imported = [line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "argparse" in imported and not [name for name in imported if name.split(".")[0] == "torch"]


def test_a_huge_learning_rate_stops_training_naming_the_lr(small):
    net = Net()
    optimizer = replace(RECIPE, max_lr=1e6).optimizer(net)
    with pytest.raises(B.DivergedError, match=r"NaN or infinite.*at lr 1e\+06.*lower learning rate"):
        for _ in range(2):  # BatchNorm holds out for an epoch at most
            B.train(net, small()[0], optimizer)


def test_a_failed_download_leaves_no_empty_folder_behind(tmp_path, offline):
    root = tmp_path / "new" / "data"
    with pytest.raises(ds.DatasetNotFoundError, match="could not be downloaded"):
        ds.load_cifar10(False, root)
    assert list(tmp_path.iterdir()) == []


def test_metrics_json_is_never_written_with_nan(tmp_path):
    history = [
        {
            "epoch": 1,
            "lr": 0.1,
            "train_loss": float("nan"),
            "train_acc": 10.0,
            "test_loss": 2.3,
            "test_acc": 10.0,
            "train_seconds": 1.0,
            "seconds": 1.0,
        }
    ]
    with pytest.raises(ValueError, match="JSON"):
        write_results(tmp_path, model=Net(), config={}, history=history, tta_accuracy=10.0, source="t")
    assert not (tmp_path / "metrics.json").exists()


def test_a_channel_with_zero_spread_makes_inf_inputs_and_stops_training():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 128)
    data = ds.ImageData(images, labels, images[:32], labels[:32], ds.CLASSES, (0.5, 0.5, 0.5), (0.25, 0.0, 0.25))
    train_loader, _ = ds.make_loaders(data, batch_size=32, seed=0, num_workers=0)
    net = Net()
    with pytest.raises(B.DivergedError, match="NaN or infinite"):
        B.train(net, train_loader, torch.optim.SGD(net.parameters(), lr=0.01))


def _unwritable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return blocker / "results"  # cannot be created, even by root


def test_an_unwritable_results_folder_is_refused_before_training(cli, tmp_path, capsys, no_data_loading):
    out = _unwritable(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli(QUICK + ["--out", str(out)])
    assert exit_.value.code == 2 and f"cannot write to {out}" in capsys.readouterr().err


def test_an_unwritable_checkpoint_folder_is_refused_before_training(cli, tmp_path, capsys, no_data_loading):
    checkpoint = _unwritable(tmp_path) / "run.pt"
    with pytest.raises(SystemExit) as exit_:
        cli(QUICK + ["--out", str(tmp_path / "out"), "--checkpoint", str(checkpoint)])
    assert exit_.value.code == 2 and f"cannot write to {checkpoint.parent}" in capsys.readouterr().err


def _refused(err: str, *differences: str) -> bool:
    """One message, no traceback: what differs, then and now, and a new checkpoint path as the way on; the
    finished epochs are never to be deleted."""
    return (
        all(d in err for d in differences)
        and "--checkpoint NEW.pt" in err
        and "delete" not in err.lower()
        and "Traceback" not in err
    )


def test_resuming_with_another_setting_is_refused_without_losing_the_checkpoint(cli, tmp_path, capsys):
    checkpoint = tmp_path / "kept.pt"  # a checkpoint named by the user is kept after the run
    assert cli(QUICK + ["--out", str(tmp_path / "a"), "--checkpoint", str(checkpoint)]) == 0
    kept = checkpoint.read_bytes()
    assert cli(QUICK + ["--out", str(tmp_path / "b"), "--checkpoint", str(checkpoint), "--seed", "1"]) == 2
    assert cli(QUICK + ["--out", str(tmp_path / "b"), "--checkpoint", str(checkpoint), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert _refused(err, "seed: 0 then, 1 now", "epochs: 1 then, 3 now") and checkpoint.read_bytes() == kept


class OneLayerMore(Net):
    """A student's edit: one more ConvBNReLU in C2, before its shrinking convolution."""

    def __init__(self, widths=RECIPE.widths, num_classes=10):
        super().__init__(widths, num_classes)
        self.c2 = torch.nn.Sequential(self.c2[0], ConvBNReLU(widths[1], widths[1]), self.c2[1])


@pytest.mark.parametrize(
    "edit, differences",
    [
        ({"Net": OneLayerMore}, ["network: Net: 193,898 parameters in 31 layers", "214,730 parameters in 33 layers"]),
        ({"RECIPE": replace(RECIPE, widths=(40, 48, 96, 128))}, ["widths: [32, 48, 96, 128] then", "209,498"]),
    ],
)
def test_an_edited_network_is_refused_its_old_checkpoint_before_anything_loads(
    cli, tmp_path, capsys, monkeypatch, edit, differences
):
    checkpoint = tmp_path / "kept.pt"
    assert cli(QUICK + ["--out", str(tmp_path / "a"), "--checkpoint", str(checkpoint)]) == 0
    for name, value in edit.items():
        monkeypatch.setattr(train, name, value)
    assert cli(QUICK + ["--out", str(tmp_path / "b"), "--checkpoint", str(checkpoint)]) == 2
    assert _refused(capsys.readouterr().err, *differences)


@pytest.mark.parametrize("content", [torch.zeros(3), {"model": {}, "epoch": 1}, Net().state_dict()])
def test_foreign_files_passed_as_checkpoints_are_refused_with_what_to_do(cli, tmp_path, capsys, content):
    path, complaint = tmp_path / "foreign.pt", "is not a checkpoint of a training run (a weights file?)"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=re.escape(complaint)):
        load_checkpoint(path, config={}, model=Net())
    assert cli(QUICK + ["--out", str(tmp_path / "out"), "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert complaint in err and _refused(err) and err.count("\n") <= 2


def test_ctrl_c_says_how_to_resume_and_the_rerun_resumes(cli, tmp_path, capsys, killed_in_epoch):
    out = tmp_path / "out"
    args = QUICK + ["--epochs", "2", "--out", str(out)]
    undo = killed_in_epoch(train, 2)
    assert cli(args) == 130
    err = capsys.readouterr().err
    assert "Resume with" in err and f"python3 train.py --quick --workers 0 --epochs 2 --out {out}" in err
    assert len(torch.load(out / train.CHECKPOINT_NAME)["history"]) == 1  # the default checkpoint kept epoch 1
    undo()
    assert cli(args) == 0
    assert "after epoch 1" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["final_epoch"] == 2
    assert not (out / train.CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_data_file_is_named_as_corrupt(cifar_root, tmp_path, offline, damage):
    copy = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar_root / "cifar-10-batches-py", copy)
    victim = copy / "data_batch_3"
    raw = bytearray(victim.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[1000] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(ds.DatasetNotFoundError, match="corrupt: data_batch_3 failed the md5 check") as err:
        ds.load_cifar10(True, tmp_path)
    assert f"Delete {copy.resolve()}" in str(err.value) and "cifar-10-python.tar.gz" in str(err.value)
