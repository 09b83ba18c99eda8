"""Train Net on CIFAR-10 headless and write the evidence: `python3 train.py` (`--help` for the options).

Writes training_logs.md, and under the results folder metrics.json (the whole recipe included), the plots
and s9_net.pt (a state_dict that Net() loads). Settings are checked and every output folder proven writable
before any data is loaded; a checkpoint after every epoch makes an interrupted run resume when the same
command runs again, on this machine or another. Like nanoGPT's train.py: the library is in helpers/, this is the run.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from helpers.backprop import DivergedError, fit, seed_everything
from helpers.checkpoint import CheckpointError
from helpers.dataset import DatasetNotFoundError, cifar10, make_loaders, subsample
from helpers.device import hardware, pick_device, precision_policy
from helpers.measure import count_parameters, format_receptive_field, receptive_field, total_receptive_field
from helpers.recipe import QUICK_TEST_IMAGES, QUICK_TRAIN_IMAGES, RECIPE, SPEED_RECIPE, Recipe
from helpers.results import accuracy_line, save_plots, write_results

RECIPES = {"shipped": RECIPE, "speed": SPEED_RECIPE}
CHECKPOINT_NAME = "checkpoint.pt"  # the default checkpoint, inside the results folder (ignored by git)


class SettingsError(ValueError):
    """An output location that would fail the run later: refused before any work starts."""


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


def run(recipe: Recipe, out: Path, log: Path, checkpoint: Path, quick: bool, workers: int | None, source: str) -> dict:
    """Check outputs, seed, load, build, train, evaluate and write everything; return the metrics."""
    check_writable(out, log.parent, checkpoint.parent)
    seed_everything(recipe.seed)
    device = pick_device()
    data = cifar10()
    if quick:
        data = subsample(data, train_images=QUICK_TRAIN_IMAGES, test_images=QUICK_TEST_IMAGES, seed=recipe.seed)
    train_loader, test_loader = make_loaders(
        data,
        batch_size=recipe.batch_size,
        augment=recipe.augmentations(data.mean),
        seed=recipe.seed,
        device=device,
        num_workers=workers,
    )
    model = recipe.network(data)
    print(f"Net: {count_parameters(model):,} parameters, receptive field {total_receptive_field(model)}")
    print(f"on {hardware(device)}; precision: {precision_policy(device)}")
    print(format_receptive_field(receptive_field(model)))
    optimizer, schedule = recipe.optimizer_and_schedule(model, len(train_loader))
    result = fit(
        model,
        train_loader,
        test_loader,
        epochs=recipe.epochs,
        optimizer=optimizer,
        scheduler=schedule,
        label_smoothing=recipe.label_smoothing,
        device=device,
        checkpoint=checkpoint,
        config=recipe.record(),
        tta=True,
    )
    save_plots(result, test_loader.dataset.images, out)
    return write_results(model, result, recipe, out, log=log, source=source, quick=quick)


def _whole_number(lowest: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= lowest, or one message that says so (for words and for numbers)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lowest:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {lowest}, got {text!r}")
        return value

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
    """Every option with its default; the epilog names the environment variables."""
    p = argparse.ArgumentParser(
        prog="python3 train.py",
        description=__doc__.splitlines()[0],
        epilog="Data: CIFAR-10 is read from $CIFAR10_ROOT (default ./data; it must hold cifar-10-batches-py/) "
        "and downloaded there once when online. The notebook's quick switch is S9_QUICK=1; here it is --quick.",
    )
    p.add_argument("--recipe", choices=RECIPES, default="shipped", help="shipped or speed (default: %(default)s)")
    p.add_argument(
        "--epochs",
        type=_whole_number(1),
        default=None,
        help=f"default: the recipe's (shipped {RECIPE.epochs}, speed {SPEED_RECIPE.epochs}); 1 with --quick",
    )
    p.add_argument(
        "--batch-size", type=_whole_number(1), default=RECIPE.batch_size, help="images per step (default: %(default)s)"
    )
    p.add_argument(
        "--lr",
        type=_learning_rate,
        default=RECIPE.max_lr,
        help="peak learning rate of the one-cycle (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=_whole_number(0),
        default=RECIPE.seed,
        help="seeds python, numpy, torch and the loaders (default: %(default)s)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_TRAIN_IMAGES} train / {QUICK_TEST_IMAGES} test images, 1 epoch: checks the path in about a "
        "minute, proves nothing (default: off)",
    )
    p.add_argument(
        "--workers",
        type=_whole_number(0),
        default=None,
        help="loader workers (default: cores - 1 on the CPU, every core on a GPU)",
    )
    p.add_argument("--out", default=None, help="results folder (default: Results, or Results/quick with --quick)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help=f"resume from / save to this file (default: OUT/{CHECKPOINT_NAME}, deleted once the results are written)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: library errors become one message and exit code 2, Ctrl-C says how to resume."""
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)
    base = RECIPES[a.recipe]
    epochs = a.epochs or (1 if a.quick else base.epochs)
    recipe = replace(base, epochs=epochs, batch_size=a.batch_size, max_lr=a.lr, seed=a.seed)
    out = Path(a.out or ("Results/quick" if a.quick else "Results"))
    log = out / "training_logs.md" if a.quick or a.out else Path("training_logs.md")
    checkpoint = Path(a.checkpoint or out / CHECKPOINT_NAME)
    try:
        m: dict[str, Any] = run(
            recipe, out, log, checkpoint, a.quick, a.workers, "python3 train.py " + shlex.join(argv)
        )
    except (DatasetNotFoundError, CheckpointError, DivergedError, SettingsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nstopped. The epochs finished so far are in {checkpoint}; resume with:\n"
            f"  python3 train.py {shlex.join(argv)}",
            file=sys.stderr,
        )
        return 130
    if a.checkpoint is None:  # the results now hold everything the default checkpoint did but the optimizer state
        checkpoint.unlink(missing_ok=True)
    print(f"final epoch test accuracy {accuracy_line(m)}, {m['params']:,} parameters")
    print(f"wrote {out}/ and {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
