"""The record of a finished run: metrics.json, the weights, training_logs.md and the pictures.

Written from (model, result, recipe, folder) alone, by the notebook and by train.py alike, so both
leave the same evidence. metrics.json holds the whole recipe, so a result can be rerun from its record.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn

from . import utils
from .backprop import FitResult
from .checkpoint import write_atomically
from .measure import count_macs, count_parameters, total_receptive_field
from .recipe import TARGET_ACCURACY, Recipe

WEIGHTS_NAME = "s9_net.pt"  # a state_dict that Net(recipe.widths) loads


def time_to_target(history: list[dict[str, float]], target: float = TARGET_ACCURACY) -> tuple[int | None, float | None]:
    """(epoch, cumulative training seconds) when test accuracy first reached `target`; Nones if never."""
    seconds = 0.0
    for h in history:
        seconds += h["train_seconds"]
        if h["test_acc"] >= target:
            return int(h["epoch"]), seconds
    return None, None


def run_metrics(model: nn.Module, result: FitResult, recipe: Recipe, source: str, quick: bool) -> dict[str, Any]:
    """Everything a run is judged by, as plain JSON values."""
    history, labels = result.history, result.labels
    epoch_85, seconds_85 = time_to_target(history)
    return {
        "final_test_acc": history[-1]["test_acc"],
        "final_test_acc_tta": result.tta_accuracy,
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
        "per_class_acc": utils.per_class_accuracy(labels, result.predictions),
        "device": result.hardware,
        "precision": result.precision,
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "recipe": recipe.record(),
        "config": {"quick": quick, "source": source, "train_images": result.train_images, "test_images": len(labels)},
        "history": history,
    }


def write_results(
    model: nn.Module,
    result: FitResult,
    recipe: Recipe,
    folder: str | Path,
    *,
    log: str | Path | None = None,
    source: str = "S9.ipynb",
    quick: bool = False,
) -> dict[str, Any]:
    """Save folder/metrics.json, folder/s9_net.pt and the per-epoch log (default folder/training_logs.md)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = run_metrics(model, result, recipe, source, quick)
    text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"  # NaN is not JSON: refuse rather than write it
    write_atomically(folder / "metrics.json", lambda p: p.write_text(text))
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(folder / WEIGHTS_NAME, lambda p: torch.save(weights, p))
    write_atomically(Path(log or folder / "training_logs.md"), lambda p: p.write_text(training_log(metrics)))
    return metrics


def accuracy_line(m: dict[str, Any]) -> str:
    """'87.91% (88.72% with flip TTA)': the plain number first, the one the assignment's bar reads."""
    tta = m.get("final_test_acc_tta")
    return f"{m['final_test_acc']:.2f}%" + (f" ({tta:.2f}% with flip TTA)" if tta is not None else "")


def training_log(m: dict[str, Any]) -> str:
    """training_logs.md: what ran where, every epoch, and the final numbers."""
    c, r = m["config"], m["recipe"]
    kind = "QUICK smoke run (small subset, not a result)" if c["quick"] else "full run"
    reached = f"epoch {m['epoch_to_85']}, {m['seconds_to_85']:.1f} s of training" if m["epoch_to_85"] else "not reached"
    lines = [
        "# Training log",
        "",
        f"{kind}: `{c['source']}`, {m['date']}, on {m['device']} ({m['precision']}), torch {m['torch']}.",
        "",
        f"Recipe: {r['epochs']} epoch{'s' if r['epochs'] != 1 else ''}, batch {r['batch_size']}, "
        f"one-cycle peak lr {r['max_lr']} "
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
            f"| {h['epoch']} | {h['lr']:.3g} | {h['train_loss']:.4f} | {h['train_acc']:.2f} | "
            f"{h['test_loss']:.4f} | {h['test_acc']:.2f} | {h['train_seconds']:.1f} |"
        )
    lines += [
        "",
        f"**Final epoch ({m['final_epoch']}) test accuracy: {accuracy_line(m)}** on {m['test_images']} test "
        f"images (the final epoch, not the best). 85% reached: {reached}. "
        f"Training time {m['total_train_seconds']:.1f} s, with evaluation {m['total_seconds']:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def save_plots(result: FitResult, test_images: np.ndarray, folder: str | Path) -> None:
    """The run's pictures: curves, misclassified gallery, confusion matrix, per-class accuracy."""
    folder = Path(folder)
    labels, predictions = result.labels, result.predictions
    for fig in (
        utils.plot_history(result.history, target=TARGET_ACCURACY, path=folder / "curves.png"),
        utils.plot_misclassified(test_images, labels, predictions=predictions, path=folder / "misclassified.png"),
        utils.plot_confusion_matrix(labels, predictions, path=folder / "confusion_matrix.png"),
        utils.plot_per_class_accuracy(
            utils.per_class_accuracy(labels, predictions), path=folder / "per_class_accuracy.png"
        ),
    ):
        plt.close(fig)
