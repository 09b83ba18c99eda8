"""Pictures of a run: augmentations, curves, GradCAM of mistakes, confusion matrix; each says only what it is given."""

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

from .dataset import CIFAR10_MEAN, CIFAR10_STD, CLASSES, ImageData, normalize, seed_pipeline


def save(fig: plt.Figure, path: str | Path | None) -> plt.Figure:
    """Save a figure under its path (creating folders) when one is given; return it for display."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _show(ax: plt.Axes, image: np.ndarray, title: str, **style) -> None:
    """imshow for uint8 H x W x C images, grayscale (C = 1) included; nearest: crisp pixels, small PNGs."""
    gray = image.shape[-1] == 1
    ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, interpolation="nearest")
    ax.set_title(title, fontsize=9, **style)
    ax.axis("off")


def _names(labels: Sequence[int], classes: Sequence[str]) -> list[str]:
    """Class names of integer labels, with a clear error when the names do not cover the labels."""
    labels = [int(v) for v in labels]
    if labels and max(labels) >= len(classes):
        raise ValueError(
            f"label {max(labels)} but only {len(classes)} class names: pass classes= (e.g. loader.dataset.classes)"
        )
    return [classes[v] for v in labels]


def plot_augmentations(
    data: ImageData,
    augment: A.BaseCompose | Sequence[A.BasicTransform],
    *,
    count: int = 4,
    draws: int = 7,
    seed: int | None = None,
    path: str | Path | None = None,
) -> plt.Figure:
    """The first `count` training images, each (a row) then `draws` passes of the train augmentations, seeded as
    the loaders seed them: what the network is asked to tell apart, and what it trains on instead."""
    pipeline = augment if isinstance(augment, A.BaseCompose) else A.Compose(list(augment))
    if seed is not None:
        seed_pipeline(pipeline, seed)
    fig, axes = plt.subplots(count, draws + 1, figsize=((draws + 1) * 1.5, count * 1.75), squeeze=False)
    for row, (image, name) in enumerate(
        zip(data.train_images[:count], _names(data.train_labels[:count], data.classes))
    ):
        _show(axes[row, 0], image, name, fontweight="bold")
        for col in range(1, draws + 1):
            _show(axes[row, col], pipeline(image=image)["image"], f"draw {col}")
    fig.suptitle(
        "Training images (left) and the train augmentations: "
        + ", ".join(type(t).__name__ for t in pipeline.transforms)
    )
    return save(fig, path)


def plot_history(
    history: Sequence[dict[str, float]],
    *,
    target: float | None = None,
    train_loss_floor: float | None = None,
    path: str | Path | None = None,
) -> plt.Figure:
    """Loss and accuracy per epoch, train beside test (the gap shows over- or under-fitting); `target` draws a bar.

    The train loss is the loss optimized, on augmented images: with label smoothing it cannot fall below
    `train_loss_floor`, drawn as a line, so it may sit above the plain test loss all along."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-o"), ("test", "-s")):
        loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], style, label=split, markersize=3)
        acc_ax.plot(epochs, [h[f"{split}_acc"] for h in history], style, label=split, markersize=3)
    if train_loss_floor is not None:
        loss_ax.axhline(train_loss_floor, color="tab:blue", linestyle=":", label="train loss floor (label smoothing)")
    loss_ax.set(title="Loss (train: the loss optimized, on augmented images)", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.set(title=f"Accuracy (final test {history[-1]['test_acc']:.2f}%)", xlabel="epoch", ylabel="%")
    if target is not None:
        acc_ax.axhline(target, color="grey", linestyle=":", label=f"target: {target:g}%")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


def misclassified(labels: Sequence[int], predictions: torch.Tensor, count: int) -> list[int]:
    """Indices of the first `count` wrong predictions."""
    return torch.nonzero(predictions.cpu() != torch.as_tensor(labels).cpu()).flatten()[:count].tolist()


def gradcam(
    model: nn.Module,
    images: np.ndarray,
    *,
    targets: Sequence[int],
    layer: nn.Module,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> np.ndarray:
    """GradCAM heatmaps (N x H x W, 0..1) of `targets` classes at `layer`, with the grad-cam package; on an fp32,
    eval-mode copy of the model (grad-cam fails under bf16), so the caller's keeps its dtype, mode and device."""
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
            f"GradCAM failed ({err}): every target must be one of the model's output classes, "
            "and `layer` a module the forward pass runs (e.g. model.c4)"
        ) from err
    finally:
        cam.activations_and_grads.release()


def plot_gradcam(
    model: nn.Module,
    data: ImageData,
    *,
    predictions: torch.Tensor,
    layer: nn.Module,
    count: int = 10,
    path: str | Path | None = None,
) -> plt.Figure:
    """The first `count` misclassified test images, each beside the GradCAM of the class it said: where the network
    looked when wrong. With no mistakes, a figure that says so."""
    from pytorch_grad_cam.utils.image import show_cam_on_image  # noqa: PLC0415

    images, labels, wrong = data.test_images, data.test_labels, misclassified(data.test_labels, predictions, count)
    if not wrong:
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no misclassified images among {len(labels)}: nothing to explain", ha="center")
        return save(fig, path)
    targets = [int(predictions[i]) for i in wrong]
    heatmaps = gradcam(model, images[wrong], targets=targets, layer=layer, mean=data.mean, std=data.std)
    rows = -(-len(wrong) // 2)  # two image + heatmap pairs per row, a gap column between them
    fig, axes = plt.subplots(rows, 5, figsize=(8, 2 * rows + 0.8), squeeze=False, width_ratios=[1, 1, 0.3, 1, 1])
    for ax in axes.flat:
        ax.axis("off")
    for k, (i, heatmap) in enumerate(zip(wrong, heatmaps)):
        image, (true, said) = images[i], _names([labels[i], predictions[i]], data.classes)
        rgb = np.repeat(image, 3, -1) if image.shape[-1] == 1 else image
        _show(axes[k // 2, 3 * (k % 2)], image, f"true: {true}")
        _show(axes[k // 2, 3 * (k % 2) + 1], show_cam_on_image(rgb / 255.0, heatmap, use_rgb=True), f"said: {said}")
    scale = plt.cm.ScalarMappable(cmap="jet", norm=plt.Normalize(0, 1))  # show_cam_on_image's colours
    fig.colorbar(
        scale, ax=axes, orientation="horizontal", fraction=0.04, pad=0.03, label="how much a region drove what it said"
    )
    fig.suptitle(f"{len(wrong)} misclassified test images, each beside the GradCAM of the class it said")
    return save(fig, path)


def confusion_matrix(
    labels: Sequence[int], predictions: torch.Tensor, *, classes: Sequence[str] = CLASSES
) -> np.ndarray:
    """len(classes) x len(classes) counts: row = true class, column = predicted class."""
    n = len(classes)
    labels, predictions = torch.as_tensor(labels).cpu().numpy(), predictions.cpu().numpy()  # CUDA has no .numpy()
    _names([*labels.tolist(), *predictions.tolist()], classes)
    return np.bincount(labels * n + predictions, minlength=n * n).reshape(n, n)


def plot_confusion_matrix(
    labels: Sequence[int],
    predictions: torch.Tensor,
    *,
    classes: Sequence[str] = CLASSES,
    path: str | Path | None = None,
) -> plt.Figure:
    """Which classes are mistaken for which; each row is named with its class's accuracy, which the average hides."""
    matrix = confusion_matrix(labels, predictions, classes=classes)
    accuracy = 100 * matrix.diagonal() / matrix.sum(1).clip(min=1)
    size = min(20, 4 + 0.45 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size * 0.8))
    sns.heatmap(
        matrix,
        annot=len(classes) <= 20,  # numbers in the cells while they fit
        fmt="d",
        cmap="Blues",
        cbar=len(classes) > 20,
        xticklabels=classes,
        yticklabels=[f"{name} {a:.1f}%" for name, a in zip(classes, accuracy)],
        ax=ax,
    )
    ax.set(xlabel="predicted", ylabel="true (and its accuracy)", title="Confusion matrix, test set")
    return save(fig, path)
