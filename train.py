"""Train Net on CIFAR-10 headless and write the evidence: `python3 train.py` (`--help` for the options).

The run reads top to bottom, like nanoGPT's train.py: settings, data, network, then the epoch loop in plain view
(resume or start; each epoch `train`, `test`, one printed line, a checkpoint), then the final scores and the
record: training_logs.md and, under the results folder, metrics.json (the whole recipe included), the plots
and s9_net.pt (a state_dict that Net() loads). The same command, run again, resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import difflib
import math
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

CHECKPOINT_NAME = "checkpoint.pt"  # the default checkpoint, inside the results folder (ignored by git)


def _whole_number(lowest: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= lowest, or one message that says so (for words and for numbers)."""

    def parse(text: str) -> int:
        if not text.strip().lstrip("-").isdigit() or int(text) < lowest:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {lowest}, got {text!r}")
        return int(text)

    return parse


def _learning_rate(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    """Every option; a recipe's own numbers are the defaults of --epochs, --batch-size, --lr and --seed."""
    p = argparse.ArgumentParser(
        prog="python3 train.py",
        allow_abbrev=False,  # --epoch is a typo, not --epochs
        description=__doc__.splitlines()[0],
        epilog="Data: CIFAR-10 is read from $CIFAR10_ROOT (default ./data; it must hold cifar-10-batches-py/) "
        "and downloaded there once when online. The notebook's quick switch is S9_QUICK=1; here it is --quick.",
    )
    p.add_argument("--recipe", choices=("shipped", "speed"), default="shipped", help="default: %(default)s")
    p.add_argument("--epochs", type=_whole_number(1), help="default: the recipe's; 1 with --quick")
    p.add_argument("--batch-size", type=_whole_number(1), help="images per step (default: the recipe's)")
    p.add_argument("--lr", type=_learning_rate, help="peak learning rate of the one-cycle (default: the recipe's)")
    p.add_argument(
        "--seed", type=_whole_number(0), help="seeds the first weights and the loaders (default: the recipe's)"
    )
    p.add_argument("--quick", action="store_true", help="512 train / 256 test images, 1 epoch: the path in a minute")
    p.add_argument(
        "--workers", type=_whole_number(0), help="loader workers (default: cores - 1 on a CPU, all on a GPU)"
    )
    p.add_argument("--out", help="results folder (default: Results, or Results/quick with --quick)")
    p.add_argument(
        "--checkpoint", help=f"resume from / save to this file (default: OUT/{CHECKPOINT_NAME}, removed at the end)"
    )
    return p


def settings(argv: list[str]) -> tuple[argparse.Namespace, Path, Path]:
    """The options, the results folder and the checkpoint: every check that needs no torch, answered at once
    (exit 2, as argparse's own refusals), so a folder that cannot be written fails now and not after the run."""
    p = parser()
    a, unknown = p.parse_known_args(argv)
    if unknown:  # argparse's own refusal, with the option the typo meant
        close = difflib.get_close_matches(unknown[0].split("=")[0], p._option_string_actions, n=1)
        p.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean {close[0]}?" if close else ""))
    out = Path(a.out or ("Results/quick" if a.quick else "Results"))
    checkpoint = Path(a.checkpoint or out / CHECKPOINT_NAME)
    for folder in dict.fromkeys((out, checkpoint.parent)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder):
                pass
        except OSError as err:
            print(f"error: cannot write to {folder.resolve()} ({err.strerror}); choose another folder", file=sys.stderr)
            raise SystemExit(2) from err
    return a, out, checkpoint


if __name__ == "__main__":
    settings(sys.argv[1:])  # bad input and --help are answered here, before torch loads (that takes seconds)

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from helpers.backprop import DivergedError, epoch_line, test, train  # noqa: E402
from helpers.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from helpers.dataset import DatasetNotFoundError, cifar10, make_loaders  # noqa: E402
from helpers.device import precision_policy  # noqa: E402
from helpers.measure import layer_table, rules_report  # noqa: E402
from helpers.model import Net  # noqa: E402
from helpers.recipe import RECIPE, SPEED_RECIPE, TARGET_ACCURACY  # noqa: E402
from helpers.results import accuracy_line, write_results  # noqa: E402
from helpers.utils import plot_confusion_matrix, plot_gradcam, plot_history  # noqa: E402


def train_epochs(model, recipe, train_loader, test_loader, *, precision, checkpoint, config):
    """The epoch loop: resume or start, then each epoch train, test, print and checkpoint; returns the history."""
    dtype, scaler = precision.dtype, precision.grad_scaler()  # a GradScaler for fp16 only
    optimizer = recipe.optimizer(model)
    schedule = recipe.schedule(optimizer, steps_per_epoch=len(train_loader))
    states = {"model": model, "optimizer": optimizer, "scheduler": schedule, "scaler": scaler}
    history = load_checkpoint(checkpoint, config=config, **states)
    for h in history:
        print(epoch_line(h, recipe.epochs, config["evaluated_on"]) + "  (restored)")
    for epoch in range(len(history) + 1, recipe.epochs + 1):
        train_loader.sampler.set_epoch(epoch)  # batches and augmentations come from (seed, epoch): resumes exactly
        start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train(
            model,
            train_loader,
            optimizer,
            scheduler=schedule,
            scaler=scaler,
            dtype=dtype,
            label_smoothing=recipe.label_smoothing,
        )
        train_seconds = time.perf_counter() - start
        test_loss, test_acc = test(model, test_loader, dtype=dtype)
        history.append(
            {"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss}
            | {"test_acc": test_acc, "train_seconds": train_seconds, "seconds": time.perf_counter() - start}
            | {"machine": precision.machine}  # a run resumed on another machine says where each epoch ran
        )
        print(epoch_line(history[-1], recipe.epochs, config["evaluated_on"]), flush=True)
        save_checkpoint(checkpoint, config=config, history=history, **states)
    return history


def run(recipe, out: Path, checkpoint: Path, *, quick: bool, workers: int | None, source: str) -> dict:
    """Seed, load, build, train, score the final model and write the record; return the metrics."""
    torch.manual_seed(recipe.seed)  # the network's first weights; the loaders seed their own draws
    precision = precision_policy()  # chosen once: fp16 + GradScaler on a T4, bf16 where native, else fp32
    torch.backends.cudnn.benchmark = True  # few batch shapes on a GPU: tuned once, then the fastest kernels
    data = cifar10()
    if quick:
        data = data.subsample(seed=recipe.seed)  # 512 train / 256 test images
    augment = recipe.augmentations(data.mean)
    train_loader, test_loader = make_loaders(
        data,
        batch_size=recipe.batch_size,
        augment=augment,
        seed=recipe.seed,
        device=precision.device,
        num_workers=workers,
    )
    model = Net(recipe.widths).fit_whitening(data)  # the frozen first layer, from train images
    model.to(precision.device, memory_format=torch.channels_last)  # the layout the convolutions prefer
    print(f"on {precision.hardware}; precision: {precision}\n{layer_table(model)}\n{rules_report(model)}")
    config = recipe.run_config(data, quick=quick)
    history = train_epochs(
        model, recipe, train_loader, test_loader, precision=precision, checkpoint=checkpoint, config=config
    )
    _, _, predictions = test(model, test_loader, dtype=precision.dtype, predictions=True)
    _, tta_accuracy = test(model, test_loader, dtype=precision.dtype, tta=True)  # flip TTA, beside the plain number
    for figure in (
        plot_history(
            history, target=TARGET_ACCURACY, train_loss_floor=recipe.train_loss_floor(), path=out / "curves.png"
        ),
        plot_confusion_matrix(data.test_labels, predictions, classes=data.classes, path=out / "confusion_matrix.png"),
        plot_gradcam(model, data, predictions=predictions, layer=model.c4, path=out / "gradcam.png"),
    ):
        plt.close(figure)
    return write_results(out, model=model, config=config, history=history, tta_accuracy=tta_accuracy, source=source)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: library errors become one message and exit code 2, Ctrl-C says how to resume."""
    argv = sys.argv[1:] if argv is None else argv
    a, out, checkpoint = settings(argv)
    base = SPEED_RECIPE if a.recipe == "speed" else RECIPE
    chosen = {
        "epochs": a.epochs or (1 if a.quick else None),
        "batch_size": a.batch_size,
        "max_lr": a.lr,
        "seed": a.seed,
    }
    recipe = replace(base, **{k: v for k, v in chosen.items() if v is not None})  # the chosen recipe's defaults
    try:
        m = run(
            recipe, out, checkpoint, quick=a.quick, workers=a.workers, source="python3 train.py " + shlex.join(argv)
        )
    except (DatasetNotFoundError, CheckpointError, DivergedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nstopped; the finished epochs are in {checkpoint}. Resume with:\n  python3 train.py {shlex.join(argv)}",
            file=sys.stderr,
        )
        return 130
    if a.checkpoint is None:  # the results now hold everything the default checkpoint did but the optimizer state
        checkpoint.unlink(missing_ok=True)
    if out == Path("Results"):  # the committed run's log also sits at the top of the repository
        shutil.copyfile(out / "training_logs.md", "training_logs.md")
    print(f"final epoch test accuracy {accuracy_line(m)}, {m['params']:,} parameters; wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
