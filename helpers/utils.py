"""Pictures for the notebook and the logs: sample grids, curves, LR range test, mistakes, GradCAM, confusion.

Every plot takes the class names (CIFAR-10's by default) and says only what the caller's run is.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path

import albumentations as A
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch
import torch.nn as nn

from .dataset import CIFAR10_MEAN, CIFAR10_STD, CLASSES, normalize, seed_pipeline
from .lr_finder import LRRangeTest


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


def _show(ax: plt.Axes, image: np.ndarray) -> None:
    """imshow for uint8 H x W x C images, grayscale (C = 1) included; nearest: crisp pixels, small PNGs."""
    gray = image.shape[-1] == 1
    ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, interpolation="nearest")


def _names(labels: Sequence[int], classes: Sequence[str]) -> list[str]:
    """Class names of integer labels, with a clear error when the names do not cover the labels."""
    labels = [int(v) for v in labels]
    if labels and max(labels) >= len(classes):
        raise ValueError(
            f"label {max(labels)} but only {len(classes)} class names: pass classes= (e.g. loader.dataset.classes)"
        )
    return [classes[v] for v in labels]


def plot_samples(
    images: np.ndarray,
    labels: Sequence[int],
    *,
    classes: Sequence[str] = CLASSES,
    count: int = 20,
    columns: int = 10,
    path: str | Path | None = None,
) -> plt.Figure:
    """The first `count` uint8 images with their class names: what the network is asked to tell apart."""
    fig, axes = _grid(count, columns)
    for ax, image, name in zip(axes.flat, images[:count], _names(labels[:count], classes)):
        _show(ax, image)
        ax.set_title(name, fontsize=9)
    fig.suptitle("Training images")
    return save(fig, path)


def plot_augmentations(
    images: np.ndarray,
    augment: A.BaseCompose | Sequence[A.BasicTransform],
    *,
    draws: int = 7,
    seed: int | None = None,
    path: str | Path | None = None,
) -> plt.Figure:
    """Each uint8 image (a row) then `draws` passes of the train augmentations (seeded as the loaders seed them)."""
    pipeline = augment if isinstance(augment, A.BaseCompose) else A.Compose(list(augment))
    if seed is not None:
        seed_pipeline(pipeline, seed)
    fig, axes = _grid(len(images) * (draws + 1), draws + 1)
    for row, image in enumerate(images):
        _show(axes[row, 0], image)
        axes[row, 0].set_title("original", fontsize=9)
        for col in range(1, draws + 1):
            _show(axes[row, col], pipeline(image=image)["image"])
            axes[row, col].set_title(f"draw {col}", fontsize=9)
    fig.suptitle("Train augmentations: " + ", ".join(type(t).__name__ for t in pipeline.transforms))
    return save(fig, path)


def plot_history(
    history: Sequence[dict[str, float]], *, target: float | None = None, path: str | Path | None = None
) -> plt.Figure:
    """Loss and accuracy per epoch, train beside test (the gap shows over- or under-fitting); `target` draws a bar."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-o"), ("test", "-s")):
        loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], style, label=split, markersize=3)
        acc_ax.plot(epochs, [h[f"{split}_acc"] for h in history], style, label=split, markersize=3)
    loss_ax.set(title="Loss (train: the loss optimized, on augmented images)", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.set(title=f"Accuracy (final test {history[-1]['test_acc']:.2f}%)", xlabel="epoch", ylabel="%")
    if target is not None:
        acc_ax.axhline(target, color="grey", linestyle=":", label=f"target: {target:g}%")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


def plot_lr_range_test(
    result: LRRangeTest, *, chosen_lr: float | None = None, path: str | Path | None = None
) -> plt.Figure:
    """Smoothed loss against learning rate (log scale), with the steepest-descent suggestion and `chosen_lr`."""
    fig, ax = plt.subplots(figsize=(7, 4))
    lowest = int(np.argmin(result.losses))
    # Past the lowest point the loss climbs back to where it started: the network is diverging, and whatever the
    # curve does after that (it can dip again) is noise of a broken network, so the plot stops there.
    n = len(result.losses)
    end = next((i + 1 for i in range(lowest + 1, n) if result.losses[i] >= result.losses[0]), n)
    ax.plot(result.lrs[:end], result.losses[:end])
    if result.descends:  # else there is no steepest descent to mark
        ax.axvline(
            result.steepest, color="tab:orange", linestyle="--", label=f"steepest descent: {result.steepest:.3g}"
        )
    ax.axvline(result.minimum, color="tab:red", linestyle=":", label=f"lowest loss: {result.minimum:.3g}")
    if chosen_lr is not None:
        ax.axvline(chosen_lr, color="tab:green", label=f"peak used: {chosen_lr:g}")
    top = result.losses[0] + 0.5 * (result.losses[0] - min(result.losses))  # the blow-up would flatten the fall
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss")
    ax.set_title("LR range test, drawn until the loss climbs back to where it started")
    ax.set_ylim(min(result.losses) - 0.1 * (top - min(result.losses)), top)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save(fig, path)


def misclassified(labels: torch.Tensor, predictions: torch.Tensor, count: int) -> list[int]:
    """Indices of the first `count` wrong predictions."""
    return torch.nonzero(predictions != labels).flatten()[:count].tolist()


def plot_misclassified(
    images: np.ndarray,
    labels: torch.Tensor,
    *,
    predictions: torch.Tensor,
    classes: Sequence[str] = CLASSES,
    count: int = 20,
    path: str | Path | None = None,
) -> plt.Figure:
    """The first `count` test images the model got wrong, with true and predicted class."""
    wrong = misclassified(labels, predictions, count)
    fig, axes = _grid(max(len(wrong), 1), 5, cell=2.0)
    for ax, i in zip(axes.flat, wrong):
        _show(ax, images[i])
        true, pred = _names([labels[i], predictions[i]], classes)
        ax.set_title(f"true: {true}\npred: {pred}", fontsize=9)
    fig.suptitle(f"{len(wrong)} misclassified test images")
    return save(fig, path)


def gradcam(
    model: nn.Module,
    images: np.ndarray,
    *,
    targets: Sequence[int],
    layer: nn.Module,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> np.ndarray:
    """GradCAM heatmaps (N x H x W, 0..1) of `targets` classes at `layer`, with the grad-cam package, in fp32.

    Runs on an fp32, eval-mode copy of the model (grad-cam fails under bf16), so the caller's model keeps
    its dtype, mode and device.
    """
    from pytorch_grad_cam import GradCAM  # noqa: PLC0415 - heavy (scikit-learn); only this function needs it
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: PLC0415

    if len(images) == 0:
        raise ValueError("no images to explain: GradCAM needs at least one")
    names = [name for name, module in model.named_modules() if module is layer]
    if not names:
        raise ValueError("`layer` must be a module of `model` (e.g. model.c4), which the forward pass runs")
    fp32_model = deepcopy(model).float().eval()
    device = next(fp32_model.parameters()).device
    x = normalize(torch.from_numpy(np.ascontiguousarray(images)).to(device), mean, std)
    # Not `with GradCAM(...)`: its __exit__ swallows an IndexError and the call then returns None.
    cam = GradCAM(model=fp32_model, target_layers=[fp32_model.get_submodule(names[0])])
    try:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    except IndexError as err:
        raise ValueError(
            f"GradCAM failed ({err}): every target class must be below the model's "
            f"{_num_outputs(fp32_model, x)} outputs, and `layer` must be a module the forward pass runs (e.g. model.c4)"
        ) from err
    finally:
        cam.activations_and_grads.release()


def _num_outputs(model: nn.Module, x: torch.Tensor) -> int:
    """How many class scores the model gives (for error messages)."""
    with torch.no_grad():
        return model(x[:1]).shape[-1]


def plot_gradcam(
    model: nn.Module,
    images: np.ndarray,
    *,
    labels: torch.Tensor,
    predictions: torch.Tensor,
    layer: nn.Module,
    classes: Sequence[str] = CLASSES,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    count: int = 10,
    path: str | Path | None = None,
) -> plt.Figure:
    """Misclassified images beside the GradCAM of the predicted class: where the network looked when wrong.

    With no mistakes, a figure that says so (and no GradCAM).
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image  # noqa: PLC0415

    wrong = misclassified(labels, predictions, count)
    if not wrong:
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no misclassified images among {len(labels)}: nothing to explain", ha="center")
        return save(fig, path)
    heatmaps = gradcam(
        model, images[wrong], targets=[int(predictions[i]) for i in wrong], layer=layer, mean=mean, std=std
    )
    rows = -(-len(wrong) // 2)  # two image + heatmap pairs per row, a gap column between them
    fig, axes = plt.subplots(rows, 5, figsize=(8, 2 * rows + 0.8), squeeze=False, width_ratios=[1, 1, 0.3, 1, 1])
    for ax in axes.flat:
        ax.axis("off")
    for k, (i, heatmap) in enumerate(zip(wrong, heatmaps)):
        image, (true, pred) = images[i], _names([labels[i], predictions[i]], classes)
        picture, cam = axes[k // 2, 3 * (k % 2)], axes[k // 2, 3 * (k % 2) + 1]
        _show(picture, image)
        picture.set_title(f"true: {true}", fontsize=9)
        rgb = np.repeat(image, 3, -1) if image.shape[-1] == 1 else image
        cam.imshow(show_cam_on_image(rgb / 255.0, heatmap, use_rgb=True), interpolation="nearest")
        cam.set_title(f"said: {pred}", fontsize=9)
    scale = plt.cm.ScalarMappable(cmap="jet", norm=plt.Normalize(0, 1))  # show_cam_on_image's colours
    fig.colorbar(
        scale, ax=axes, orientation="horizontal", fraction=0.04, pad=0.03, label="how much a region drove what it said"
    )
    fig.suptitle(f"{len(wrong)} misclassified test images, each beside the GradCAM of the class it said")
    return save(fig, path)


def confusion_matrix(
    labels: torch.Tensor, predictions: torch.Tensor, *, classes: Sequence[str] = CLASSES
) -> np.ndarray:
    """len(classes) x len(classes) counts: row = true class, column = predicted class."""
    n = len(classes)
    _names([*labels.tolist(), *predictions.tolist()], classes)
    labels, predictions = labels.cpu().numpy(), predictions.cpu().numpy()  # CUDA tensors have no .numpy()
    return np.bincount(labels * n + predictions, minlength=n * n).reshape(n, n)


def plot_confusion_matrix(
    labels: torch.Tensor, predictions: torch.Tensor, *, classes: Sequence[str] = CLASSES, path: str | Path | None = None
) -> plt.Figure:
    """Which classes are mistaken for which (numbers written in the cells for up to 20 classes)."""
    size = min(20, 4 + 0.45 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size * 0.8))
    sns.heatmap(
        confusion_matrix(labels, predictions, classes=classes),
        annot=len(classes) <= 20,
        fmt="d",
        cmap="Blues",
        cbar=len(classes) > 20,
        xticklabels=classes,
        yticklabels=classes,
        ax=ax,
    )
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix, test set")
    return save(fig, path)


def per_class_accuracy(
    labels: torch.Tensor, predictions: torch.Tensor, *, classes: Sequence[str] = CLASSES
) -> dict[str, float]:
    """Accuracy % of each class: the average hides which classes are still hard."""
    matrix = confusion_matrix(labels, predictions, classes=classes)
    return {name: 100 * matrix[i, i] / max(1, matrix[i].sum()) for i, name in enumerate(classes)}


def plot_per_class_accuracy(accuracy: dict[str, float], *, path: str | Path | None = None) -> plt.Figure:
    """Bar chart of per_class_accuracy, worst class first."""
    ranked = sorted(accuracy.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(max(8, 0.3 * len(ranked)), 3.5))
    sns.barplot(x=[k for k, _ in ranked], y=[v for _, v in ranked], ax=ax, color="steelblue")
    if len(ranked) <= 20:
        ax.bar_label(ax.containers[0], fmt="%.1f", fontsize=8)
    ax.set(ylabel="test accuracy %", ylim=(0, 105), title="Per-class test accuracy")
    ax.tick_params(axis="x", rotation=30 if len(ranked) <= 20 else 90)
    return save(fig, path)
