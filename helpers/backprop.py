"""Training: plain train/test epochs a student can copy, and `fit`, which adds the modern recipe.

Recipe (helpers/recipe.py; all chosen before looking at the test set, which only ever gets reported):
  SGD + Nesterov momentum 0.9, weight decay on conv/linear weights (not on BN or biases), one-cycle
  learning rate (linear up, linear down) stepped every batch, label smoothing 0.1, channels_last memory,
  resumable checkpoints after every epoch. The precision (bf16, fp16 + GradScaler or fp32) is chosen
  per machine by `precision_policy`. Any optimizer and scheduler can replace SGD and the one-cycle.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .dataset import CIFAR10_MEAN, CIFAR10_STD, CLASSES, check_images, model_input, normalize
from .recipe import RECIPE

CPU = torch.device("cpu")
PROGRESS_EVERY = 20  # batches between progress-bar updates and divergence checks: each one waits for the GPU

OptimizerArg = torch.optim.Optimizer | Callable[[nn.Module], torch.optim.Optimizer] | None
SchedulerArg = torch.optim.lr_scheduler.LRScheduler | Callable[[torch.optim.Optimizer, int], Any] | None


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, is not a checkpoint, or belongs to another run."""


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite: the weights are garbage from that step on."""


def progress(iterable: Any, desc: str) -> Any:
    """A live progress bar (a widget in Jupyter) for a person watching; none with TQDM_DISABLE=1.

    tqdm.auto's notebook bars ignore that variable, so it is read here: headless runs and the committed
    notebook set it and keep only the per-epoch lines, which read well as text on GitHub.
    """
    return tqdm(iterable, desc=desc, leave=False, disable=os.environ.get("TQDM_DISABLE", "0") not in ("", "0"))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA); make_loaders then derives the augmentation seeds from it."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device() -> torch.device:
    """A CUDA GPU, else an Apple GPU (mps), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """How a device trains: the autocast dtype (None: fp32), whether fp16 needs a GradScaler, and why."""

    dtype: torch.dtype | None
    reason: str

    @property
    def scaled(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return self.dtype == torch.float16

    def __str__(self) -> str:
        name = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}.get(self.dtype, "fp32")
        return f"{name}: {self.reason}"


def _cpu_has(check: str) -> bool:
    """torch.cpu's instruction-set checks (torch >= 2.3); False on builds that lack them."""
    probe = getattr(torch.cpu, check, None)
    return bool(probe and probe())


def precision_policy(device: torch.device) -> Precision:
    """The one place that decides precision per machine (README's table; a test fakes each row)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return Precision(torch.bfloat16, f"{name} (compute capability {major}.{minor}) has bf16 tensor cores")
        if major == 7:
            return Precision(
                torch.float16, f"{name} (compute capability {major}.{minor}) has fp16 but no bf16 tensor cores"
            )
        return Precision(None, f"{name} (compute capability {major}.{minor}) has no tensor cores")
    if device.type == "mps":
        # Not measured (no Mac in this project): fp32 is the setting known to train correctly there.
        return Precision(None, "Apple GPU: mixed precision not measured here, fp32 is the safe choice")
    if _cpu_has("_is_amx_tile_supported"):
        return Precision(torch.bfloat16, "this CPU has AMX bf16 units")
    if _cpu_has("_is_avx512_bf16_supported"):
        return Precision(torch.bfloat16, "this CPU has AVX512-BF16 instructions")
    return Precision(None, "this CPU has no bf16 units (AMX or AVX512-BF16): emulated bf16 is slower than fp32")


def grad_scaler(device: torch.device, precision: Precision) -> torch.amp.GradScaler | None:
    """A GradScaler where the precision needs one (fp16), else None."""
    if not precision.scaled:
        return None
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision at `dtype` on `device`, or nothing for fp32 (dtype None)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any | None = None) -> None:
    """Backward and update; with fp16's GradScaler, scale the loss so small gradients survive, unscale to step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def train(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    device: torch.device = CPU,
    dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    scaler: Any | None = None,
    desc: str = "train",
) -> tuple[float, float]:
    """One epoch of training; returns (mean loss, accuracy %). A scheduler, if given, steps every batch.

    Raises DivergedError (with step and learning rate) as soon as the loss is NaN or infinite.
    """
    model.train()
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per batch
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)  # first step with a non-finite loss
    seen, lrs = 0, []
    bar = progress(loader, desc)
    for step, (images, labels) in enumerate(bar, 1):
        x = model_input(images.to(device, non_blocking=True), loader)
        y = labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer_step(loss, optimizer, scaler)
        lrs.append(optimizer.param_groups[0]["lr"])
        if scheduler is not None:
            scheduler.step()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if step % PROGRESS_EVERY == 0 or step == len(loader):
            if first_bad.item() > 0:
                bad = first_bad.item()
                raise DivergedError(
                    f"{desc}: the loss became NaN or infinite at step {bad} of {len(loader)} (lr {lrs[bad - 1]:.4g}); "
                    "nothing from this epoch was saved. Try a lower peak learning rate, or check the inputs for NaN."
                )
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.2f}")
    return loss_sum.item() / seen, 100 * correct.item() / seen


@torch.no_grad()
def test(
    model: nn.Module, loader: DataLoader, device: torch.device, dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """Loss (plain cross-entropy) and accuracy % on a held-out loader; never used to steer training."""
    logits, labels = predict(model, loader, device, dtype)
    return F.cross_entropy(logits, labels).item(), 100 * (logits.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, dtype: torch.dtype | None = None, desc: str = "test"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, labels) on the CPU for a whole loader, in its order: for metrics and galleries."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in progress(loader, desc):
        with autocast(device, dtype):
            logits = model(model_input(images.to(device, non_blocking=True), loader))
        all_logits.append(logits.float())
        all_labels.append(labels)
    return torch.cat(all_logits).cpu(), torch.cat(all_labels)


def make_optimizer(
    model: nn.Module,
    lr: float = RECIPE.max_lr,
    weight_decay: float = RECIPE.weight_decay,
    momentum: float = RECIPE.momentum,
) -> torch.optim.SGD:
    """SGD with Nesterov momentum; decay only conv/linear weights (decaying BN scales just fights BN)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = RECIPE.warmup_fraction
) -> torch.optim.lr_scheduler.LambdaLR:
    """One cycle, stepped per batch: linear warm-up from lr/10 over the first quarter, linear decay to 0."""
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class LRRangeTest:
    """Learning rates tried (exponentially increasing, one per batch) and the smoothed loss at each."""

    lrs: list[float]
    losses: list[float]

    @property
    def steepest(self) -> float:
        """The lr where the smoothed loss falls fastest (per log-lr step), before its lowest point.

        Past the lowest point the loss climbs and, for classification, often sinks again at absurd rates:
        that descent is not learning, so it is not searched.
        """
        lowest = int(np.argmin(self.losses))
        slopes = np.gradient(np.array(self.losses[: lowest + 1]), np.log(np.array(self.lrs[: lowest + 1])))
        skip = min(lowest, max(1, len(self.losses) // 10))  # the first steps are noise around the starting loss
        return float(self.lrs[skip + int(np.argmin(slopes[skip:]))])

    @property
    def minimum(self) -> float:
        """The lr of the lowest smoothed loss: beyond it training diverges, so useful peaks lie at or below it."""
        return float(self.lrs[int(np.argmin(self.losses))])


def lr_range_test(
    model: nn.Module,
    loader: DataLoader,
    optimizer: OptimizerArg = None,
    start_lr: float = 1e-4,
    end_lr: float = 10.0,
    steps: int = 100,
    device: torch.device | None = None,
    precision: Precision | None = None,
    smoothing: float = 0.9,
) -> LRRangeTest:
    """Leslie Smith's LR range test on a copy of `model`: raise the lr exponentially every batch, record the loss.

    Stops early once the smoothed loss exceeds 4x its best (divergence). The model itself is untouched.
    Own code rather than torch-lr-finder: it reads this kit's uint8 batches and precision policy directly.
    """
    device = device or pick_device()
    precision = precision or precision_policy(device)
    probe = copy.deepcopy(model).to(device, memory_format=torch.channels_last)
    opt = (
        make_optimizer(probe, start_lr) if optimizer is None else optimizer(probe) if callable(optimizer) else optimizer
    )
    scaler = grad_scaler(device, precision)
    gamma = (end_lr / start_lr) ** (1 / max(1, steps - 1))
    lrs, losses, average, best = [], [], 0.0, math.inf
    batches = iter(())
    probe.train()
    for step in range(steps):
        try:
            images, labels = next(batches)
        except StopIteration:  # small loaders are cycled
            batches = iter(loader)
            images, labels = next(batches)
        lr = start_lr * gamma**step
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(device, precision.dtype):
            loss = F.cross_entropy(probe(model_input(images.to(device), loader)), labels.to(device))
        optimizer_step(loss, opt, scaler)
        value = loss.item()
        if not math.isfinite(value):
            break
        average = smoothing * average + (1 - smoothing) * value
        smoothed = average / (1 - smoothing ** (step + 1))  # bias-corrected running mean
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > 4 * best:
            break
    return LRRangeTest(lrs, losses)


def _rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, in tensors and ints (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> None:
    """write(tmp_path) then rename: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, **state: Any) -> None:
    """Save atomically: a crash mid-save leaves the previous checkpoint whole, never half a file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(state, tmp))


CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "history", "run", "rng", "epoch"}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by fit, with an error that says what the file is when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable checkpoint of this kit ({type(err).__name__}: {err}); "
            "delete it to start the run from scratch."
        ) from err
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} is a weights file (a state_dict), not a checkpoint: load it with model.load_model."
        )
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        what = (
            f"a dict without {sorted(CHECKPOINT_KEYS - state.keys())}"
            if isinstance(state, dict)
            else f"a {type(state).__name__}"
        )
        raise CheckpointError(f"{path} holds {what}, not a checkpoint of this kit; delete it or pass another path.")
    return state


def run_signature(
    model: nn.Module, train_loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler: Any, **settings: Any
) -> dict[str, Any]:
    """Everything that decides a run, as plain values: a checkpoint resumes only the run it came from."""
    sampler = train_loader.batch_sampler
    return {
        **settings,
        "network": repr(model),  # layers and widths
        "train_images": len(train_loader.dataset),
        "batch_size": getattr(sampler, "batch_size", None),
        "seed": getattr(sampler, "seed", None),
        "augmentations": repr(getattr(train_loader.dataset, "transform", None)),
        "optimizer": type(optimizer).__name__,  # and every hyperparameter of every group, as set at the start:
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
    }


@dataclass
class FitResult:
    """What fit hands back: one dict per epoch (lr: the one the epoch began with), the final test logits and labels."""

    history: list[dict[str, float]]
    logits: torch.Tensor
    labels: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        """The final model's predicted class for every test image, in the test loader's order."""
        return self.logits.argmax(1)


def _check_finite(model: nn.Module, where: str) -> None:
    """Refuse to save or report a model whose weights or BatchNorm statistics hold NaN or inf."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise DivergedError(
            f"{where}: {len(bad)} tensors hold NaN/inf (first: {bad[0]}); nothing was saved. Try a lower learning rate."
        )


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    epochs: int = RECIPE.epochs,
    max_lr: float = RECIPE.max_lr,
    optimizer: OptimizerArg = None,
    scheduler: SchedulerArg = make_scheduler,
    label_smoothing: float = RECIPE.label_smoothing,
    device: torch.device | None = None,
    precision: Precision | None = None,
    channels_last: bool = True,
    checkpoint: str | Path | None = None,
    signature: dict[str, Any] | None = None,
) -> FitResult:
    """Train for `epochs`, evaluating after each; returns the history and the final epoch's test predictions.

    Defaults are S9's recipe: SGD (make_optimizer) at peak `max_lr` with the one-cycle (make_scheduler).
    optimizer: an optimizer or a factory model -> optimizer (then max_lr is unused); scheduler: a
    scheduler or a factory (optimizer, total_steps) -> scheduler, stepped every batch, or None for a
    constant lr. precision: default precision_policy(device).
    With `checkpoint`, the state is saved there after every epoch and a run finds it and resumes, but only a
    run with the same network, data, augmentations, seed, optimizer and schedule, plus whatever `signature`
    adds (train.run adds the whole recipe).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    device = device or pick_device()
    precision = precision or precision_policy(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # two batch shapes (full, last): autotune each once, then run the fastest
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if optimizer is None:
        optimizer = make_optimizer(model, max_lr)
    elif callable(optimizer):
        optimizer = optimizer(model)
    if callable(scheduler):
        scheduler = scheduler(optimizer, epochs * len(train_loader))
    scaler = grad_scaler(device, precision)
    settings = {**(signature or {}), "epochs": epochs, "label_smoothing": label_smoothing}
    run = run_signature(model, train_loader, optimizer, scheduler, **settings, steps_per_epoch=len(train_loader))
    history: list[dict[str, float]] = []
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint)
        if state["run"] != run:
            changed = sorted(k for k in run.keys() | state["run"].keys() if run.get(k) != state["run"].get(k))
            raise CheckpointError(
                f"{checkpoint} belongs to another run (differs in: {', '.join(changed)}); delete it or match it."
            )
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(f"{checkpoint} holds weights of another network: {err}") from err
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = state["history"]
        _set_rng_state(state["rng"])
        tqdm.write(f"resuming from {checkpoint}: {len(history)} of {epochs} epochs done")
    sampler = train_loader.batch_sampler
    logits = labels = None
    for epoch in range(len(history) + 1, epochs + 1):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # batch order and augmentations are a function of (seed, epoch)
        start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train(
            model,
            train_loader,
            optimizer,
            scheduler,
            device,
            precision.dtype,
            label_smoothing,
            scaler,
            desc=f"epoch {epoch}/{epochs}",
        )
        train_seconds = time.perf_counter() - start
        _check_finite(model, f"epoch {epoch}")
        logits, labels = predict(model, test_loader, device, precision.dtype)
        if not torch.isfinite(logits).all():
            raise DivergedError(
                f"epoch {epoch}: the test logits hold NaN/inf; nothing was saved. Try a lower learning rate."
            )
        history.append(
            {
                "epoch": epoch,
                "lr": lr,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "test_loss": F.cross_entropy(logits, labels).item(),
                "test_acc": 100 * (logits.argmax(1) == labels).float().mean().item(),
                "train_seconds": train_seconds,
                "seconds": time.perf_counter() - start,
            }
        )
        h = history[-1]
        tqdm.write(
            f"epoch {epoch:>3}/{epochs}  lr {h['lr']:.4f}  train {train_loss:.3f} / {train_acc:.2f}%  "
            f"test {h['test_loss']:.3f} / {h['test_acc']:.2f}%  {train_seconds:.1f}s"
        )
        if checkpoint is not None:
            save_checkpoint(
                checkpoint,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict() if scheduler is not None else {},
                scaler=scaler.state_dict() if scaler is not None else {},
                epoch=epoch,
                history=history,
                run=run,
                rng=_rng_state(),
            )
    if logits is None:  # resumed a finished run: evaluate the restored weights once
        logits, labels = predict(model, test_loader, device, precision.dtype)
    return FitResult(history, logits, labels)


@torch.no_grad()
def classify(
    model: nn.Module,
    image: np.ndarray | str | Path,
    classes: tuple[str, ...] = CLASSES,
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
) -> tuple[str, dict[str, float]]:
    """One uint8 H x W x C image (or an image file) -> (predicted class, probability of each class).

    Runs in eval mode (and restores the model's mode): BatchNorm must use its running statistics.
    """
    if isinstance(image, (str, Path)):
        from PIL import Image  # torchvision's dependency; only needed for files

        image = np.asarray(Image.open(image).convert("RGB" if len(mean) == 3 else "L"))
        image = image[..., None] if image.ndim == 2 else image
    check_images(image[None])
    p = next(model.parameters())
    was_training = model.training
    try:
        x = normalize(torch.tensor(image[None], device=p.device), mean, std).to(p.dtype)
        probabilities = model.eval()(x).float().softmax(1)[0].cpu()
    finally:
        model.train(was_training)
    return classes[int(probabilities.argmax())], {c: float(v) for c, v in zip(classes, probabilities)}
