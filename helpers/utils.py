"""Pictures and facts for the notebook and the logs: sample grids, curves, mistakes, hardware."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch

from .dataset import CLASSES, denormalize


def save(fig: plt.Figure, path: str | Path | None) -> plt.Figure:
    """Save a figure under its path (creating folders) when one is given; return it for display."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _grid(count: int, columns: int, cell: float = 1.5) -> tuple[plt.Figure, np.ndarray]:
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * cell, rows * (cell + 0.25)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def plot_samples(images: np.ndarray, labels: Sequence[int], count: int = 20, columns: int = 10, path: str | Path | None = None) -> plt.Figure:
    """The first `count` uint8 images with their class names: what the network is asked to tell apart."""
    fig, axes = _grid(count, columns)
    for ax, image, label in zip(axes.flat, images[:count], labels[:count]):
        ax.imshow(image)
        ax.set_title(CLASSES[label], fontsize=9)
    fig.suptitle("CIFAR-10 training images")
    return save(fig, path)


def plot_augmentations(images: np.ndarray, transform: A.Compose, draws: int = 7, path: str | Path | None = None) -> plt.Figure:
    """Each image (a row) then `draws` passes of the train pipeline, de-normalized for display."""
    fig, axes = _grid(len(images) * (draws + 1), draws + 1)
    for row, image in enumerate(images):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title("original", fontsize=9)
        for col in range(1, draws + 1):
            axes[row, col].imshow(denormalize(transform(image=image)["image"]).numpy())
            axes[row, col].set_title(f"draw {col}", fontsize=9)
    fig.suptitle("Train augmentations: flip, shift-scale-rotate, one 16x16 mean-coloured hole")
    return save(fig, path)


def plot_history(history: Sequence[dict[str, float]], path: str | Path | None = None) -> plt.Figure:
    """Loss and accuracy per epoch, train beside test: the gap shows over- or under-fitting."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-o"), ("test", "-s")):
        loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], style, label=split, markersize=3)
        acc_ax.plot(epochs, [h[f"{split}_acc"] for h in history], style, label=split, markersize=3)
    loss_ax.set(title="Loss (train: label-smoothed, augmented)", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.set(title=f"Accuracy (final test {history[-1]['test_acc']:.2f}%)", xlabel="epoch", ylabel="%")
    acc_ax.axhline(85, color="grey", linestyle=":", label="assignment: 85%")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


def plot_misclassified(
    images: np.ndarray, labels: torch.Tensor, predictions: torch.Tensor, count: int = 20, path: str | Path | None = None
) -> plt.Figure:
    """The first `count` test images the model got wrong, with true and predicted class."""
    wrong = torch.nonzero(predictions != labels).flatten()[:count].tolist()
    fig, axes = _grid(max(len(wrong), 1), 5, cell=2.0)
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i])
        ax.set_title(f"true: {CLASSES[labels[i]]}\npred: {CLASSES[predictions[i]]}", fontsize=9)
    fig.suptitle(f"{len(wrong)} misclassified test images")
    return save(fig, path)


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor) -> np.ndarray:
    """10 x 10 counts: row = true class, column = predicted class."""
    return np.bincount(labels.numpy() * len(CLASSES) + predictions.numpy(), minlength=len(CLASSES) ** 2).reshape(len(CLASSES), -1)


def plot_confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, path: str | Path | None = None) -> plt.Figure:
    """Which classes are mistaken for which (cat <-> dog is the classic)."""
    fig, ax = plt.subplots(figsize=(8, 6.5))
    sns.heatmap(confusion_matrix(labels, predictions), annot=True, fmt="d", cmap="Blues", cbar=False,
                xticklabels=CLASSES, yticklabels=CLASSES, ax=ax)  # fmt: skip
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix, test set")
    return save(fig, path)


def per_class_accuracy(labels: torch.Tensor, predictions: torch.Tensor) -> dict[str, float]:
    """Accuracy % of each class: the average hides which classes are still hard."""
    matrix = confusion_matrix(labels, predictions)
    return {name: 100 * matrix[i, i] / max(1, matrix[i].sum()) for i, name in enumerate(CLASSES)}


def plot_per_class_accuracy(accuracy: dict[str, float], path: str | Path | None = None) -> plt.Figure:
    """Bar chart of per_class_accuracy, worst class first."""
    ranked = sorted(accuracy.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    sns.barplot(x=[k for k, _ in ranked], y=[v for _, v in ranked], ax=ax, color="steelblue")
    ax.bar_label(ax.containers[0], fmt="%.1f", fontsize=8)
    ax.set(ylabel="test accuracy %", ylim=(0, 105), title="Per-class test accuracy")
    ax.tick_params(axis="x", rotation=30)
    return save(fig, path)


def hardware(device: torch.device) -> str:
    """What ran the numbers, e.g. 'NVIDIA H100 80GB HBM3' or 'CPU: Intel(R) Xeon(R) Processor, 2 cores'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {model}, {os.cpu_count()} cores"
