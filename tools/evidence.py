"""The whole proof on one machine: `python -m tools.evidence` benchmarks, trains the shipped and the speed
configuration for three seeds each, executes the notebook, and writes one summary table.

Outputs go under Results/experiments/<hardware>/ (bench.md, shipped/seed*/, speed/seed*/, summary.md); the
notebook's full run rewrites S9.ipynb, Results/ and training_logs.md, the committed evidence. Each seed trains in a
process of its own (`python3 train.py`), so every seed pays the same start-up and cuDNN autotuning and is
timed alike. --copy-to DIR also leaves the summary and one archive of everything there. --quick runs every
step on a few hundred images, to test the path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from helpers.device import precision_policy

from . import bench

ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py, S9.ipynb, Results/, training_logs.md
SEEDS = (0, 1, 2)
STEPS = ("bench", "shipped", "speed", "notebook")
NOTEBOOK_TIMEOUT_S = 4 * 3600  # per cell: the training cell of a full CPU run takes hours


def hardware_slug(hardware: str) -> str:
    """A folder name for this machine, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-amd-epyc-2-cores'."""
    return re.sub(r"[^a-z0-9]+", "-", hardware.lower()).strip("-")


def run_seeds(name: str, folder: Path, quick: bool) -> list[dict]:
    """Train configuration `name` once per seed, each in its own process, into folder/name/seed<k>/."""
    runs = []
    for seed in SEEDS:
        out = folder / name / f"seed{seed}"
        print(f"\n== {name} configuration, seed {seed} -> {out}", flush=True)
        command = [sys.executable, "train.py", "--recipe", name, "--seed", str(seed), "--out", str(out)]
        subprocess.run(command + (["--quick"] if quick else []), cwd=ROOT, check=True)
        runs.append(json.loads((out / "metrics.json").read_text()))
    return runs


def summarize(name: str, runs: list[dict]) -> str:
    """One table row: final accuracy (plain and flip TTA) over seeds, time to 85%, seconds per epoch."""
    finals = [m["final_test_acc"] for m in runs]
    ttas = [m["final_test_acc_tta"] for m in runs]
    reached = [m["seconds_to_85"] for m in runs if m["seconds_to_85"] is not None]
    per_epoch = [m["total_train_seconds"] / m["final_epoch"] for m in runs]
    spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
    to_85 = f"{statistics.mean(reached):.1f} s ({len(reached)}/{len(runs)} seeds)" if reached else "not reached"
    return (
        f"| {name} | {runs[0]['final_epoch']} | {statistics.mean(finals):.2f}% +- {spread:.2f} | "
        f"{min(finals):.2f} .. {max(finals):.2f} | {statistics.mean(ttas):.2f}% | {to_85} | "
        f"{statistics.mean(per_epoch):.2f} | {sum(m['total_seconds'] for m in runs) / len(runs):.0f} |"
    )


def execute_notebook(quick: bool, copy_folder: Path) -> float:
    """Run S9.ipynb top to bottom in place (quick mode: into a copy in `copy_folder`); return its wall seconds."""
    env = dict(os.environ, S9_QUICK="1" if quick else "0")
    env.pop("MPLBACKEND", None)  # the notebook's own inline backend, so its figures are saved in it
    start = time.perf_counter()
    target = ["--output", str(copy_folder / "S9.quick.ipynb")] if quick else ["--inplace"]
    command = "from nbclient.cli import main; main()"
    subprocess.run(
        [sys.executable, "-c", command, *target, "--timeout", str(NOTEBOOK_TIMEOUT_S), "S9.ipynb"],
        cwd=ROOT,
        env=env,
        check=True,
    )
    return time.perf_counter() - start


def _archived(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Everything but the per-seed weights and checkpoints (the archive stays small)."""
    return None if re.search(r"(/seed\d+/.*\.pt|checkpoint\.pt)$", info.name) else info


def copy_to(out: Path, folder: Path, results: Path) -> None:
    """Leave the summary and one archive (Results/, training_logs.md, S9.ipynb) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "summary.md", out / "summary.md")
    with tarfile.open(out / "evidence.tar.gz", "w:gz") as archive:
        for path in (results, ROOT / "training_logs.md", ROOT / "S9.ipynb"):
            archive.add(path, arcname=path.name, filter=_archived)
    print(f"copied summary.md and evidence.tar.gz to {out}", flush=True)


def parser() -> argparse.ArgumentParser:
    """The command line; no abbreviated options, so a typo is an error instead of another option."""
    p = argparse.ArgumentParser(
        prog="python -m tools.evidence", allow_abbrev=False, description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="every step on a few hundred images: tests the path")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="which parts to run (default: all)")
    p.add_argument("--results", default=str(ROOT / "Results" / "experiments"), help="the folder that gets <hardware>/")
    p.add_argument("--copy-to", default=None, help="also leave the summary and an archive of everything here")
    return p


def summary_text(header: str, rows: list[str], notes: list[str], quick: bool) -> str:
    """summary.md: what ran and how it is counted, then one row per configuration."""
    return "\n".join(
        [
            f"# Evidence: {header}, {time.strftime('%Y-%m-%d')}",
            "",
            f"{'QUICK path check (a few hundred images): not a result. ' if quick else ''}"
            f"Seeds {', '.join(map(str, SEEDS))}, each in its own process; the final epoch's test accuracy, never "
            "the best; time to 85% counts training seconds only, per run the whole run with evaluation.",
            "",
            "| configuration | epochs | final acc, mean +- sd | min .. max | flip TTA, mean | time to 85% | "
            "s per epoch | s per run |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            *notes,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    a = parser().parse_args(argv)
    precision = precision_policy()
    folder = Path(a.results) / (hardware_slug(precision.hardware) + ("-quick" if a.quick else ""))
    folder.mkdir(parents=True, exist_ok=True)
    header = f"{precision.hardware}, {precision}, torch {torch.__version__}"
    print(f"evidence on {header}\nsteps: {' '.join(a.steps)}; writing {folder}/", flush=True)
    rows, notes = [], []
    if "bench" in a.steps:
        quick_bench = ["--loader-batches", "2", "--steps", "1", "--epoch-images", "256", "--batch-size", "64"]
        bench.main([*(quick_bench if a.quick else []), "--out", str(folder / "bench.md")])
    for name in ("shipped", "speed"):
        if name in a.steps:
            rows.append(summarize(name, run_seeds(name, folder, a.quick)))
    if "notebook" in a.steps:
        notes.append(f"S9.ipynb executed top to bottom in {execute_notebook(a.quick, folder):.0f} s.")
    summary = summary_text(header, rows, notes, a.quick)
    (folder / "summary.md").write_text(summary)
    print("\n" + summary, flush=True)
    if a.copy_to:
        copy_to(Path(a.copy_to), folder, Path(a.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
