"""What each technique buys: `python -m tools.ablation` trains variants of the shipped configuration and writes
one table and one picture (Results/experiments/ablation/: ablation.md, ablation.png); docs/ablation.md reads them.

Every variant is the shipped recipe and Net with one change: a recipe field, or one kind of layer of Net
rebuilt as its classic alternative (stride-2 or max-pool downsampling, dense 3x3 convolutions, no skip
connections). All train on the same schedule, seeds and machine. Each finished run is saved at once
(runs/<variant>-seed<k>.json) and each run checkpoints every epoch, so an interrupted table resumes where it
stopped when the same command runs again. --quick: a few hundred images, one epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from helpers.backprop import test  # noqa: E402
from helpers.dataset import ImageData, cifar10, make_loaders  # noqa: E402
from helpers.device import precision_policy  # noqa: E402
from helpers.measure import count_parameters, measure  # noqa: E402
from helpers.model import ConvBNReLU, Net, PatchWhitening, Residual, SeparableConv  # noqa: E402
from helpers.recipe import RECIPE, Recipe  # noqa: E402
from tools.bench import step_rate  # noqa: E402
from train import train_epochs  # noqa: E402

SHRINKING = ("c1.4", "c2.1", "c3.1")  # Net's three dilated, unpadded convolutions: 31 -> 23 -> 15 -> 7


def geometry(block: nn.Module) -> tuple[int, int, int]:
    """(in channels, out channels, dilation) of a ConvBNReLU or SeparableConv."""
    convs = [m for m in block if isinstance(m, nn.Conv2d)]
    return convs[0].in_channels, convs[-1].out_channels, convs[0].dilation[0]


def rebuild(net: Net, names: list[str], make: Callable[[nn.Module], nn.Module]) -> Net:
    """Replace each named submodule of `net` by make(submodule)."""
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent), child, make(net.get_submodule(name)))
    return net


def strided(net: Net) -> Net:
    """The classic downsampling: each shrinking convolution becomes a 3x3 with stride 2 (31 -> 16 -> 8 -> 4)."""

    def make(block: nn.Module) -> nn.Module:
        new = type(block)(*geometry(block)[:2])
        next(m for m in new if isinstance(m, nn.Conv2d)).stride = (2, 2)
        return new

    return rebuild(net, list(SHRINKING), make)


def max_pooled(net: Net) -> Net:
    """Each shrinking convolution becomes a padded 3x3 followed by 2x2 max pooling (31 -> 15 -> 7 -> 3)."""
    return rebuild(net, list(SHRINKING), lambda b: nn.Sequential(type(b)(*geometry(b)[:2]), nn.MaxPool2d(2)))


def dense(net: Net) -> Net:
    """Every depthwise-separable convolution becomes a dense 3x3 of the same geometry."""
    names = [n for n, m in net.named_modules() if isinstance(m, SeparableConv)]
    return rebuild(net, names, lambda b: ConvBNReLU(*geometry(b)[:2], dilation=geometry(b)[2], padding=b[0].padding[0]))


def without_residuals(net: Net) -> Net:
    """Every skip connection dropped: x + f(x) becomes f(x)."""
    return rebuild(net, [n for n, m in net.named_modules() if isinstance(m, Residual)], lambda r: r.f)


def without_whitening(net: Net) -> Net:
    """C1 reads the pixels directly: its frozen 2x2 whitening and the ReLU after it dropped (the map stays 32x32)."""
    net.c1 = nn.Sequential(ConvBNReLU(3, net.c1[2][0].out_channels), *net.c1[3:])
    return net


def fit_whitening(model: nn.Module, data: Any) -> None:
    """Fit every PatchWhitening layer of `model` (a variant may have none) as the recipe fits Net's."""
    for layer in model.modules():
        if isinstance(layer, PatchWhitening):
            layer.fit(data)


@dataclass(frozen=True)
class Variant:
    """One change to the shipped configuration: recipe fields or a rebuilt network, and the S9 rule it breaks."""

    name: str
    breaks: str
    recipe: dict[str, Any] = field(default_factory=dict)
    network: Callable[[Net], Net] | None = None

    def applied_to(self, base: Recipe) -> Recipe:
        """The base recipe with this variant's fields changed."""
        return replace(base, **self.recipe)

    def net(self, base: Recipe = RECIPE) -> Net:
        """This variant's network, at the widths its recipe gives: one place builds it for training and timing."""
        net = Net(self.applied_to(base).widths)
        return self.network(net) if self.network else net


NO_AUGMENTATION = {"flip_p": 0.0, "shift_scale_rotate_p": 0.0, "coarse_dropout_p": 0.0}
VARIANTS = (
    Variant("shipped", "none"),
    Variant("stride-2 downsampling", "no stride > 1 (downsampling by dilated kernels)", network=strided),
    Variant("max-pool downsampling", "no MaxPooling (downsampling by dilated kernels)", network=max_pooled),
    Variant("dense 3x3 in C3/C4", "depthwise-separable conv; < 200k parameters", network=dense),
    Variant("no residual connections", "none", network=without_residuals),
    Variant("no augmentation", "the three albumentations transforms", recipe=NO_AUGMENTATION),
    Variant("no HorizontalFlip", "HorizontalFlip", recipe={"flip_p": 0.0}),
    Variant("no ShiftScaleRotate", "ShiftScaleRotate", recipe={"shift_scale_rotate_p": 0.0}),
    Variant("no CoarseDropout", "CoarseDropout", recipe={"coarse_dropout_p": 0.0}),
    Variant("no label smoothing", "none", recipe={"label_smoothing": 0.0}),
    Variant("no patch whitening", "none", network=without_whitening),
)
BY_NAME = {v.name: v for v in VARIANTS}


def slug(name: str) -> str:
    """A file name for a variant."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_file(runs: Path, variant: Variant, seed: int, suffix: str) -> Path:
    """Where one run of a variant keeps its record (.json) or checkpoint (.pt): one name for writing and resuming."""
    return runs / f"{slug(variant.name)}-seed{seed}{suffix}"


def train_variant(variant: Variant, base: Recipe, seed: int, data: Any, runs: Path) -> dict[str, Any]:
    """Train one variant for one seed (resuming its checkpoint if there is one) and return its row."""
    recipe = replace(variant.applied_to(base), seed=seed)
    torch.manual_seed(seed)
    precision = precision_policy()
    device = precision.device
    loaders = make_loaders(
        data, batch_size=recipe.batch_size, augment=recipe.augmentations(data.mean), seed=seed, device=device
    )
    model = variant.net(base)
    fit_whitening(model, data)
    model.to(device, memory_format=torch.channels_last)
    checkpoint = run_file(runs, variant, seed, ".pt")
    config = {**recipe.run_config(data), "variant": variant.name}
    history = train_epochs(model, recipe, *loaders, precision=precision, checkpoint=checkpoint, config=config)
    network = measure(model)
    row = {
        "variant": variant.name,
        "breaks": variant.breaks,
        "seed": seed,
        "evaluated_on": data.evaluation,  # "validation" with --validation: what recipe choices read
        "test_acc": history[-1]["test_acc"],
        "test_acc_tta": test(model, loaders[1], dtype=precision.dtype, tta=True)[1],
        "params": network.params,
        "macs": network.macs,
        "receptive_field": network.receptive_field,
        "seconds_per_epoch": statistics.mean(h["train_seconds"] for h in history),
        "epochs": recipe.epochs,
        "train_images": len(data.train_images),
        "test_images": len(data.test_images),
        "machine": precision.machine,
        "date": time.strftime("%Y-%m-%d"),
    }
    run_file(runs, variant, seed, ".json").write_text(json.dumps(row, indent=2, allow_nan=False) + "\n")
    checkpoint.unlink(missing_ok=True)  # the row holds what the table needs
    return row


def finished_row(path: Path, variant: Variant, base: Recipe, data: Any) -> dict[str, Any] | None:
    """The saved row of a run this command would train (None: not run yet); refuses, before any training, a row
    of another configuration under the same name (say, a variant's network before Net changed)."""
    if not path.exists():
        return None
    row = json.loads(path.read_text())
    expected = {
        "epochs": variant.applied_to(base).epochs,
        "train_images": len(data.train_images),
        "test_images": len(data.test_images),
        "evaluated_on": data.evaluation,
        "params": count_parameters(variant.net(base)),
    }
    differ = [k for k, v in expected.items() if row.get(k, "test" if k == "evaluated_on" else None) != v]
    if differ:
        raise SystemExit(
            f"{path} is a finished run of another configuration (it differs in: {', '.join(differ)}): "
            "pass another --out to train this one beside it"
        )
    return row


def train_speeds(names: list[str], batch_size: int, steps: int) -> dict[str, float]:
    """Train-step images/s of each variant's network, timed one after another in one quiet pass.

    The runs' own seconds per epoch depend on whatever else shared the machine while each ran; these do not.
    """
    p = precision_policy()
    return {name: step_rate(p, True, batch_size, steps, BY_NAME[name].net()) for name in names}


def table(rows: list[dict[str, Any]], speeds: dict[str, float], quick: bool) -> str:
    """The markdown table: one line per variant, accuracies averaged over its seeds."""
    first = rows[0]
    split = first.get("evaluated_on", "test")  # rows from before validation splits existed are test-set rows
    lines = [
        "# Ablation: what each technique buys",
        "",
        f"{'QUICK path check, not a result. ' if quick else ''}Every variant: the shipped recipe with one change, "
        f"{first['epochs']} epochs on {first['train_images']:,} train images, evaluated on {first['test_images']:,} "
        f"{split} images; seeds {sorted({r['seed'] for r in rows})}; final epoch, never the best. "
        f"{first['machine']}, {first['date']}.",
        "",
        f"| variant | S9 rule it breaks | {split} acc % | flip TTA % | parameters | MACs / image | receptive field "
        "| s / epoch in its run | train images/s, timed together |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        r = mine[0]
        acc = statistics.mean(m["test_acc"] for m in mine)
        tta = statistics.mean(m["test_acc_tta"] for m in mine)
        seconds = statistics.mean(m["seconds_per_epoch"] for m in mine)
        lines.append(
            f"| {name} | {r['breaks']} | {acc:.2f} | {tta:.2f} | {r['params']:,} | {r['macs'] / 1e6:.1f} M | "
            f"{r['receptive_field']} | {seconds:.1f} | {speeds[name]:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def picture(rows: list[dict[str, Any]], path: Path) -> None:
    """Each variant's accuracy minus the shipped one's, as horizontal bars around a zero line (shipped on top)."""
    names = list(dict.fromkeys(r["variant"] for r in rows))
    accs = {n: statistics.mean(r["test_acc"] for r in rows if r["variant"] == n) for n in names}
    base = accs.get("shipped", 0.0)
    deltas = [accs[n] - base for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(names) + 1.4))
    ax.barh(names[::-1], deltas[::-1], color=["tab:red" if d < 0 else "tab:green" for d in deltas[::-1]])
    ax.bar_label(ax.containers[0], labels=[f"{accs[n]:.2f}%" for n in names[::-1]], fontsize=8, padding=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.margins(x=0.25)
    first, split = rows[0], rows[0].get("evaluated_on", "test")
    ax.set(
        xlabel=f"final-epoch {split} accuracy minus the shipped network's ({base:.2f}%), points",
        title=f"Ablation: {first['epochs']} epochs on {first['train_images']:,} train images, seeds "
        f"{sorted({r['seed'] for r in rows})}, {first['date']}\n(a short schedule: it ranks techniques for short runs)",
    )
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    """The command line; no abbreviated options, so a typo is an error instead of another option."""
    p = argparse.ArgumentParser(
        prog="python -m tools.ablation",
        allow_abbrev=False,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=RECIPE.epochs, help="one schedule for every variant")
    p.add_argument("--train-images", type=int, default=None, help="a seeded subset of the train split (default: all)")
    p.add_argument("--batch-size", type=int, default=RECIPE.batch_size)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--validation",
        type=int,
        default=None,
        help="hold out this many training images and evaluate on them instead of the test set: for choosing recipes",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=[v.name for v in VARIANTS],
        choices=list(BY_NAME),
        help="the variants to train (default: all)",
    )
    p.add_argument("--out", default="Results/experiments/ablation", help="table, picture and the per-run records")
    p.add_argument("--quick", action="store_true", help="512 / 256 images, 1 epoch")
    return p


def evaluation_data(validation: int | None, train_images: int | None, quick: bool) -> ImageData:
    """CIFAR-10 as the variants see it: `validation` training images held out in place of the test set (one split
    for every variant and seed), then a seeded subset of the train split when asked."""
    data = cifar10()
    if validation:
        data = data.hold_out(validation, seed=0)
    if quick or train_images:
        data = data.subsample() if quick else data.subsample(train_images=train_images, test_images=None)
    return data


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    a = parser().parse_args(argv)
    base = replace(RECIPE, epochs=1 if a.quick else a.epochs, batch_size=a.batch_size)
    out, runs = Path(a.out), Path(a.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    data, rows = evaluation_data(a.validation, a.train_images, a.quick), []
    print(
        f"ablation on {precision_policy().hardware}: {len(a.variants)} variants x seeds {a.seeds} -> {out}/", flush=True
    )
    jobs = [(v, seed) for name, v in BY_NAME.items() if name in a.variants for seed in a.seeds]
    done = [finished_row(run_file(runs, v, seed, ".json"), v, base, data) for v, seed in jobs]
    for (variant, seed), row in zip(jobs, done):
        if row is not None:
            rows.append(row)
            print(f"== {variant.name}, seed {seed}: done before", flush=True)
            continue
        print(f"\n== {variant.name}, seed {seed}", flush=True)
        rows.append(train_variant(variant, base, seed, data, runs))
    print("\n== train speed of each network, timed together", flush=True)
    speeds = train_speeds(list(dict.fromkeys(r["variant"] for r in rows)), base.batch_size, 1 if a.quick else 5)
    (out / "ablation.md").write_text(table(rows, speeds, a.quick))
    picture(rows, out / "ablation.png")
    print("\n" + table(rows, speeds, a.quick), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
