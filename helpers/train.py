"""Headless training: `python -m helpers.train` trains Net on CIFAR-10 and writes the evidence.

Writes training_logs.md (per-epoch table, final numbers, hardware, torch, date), and under the
results folder metrics.json (the whole recipe included), the plots and s9_net.pt (a state_dict that
Net() loads). Every setting is checked and every output location proven writable before any data is
loaded; a checkpoint after every epoch makes an interrupted run resumable by rerunning the command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn

from . import utils
from .backprop import (
    CheckpointError,
    DivergedError,
    FitResult,
    fit,
    make_optimizer,
    make_scheduler,
    pick_device,
    precision_policy,
    seed_everything,
    write_atomically,
)
from .dataset import DatasetNotFoundError, augmentations, make_loaders
from .model import Net, count_macs, count_parameters, format_receptive_field, receptive_field, total_receptive_field
from .recipe import RECIPE, Recipe

QUICK_TRAIN_IMAGES, QUICK_TEST_IMAGES = 512, 256  # quick mode: a smoke test of the whole path
TARGET_ACCURACY = 85.0  # the assignment's bar
CHECKPOINT_NAME = "checkpoint.pt"  # the default checkpoint, inside the results folder (ignored by git)
LOCK_NAME = ".run.lock"  # held by the run writing a results folder


@dataclass
class RunConfig:
    """Everything that decides a run and where it writes; recorded in metrics.json and training_logs.md."""

    recipe: Recipe = field(default_factory=lambda: RECIPE)
    quick: bool = False
    workers: int | None = None
    results_dir: str = "Results"
    logs_path: str = "training_logs.md"
    checkpoint: str | None = None  # None: no checkpoint (the notebook); the CLI defaults to results_dir/checkpoint.pt
    source: str = "python -m helpers.train"

    def sizes(self) -> tuple[int | None, int | None]:
        """(train, test) image counts: the full splits, or quick mode's small random subsets."""
        return (QUICK_TRAIN_IMAGES, QUICK_TEST_IMAGES) if self.quick else (None, None)


class SettingsError(ValueError):
    """A setting or output location that would fail the run later: refused before any work starts."""


def time_to_target(history: list[dict[str, float]], target: float = TARGET_ACCURACY) -> tuple[int | None, float | None]:
    """(epoch, cumulative training seconds) when test accuracy first reached `target`; Nones if never."""
    seconds = 0.0
    for h in history:
        seconds += h["train_seconds"]
        if h["test_acc"] >= target:
            return int(h["epoch"]), seconds
    return None, None


def write_results(model: nn.Module, result: FitResult, config: RunConfig, device: torch.device) -> dict[str, Any]:
    """Save metrics.json, the weights and training_logs.md for a finished run; return the metrics."""
    results = Path(config.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    history, labels, predictions = result.history, result.labels, result.predictions
    epoch_85, seconds_85 = time_to_target(history)
    train_size, test_size = config.sizes()
    metrics = {
        "final_test_acc": history[-1]["test_acc"],
        "final_test_loss": history[-1]["test_loss"],
        "final_epoch": history[-1]["epoch"],
        "test_images": len(labels),
        "test_acc_per_epoch": [h["test_acc"] for h in history],
        "params": count_parameters(model),
        "macs_per_image": count_macs(model),
        "receptive_field": total_receptive_field(model),
        "epoch_to_85": epoch_85,
        "seconds_to_85": seconds_85,
        "total_train_seconds": sum(h["train_seconds"] for h in history),
        "total_seconds": sum(h["seconds"] for h in history),
        "per_class_acc": utils.per_class_accuracy(labels, predictions),
        "device": utils.hardware(device),
        "precision": str(precision_policy(device)),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "recipe": config.recipe.record(),
        "config": {
            "quick": config.quick,
            "source": config.source,
            "workers": config.workers,
            "train_images": train_size or 50000,
            "test_images": test_size or 10000,
        },
        "history": history,
    }
    text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"  # NaN is not JSON: refuse rather than write it
    write_atomically(results / "metrics.json", lambda p: p.write_text(text))
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(results / "s9_net.pt", lambda p: torch.save(weights, p))
    write_atomically(Path(config.logs_path), lambda p: p.write_text(training_log(metrics)))
    return metrics


def training_log(m: dict[str, Any]) -> str:
    """training_logs.md: what ran where, every epoch, and the final numbers."""
    c, r = m["config"], m["recipe"]
    kind = "QUICK smoke run (small subset, not a result)" if c["quick"] else "full run on real CIFAR-10"
    reached = f"epoch {m['epoch_to_85']}, {m['seconds_to_85']:.1f} s of training" if m["epoch_to_85"] else "not reached"
    lines = [
        "# Training log",
        "",
        f"{kind}: `{c['source']}`, {m['date']}, on {m['device']} ({m['precision']}), torch {m['torch']}.",
        "",
        f"Recipe: {r['epochs']} epochs, batch {r['batch_size']}, one-cycle peak lr {r['max_lr']} "
        f"(warm-up {r['warmup_fraction']:.0%}), SGD Nesterov momentum {r['momentum']}, "
        f"weight decay {r['weight_decay']}, label smoothing {r['label_smoothing']}, seed {r['seed']}, "
        f"widths {r['widths']} (the whole recipe is in metrics.json). "
        f"{c['train_images']} train / {c['test_images']} test images. Net: {m['params']:,} parameters, "
        f"{m['macs_per_image'] / 1e6:.1f} M MACs per image, receptive field {m['receptive_field']}.",
        "",
        "| epoch | lr | train loss | train acc % | test loss | test acc % | train s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for h in m["history"]:
        lines.append(
            f"| {h['epoch']} | {h['lr']:.4f} | {h['train_loss']:.4f} | {h['train_acc']:.2f} | "
            f"{h['test_loss']:.4f} | {h['test_acc']:.2f} | {h['train_seconds']:.1f} |"
        )
    lines += [
        "",
        f"**Final epoch ({m['final_epoch']}) test accuracy: {m['final_test_acc']:.2f}%** "
        f"on {m['test_images']} test images "
        f"(the final epoch, not the best). 85% reached: {reached}. Training time {m['total_train_seconds']:.1f} s, "
        f"with evaluation {m['total_seconds']:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def save_plots(
    result: FitResult, test_images: np.ndarray, results_dir: str | Path, target: float | None = TARGET_ACCURACY
) -> None:
    """The run's pictures: curves, misclassified gallery, confusion matrix, per-class accuracy."""
    results = Path(results_dir)
    labels, predictions = result.labels, result.predictions
    for fig in (
        utils.plot_history(result.history, target, results / "curves.png"),
        utils.plot_misclassified(test_images, labels, predictions, path=results / "misclassified.png"),
        utils.plot_confusion_matrix(labels, predictions, path=results / "confusion_matrix.png"),
        utils.plot_per_class_accuracy(
            utils.per_class_accuracy(labels, predictions), results / "per_class_accuracy.png"
        ),
    ):
        plt.close(fig)


def check_writable(*folders: str | Path) -> None:
    """Prove each folder can be created and written to, before any long work starts."""
    for folder in dict.fromkeys(Path(f) for f in folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise SettingsError(
                f"cannot write to {folder.resolve()} ({type(err).__name__}: {err.strerror}); choose another folder"
            ) from err


class ResultsLock:
    """One run per results folder: a lock file holding the owner's pid; a dead owner's lock is taken over."""

    def __init__(self, results_dir: str | Path):
        self.path = Path(results_dir) / LOCK_NAME

    def __enter__(self) -> ResultsLock:
        for _ in range(2):
            try:  # O_EXCL: of two runs starting at once, exactly one creates the file
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self.path.read_text().strip()
                if owner.isdigit() and _alive(int(owner)):
                    raise SettingsError(
                        f"another run (pid {owner}) is writing to {self.path.parent}; wait for it or use another --out"
                    ) from None
                self.path.unlink(missing_ok=True)  # left by a run that died: take it over
                continue
            os.write(descriptor, str(os.getpid()).encode())
            os.close(descriptor)
            return self
        raise SettingsError(f"could not lock {self.path}; delete it if no run is writing to {self.path.parent}")

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def run(config: RunConfig) -> dict[str, Any]:
    """Check outputs, seed, load, build, train, evaluate and write everything; return the metrics."""
    r = config.recipe
    folders = [config.results_dir, Path(config.logs_path).parent]
    check_writable(*folders, *([Path(config.checkpoint).parent] if config.checkpoint else []))
    with ResultsLock(config.results_dir):
        seed_everything(r.seed)
        device = pick_device()
        train_size, test_size = config.sizes()
        train_loader, test_loader = make_loaders(
            r.batch_size, r.seed, device, config.workers, train_size, test_size, augment=augmentations(r)
        )
        model = Net(r.widths)
        rf = total_receptive_field(model)
        print(f"Net: {count_parameters(model):,} parameters, receptive field {rf}, on {utils.hardware(device)}")
        print(f"precision: {precision_policy(device)}")
        print(format_receptive_field(receptive_field(model)))
        result = fit(
            model,
            train_loader,
            test_loader,
            r.epochs,
            optimizer=lambda m: make_optimizer(m, r.max_lr, r.weight_decay, r.momentum),
            scheduler=lambda optimizer, steps: make_scheduler(optimizer, steps, r.warmup_fraction),
            label_smoothing=r.label_smoothing,
            device=device,
            checkpoint=config.checkpoint,
            signature=r.record(),
        )
        save_plots(result, test_loader.dataset.images, config.results_dir)
        return write_results(model, result, config, device)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _learning_rate(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """The command line as a RunConfig; argparse exits with code 2 and the reason on any bad setting."""
    p = argparse.ArgumentParser(prog="python -m helpers.train", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=_positive_int, default=None, help=f"default {RECIPE.epochs}, 1 with --quick")
    p.add_argument("--batch-size", type=_positive_int, default=RECIPE.batch_size)
    p.add_argument(
        "--lr", type=_learning_rate, default=RECIPE.max_lr, help="peak learning rate of the one-cycle schedule"
    )
    p.add_argument("--seed", type=_non_negative_int, default=RECIPE.seed)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_TRAIN_IMAGES} train / {QUICK_TEST_IMAGES} test images: checks the path, proves nothing",
    )
    p.add_argument("--workers", type=_non_negative_int, default=None, help="DataLoader workers (default: cores - 1)")
    p.add_argument("--out", default=None, help="results folder (default Results, or Results/quick with --quick)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help=f"resume from / save to this file (default: OUT/{CHECKPOINT_NAME}, deleted when the run ends)",
    )
    a = p.parse_args(argv)
    results = a.out or ("Results/quick" if a.quick else "Results")
    epochs = a.epochs or (1 if a.quick else RECIPE.epochs)
    return RunConfig(
        recipe=replace(RECIPE, epochs=epochs, batch_size=a.batch_size, max_lr=a.lr, seed=a.seed),
        quick=a.quick,
        workers=a.workers,
        results_dir=results,
        logs_path=str(Path(results) / "training_logs.md") if a.quick or a.out else "training_logs.md",
        checkpoint=a.checkpoint or str(Path(results) / CHECKPOINT_NAME),
        source="python -m helpers.train " + shlex.join(argv if argv is not None else sys.argv[1:]),
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: library errors become one message and exit code 2, Ctrl-C says how to resume."""
    config = parse_config(argv)
    own_checkpoint = config.checkpoint == str(Path(config.results_dir) / CHECKPOINT_NAME)
    try:
        m = run(config)
    except (DatasetNotFoundError, CheckpointError, DivergedError, SettingsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nstopped. The epochs finished so far are in {config.checkpoint}; resume with:\n"
            f"  python3 -m helpers.train {shlex.join(argv if argv is not None else sys.argv[1:])}",
            file=sys.stderr,
        )
        return 130
    if own_checkpoint:  # the results now hold everything the default checkpoint did but the optimizer state
        Path(config.checkpoint).unlink(missing_ok=True)
    print(f"final epoch test accuracy {m['final_test_acc']:.2f}% ({m['params']:,} parameters)")
    print(f"wrote {config.results_dir}/ and {config.logs_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
