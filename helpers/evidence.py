"""The whole proof on one machine: `python -m helpers.evidence` benchmarks, trains the shipped and the
speed configuration for three seeds each, executes the notebook, and writes one summary table.

Outputs go under Results/<hardware>/ (bench.md, shipped/seed*/, speed/seed*/, summary.md); the
notebook's full run rewrites S9.ipynb, Results/ and training_logs.md, the committed evidence. With
--copy-to (the GPU machine's $OUT) it also leaves there the summary, the executed notebook and one
archive of everything. --quick runs every step on a few hundred images, to test the path.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import bench, train, utils
from .backprop import pick_device, precision_policy
from .recipe import RECIPE, SPEED_RECIPE, Recipe

ROOT = Path(__file__).resolve().parents[1]  # the repository: S9.ipynb, Results/, training_logs.md
SEEDS = (0, 1, 2)
STEPS = ("bench", "shipped", "speed", "notebook")
NOTEBOOK_TIMEOUT_S = 3600  # per cell: the training cell of a full CPU run takes most of an hour


def hardware_slug(device: torch.device) -> str:
    """A folder name for this machine, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-amd-epyc-2-cores'."""
    return re.sub(r"[^a-z0-9]+", "-", utils.hardware(device).lower()).strip("-")


def run_seeds(name: str, recipe: Recipe, folder: Path, quick: bool) -> list[dict]:
    """Train `recipe` once per seed into folder/name/seed<k>/; return each run's metrics."""
    runs = []
    for seed in SEEDS:
        out = folder / name / f"seed{seed}"
        print(f"\n== {name} configuration, seed {seed}: {recipe.epochs} epochs -> {out}", flush=True)
        config = train.RunConfig(
            recipe=replace(recipe, seed=seed, epochs=1 if quick else recipe.epochs),
            quick=quick,
            results_dir=str(out),
            logs_path=str(out / "training_logs.md"),
            source=f"python -m helpers.evidence ({name}, seed {seed})",
        )
        runs.append(train.run(config))
    return runs


def summarize(name: str, runs: list[dict]) -> str:
    """One table row: final accuracy mean, spread and range over seeds, time to 85%, seconds per epoch."""
    finals = [m["final_test_acc"] for m in runs]
    reached = [m["seconds_to_85"] for m in runs if m["seconds_to_85"] is not None]
    per_epoch = [m["total_train_seconds"] / m["final_epoch"] for m in runs]
    spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
    to_85 = f"{statistics.mean(reached):.1f} s ({len(reached)}/{len(runs)} seeds)" if reached else "not reached"
    return (
        f"| {name} | {runs[0]['final_epoch']} | {statistics.mean(finals):.2f}% +- {spread:.2f} | "
        f"{min(finals):.2f} .. {max(finals):.2f} | {to_85} | {statistics.mean(per_epoch):.2f} | "
        f"{sum(m['total_seconds'] for m in runs) / len(runs):.0f} |"
    )


def execute_notebook(quick: bool) -> float:
    """Run S9.ipynb top to bottom in place (quick mode: the smoke run); return its wall seconds."""
    env = dict(os.environ, TQDM_DISABLE="1", S9_QUICK="1" if quick else "0")
    env.pop("MPLBACKEND", None)  # the notebook's own inline backend, so its figures are saved in it
    start = time.perf_counter()
    target = ["--output", "/tmp/S9.quick.ipynb"] if quick else ["--inplace"]
    command = "from nbclient.cli import main; main()"
    subprocess.run(
        [sys.executable, "-c", command, *target, "--timeout", str(NOTEBOOK_TIMEOUT_S), "S9.ipynb"],
        cwd=ROOT,
        env=env,
        check=True,
    )
    return time.perf_counter() - start


def _archived(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Everything but the per-seed weights (the archive must stay under $OUT's 16 MiB per file)."""
    return None if re.search(r"/seed\d+/.*\.pt$", info.name) else info


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m helpers.evidence", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="every step on a few hundred images: tests the path, proves nothing"
    )
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="which parts to run (default: all)")
    p.add_argument(
        "--results", default=str(ROOT / "Results"), help="the folder that gets <hardware>/ (default Results)"
    )
    p.add_argument("--copy-to", default=None, help="also leave summary, notebook and an archive here (the GPU's $OUT)")
    a = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # a log of per-epoch lines, not of redrawn bars
    device = pick_device()
    folder = Path(a.results) / (hardware_slug(device) + ("-quick" if a.quick else ""))
    folder.mkdir(parents=True, exist_ok=True)
    header = f"{utils.hardware(device)}, {precision_policy(device)}, torch {torch.__version__}"
    print(f"evidence on {header}\nsteps: {' '.join(a.steps)}; writing {folder}/", flush=True)
    rows, notes = [], []
    if "bench" in a.steps:
        print("\n== benchmark", flush=True)
        quick_bench = ["--loader-batches", "2", "--steps", "1", "--epoch-images", "256", "--batch-size", "64"]
        bench.main([*(quick_bench if a.quick else []), "--out", str(folder / "bench.md")])
    for name, recipe in (("shipped", RECIPE), ("speed", SPEED_RECIPE)):
        if name in a.steps:
            runs = run_seeds(name, recipe, folder, a.quick)
            rows.append(summarize(name, runs))
    if "notebook" in a.steps:
        print("\n== S9.ipynb", flush=True)
        notes.append(f"S9.ipynb executed top to bottom in {execute_notebook(a.quick):.0f} s.")
    summary = "\n".join(
        [
            f"# Evidence: {header}, {time.strftime('%Y-%m-%d')}",
            "",
            f"{'QUICK path check (a few hundred images): not a result. ' if a.quick else ''}"
            f"Seeds {', '.join(map(str, SEEDS))}; the final epoch's test accuracy, never the best; "
            "time to 85% counts training seconds only, per run the whole run with evaluation.",
            "",
            "| configuration | epochs | final acc, mean +- sd | min .. max | time to 85% | s per epoch | s per run |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            *notes,
            "",
        ]
    )
    (folder / "summary.md").write_text(summary)
    print("\n" + summary, flush=True)
    if a.copy_to:
        out = Path(a.copy_to)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "summary.md", out / "summary.md")
        with tarfile.open(out / "evidence.tar.gz", "w:gz") as archive:
            for path in (Path(a.results), ROOT / "training_logs.md", ROOT / "S9.ipynb"):
                archive.add(path, arcname=path.name, filter=_archived)
        print(f"copied summary.md and evidence.tar.gz to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
