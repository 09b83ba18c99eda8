"""The headless command and the benchmark run end to end (quick mode: it proves the path, not accuracy)."""

import dataclasses
import json

import torch

from helpers import bench, train
from helpers.model import Net
from helpers.recipe import RECIPE


def test_time_to_target_counts_training_seconds_until_the_first_epoch_at_85():
    history = [{"epoch": e, "test_acc": acc, "train_seconds": 10.0} for e, acc in enumerate([70, 84.9, 85.0, 86], 1)]
    assert train.time_to_target(history) == (3, 30.0)
    assert train.time_to_target(history[:2]) == (None, None)


def test_quick_run_writes_logs_metrics_plots_and_loadable_weights(cifar_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_ROOT", str(cifar_root))
    assert train.main(["--quick", "--workers", "0", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (
        metrics["config"]["quick"] and metrics["final_epoch"] == 1 and metrics["test_images"] == train.QUICK_TEST_IMAGES
    )
    assert metrics["params"] < 200_000 and metrics["receptive_field"] > 44 and metrics["device"]
    # the record alone reruns the result: every field of the recipe, as run (quick: 1 epoch)
    assert metrics["recipe"] == dataclasses.replace(RECIPE, epochs=1).record()
    assert not (tmp_path / train.CHECKPOINT_NAME).exists(), "the default checkpoint is removed once results are written"
    for png in ("curves", "misclassified", "confusion_matrix", "per_class_accuracy"):
        assert (tmp_path / f"{png}.png").stat().st_size > 10_000
    log = (tmp_path / "training_logs.md").read_text()
    assert "QUICK" in log and metrics["device"] in log and f"{metrics['final_test_acc']:.2f}%" in log
    Net().load_state_dict(torch.load(tmp_path / "s9_net.pt", weights_only=True))


def test_benchmark_prints_both_loaders_side_by_side(cifar_root, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CIFAR10_ROOT", str(cifar_root))
    args = ["--workers", "0", "--loader-batches", "2", "--steps", "1", "--epoch-images", "256", "--batch-size", "64"]
    assert bench.main(args + ["--out", str(tmp_path / "bench.md")]) == 0
    report = (tmp_path / "bench.md").read_text()
    assert "naive per-image loader | make_loaders" in report and "train step images/s, fp32, channels_last" in report
    loader_row = next(line for line in report.splitlines() if line.startswith("| loader images/s"))
    assert all(float(cell.replace(",", "")) > 0 for cell in loader_row.strip("|").split("|")[1:])


def test_missing_data_ends_the_command_with_the_fix_not_a_traceback(tmp_path, monkeypatch, capsys, offline):
    monkeypatch.setenv("CIFAR10_ROOT", str(tmp_path))
    assert train.main(["--quick", "--workers", "0", "--out", str(tmp_path / "out")]) == 2
    assert "unpack.py" in capsys.readouterr().err
