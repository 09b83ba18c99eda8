"""The record of a finished run, the same from the notebook and train.py: metrics.json (the whole recipe too, so a
result can be rerun from its record), the weights and training_logs.md."""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import check_finite, write_atomically
from .device import precision_policy
from .measure import measure
from .recipe import TARGET_ACCURACY

WEIGHTS_NAME = "s9_net.pt"  # a state_dict that Net(recipe.widths) loads


def time_to_target(history: list[dict[str, float]], target: float = TARGET_ACCURACY) -> tuple[int | None, float | None]:
    """(epoch, cumulative training seconds) when test accuracy first reached `target`; Nones if never."""
    seconds = 0.0
    for h in history:
        seconds += h["train_seconds"]
        if h["test_acc"] >= target:
            return int(h["epoch"]), seconds
    return None, None


def held_from(history: list[dict[str, float]], target: float = TARGET_ACCURACY) -> int | None:
    """The epoch from which test accuracy stayed at or above `target` to the end; None if the last is below."""
    held = None
    for h in history:
        held = (held or int(h["epoch"])) if h["test_acc"] >= target else None
    return held


def where_trained(history: list[dict], here: str) -> str:
    """'epochs 1-20 on A; epochs 21-60 on B': the machine of each stretch of epochs (one that names none ran `here`)."""
    spans = [(m, [h["epoch"] for h in g]) for m, g in itertools.groupby(history, lambda h: h.get("machine", here))]
    return "; ".join(f"epochs {e[0]}-{e[-1]} on {m}" if len(e) > 1 else f"epoch {e[0]} on {m}" for m, e in spans)


def write_results(
    folder: str | Path,
    *,
    model: nn.Module,
    config: dict[str, Any],
    history: list[dict[str, float]],
    tta_accuracy: float,
    source: str,
) -> dict[str, Any]:
    """Save folder/metrics.json, folder/s9_net.pt and folder/training_logs.md; return the metrics.

    config: the checkpoint's. The machine and the network's measures are read here: a run need not carry them.
    """
    metrics = run_metrics(model, history, tta_accuracy=tta_accuracy)
    metrics |= {"source": source, "config": config, "history": history}
    folder = Path(folder)
    text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"  # NaN is not JSON: refuse rather than write it
    check_finite(model)
    write_atomically(folder / "metrics.json", lambda p: p.write_text(text))
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(folder / WEIGHTS_NAME, lambda p: torch.save(weights, p))
    write_atomically(folder / "training_logs.md", lambda p: p.write_text(training_log(metrics)))
    return metrics


def run_metrics(model: nn.Module, history: list[dict[str, float]], *, tta_accuracy: float) -> dict[str, Any]:
    """The final numbers, the network's measures and the machine that ran it, read from the model itself."""
    epoch_85, seconds_85 = time_to_target(history)
    precision, network = precision_policy(next(model.parameters()).device), measure(model)
    return {
        "final_test_acc": history[-1]["test_acc"],
        "final_test_acc_tta": tta_accuracy,
        "final_test_loss": history[-1]["test_loss"],
        "final_epoch": history[-1]["epoch"],
        "test_acc_per_epoch": [h["test_acc"] for h in history],
        "params": network.params,
        "macs_per_image": network.macs,
        "receptive_field": network.receptive_field,
        "epoch_to_85": epoch_85,
        "seconds_to_85": seconds_85,
        "epoch_held_85": held_from(history),
        "total_train_seconds": sum(h["train_seconds"] for h in history),
        "total_seconds": sum(h["seconds"] for h in history),
        "device": precision.hardware,
        "precision": str(precision),
        "trained_on": where_trained(history, precision.machine),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def accuracy_line(m: dict[str, Any]) -> str:
    """'87.91% (88.72% with flip TTA)': the plain number first, the one the assignment's bar reads."""
    tta = m.get("final_test_acc_tta")
    return f"{m['final_test_acc']:.2f}%" + (f" ({tta:.2f}% with flip TTA)" if tta is not None else "")


def training_log(m: dict[str, Any]) -> str:
    """training_logs.md: what ran where, every epoch, and the final numbers."""
    c = m["config"]
    kind = "QUICK smoke run (small subset, not a result)" if c["quick"] else "full run"
    reached = f"epoch {m['epoch_to_85']}, {m['seconds_to_85']:.1f} s of training" if m["epoch_to_85"] else "not reached"
    if m["epoch_held_85"]:
        reached += f"; held from epoch {m['epoch_held_85']} to the end"
    lines = [
        "# Training log",
        "",
        f"{kind}: `{m['source']}`, {m['date']}, torch {m['torch']}; {m['trained_on']}; scored on {m['device']} "
        f"({m['precision']}).",
        "",
        f"Recipe: {c['epochs']} epoch{'s' if c['epochs'] != 1 else ''}, batch {c['batch_size']}, "
        f"one-cycle peak lr {c['max_lr']} "
        f"(warm-up {c['warmup_fraction']:.0%}), SGD Nesterov momentum {c['momentum']}, "
        f"weight decay {c['weight_decay']}, label smoothing {c['label_smoothing']}, seed {c['seed']}, "
        f"widths {c['widths']} (the whole recipe is in metrics.json). "
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
        f"**Final epoch ({m['final_epoch']}) test accuracy: {accuracy_line(m)}** on {c['test_images']} test "
        f"images (the final epoch, not the best). 85% reached: {reached}. "
        f"Training time {m['total_train_seconds']:.1f} s, with evaluation {m['total_seconds']:.1f} s.",
        "",
    ]
    return "\n".join(lines)
