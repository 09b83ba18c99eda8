"""Assignment rule 7, on the committed evidence: a full real run reached >= 85% with < 200k weights; the
notebook's outputs, metrics.json, the weights and the README's headline are that one run."""

import json
import re
from pathlib import Path

import pytest
import torch

from helpers import backprop
from helpers.dataset import make_loaders
from helpers.device import precision_policy
from helpers.measure import count_parameters
from helpers.model import Net

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "Results"


@pytest.fixture(scope="module")
def metrics() -> dict:
    if not (RESULTS / "metrics.json").exists():
        pytest.fail("no Results/metrics.json: run S9.ipynb or `python3 train.py` on the full data and commit Results/")
    return json.loads((RESULTS / "metrics.json").read_text())


def test_committed_run_is_a_full_run_that_meets_the_assignment(metrics):
    assert not metrics["config"]["quick"], "Results/metrics.json is from a quick run: commit a full run"
    assert metrics["config"]["train_images"] == 50_000 and metrics["config"]["test_images"] == 10_000
    assert metrics["final_test_acc"] >= 85.0
    assert metrics["params"] == count_parameters(Net()) < 200_000
    assert metrics["final_test_acc_tta"] is not None, "metrics.json carries the flip-TTA figure of the same weights"


def _notebook_text() -> str:
    """Every text output of the committed S9.ipynb, in order."""
    cells = json.loads((ROOT / "S9.ipynb").read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    return "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/markdown", "")) for o in outputs)


def test_the_committed_notebook_shows_the_committed_full_run_every_epoch_once(metrics):
    text = _notebook_text()
    assert "QUICK" not in text, "S9.ipynb's outputs are a quick smoke run: execute it in full and commit it"
    epochs = metrics["config"]["epochs"]
    lines = re.findall(rf"^epoch +(\d+)/{epochs} .*$", text, flags=re.MULTILINE)
    assert [int(n) for n in lines] == list(range(1, epochs + 1)) == [h["epoch"] for h in metrics["history"]]
    final = f"final epoch: {metrics['final_test_acc']:.2f}% plain, {metrics['final_test_acc_tta']:.2f}% with flip TTA"
    assert final in text, "the notebook's final line and metrics.json come from one run"


def test_the_readme_headline_is_the_committed_run(metrics):
    readme = (ROOT / "README.md").read_text()
    plain, tta = f"{metrics['final_test_acc']:.2f}%", f"{metrics['final_test_acc_tta']:.2f}%"
    assert f"**{plain} test accuracy at the final epoch**" in readme and f"**{tta} with flip" in readme


def test_committed_weights_reproduce_the_reported_accuracy_plain_and_with_flip_tta(metrics, cifar):
    net = Net()
    net.load_state_dict(torch.load(RESULTS / "s9_net.pt", weights_only=True))
    _, test_loader = make_loaders(cifar, batch_size=500, num_workers=0)  # the whole test split
    assert len(test_loader.dataset) == 10_000
    dtype = precision_policy(torch.device("cpu")).dtype
    _, accuracy = backprop.test(net, test_loader, dtype=dtype)  # the same evaluation the training loop reports
    print(f"committed weights: {accuracy:.2f}% on the 10,000 real test images")
    assert accuracy >= 85.0
    assert abs(accuracy - metrics["final_test_acc"]) < 0.3  # GPU vs CPU bf16 rounding moves a few images
    _, tta = backprop.test(net, test_loader, dtype=dtype, tta=True)
    print(f"committed weights: {tta:.2f}% with flip TTA")
    assert abs(tta - metrics["final_test_acc_tta"]) < 0.3 and tta > accuracy


DOCUMENTS = [
    ROOT / "README.md",
    ROOT / "training_logs.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *RESULTS.glob("*.md"),
]
NAMES_THE_COMMITTED_RUN = re.compile(r"committed (run|notebook|weights)|notebook's run", re.IGNORECASE)


def _committed_figures(metrics: dict) -> set[str]:
    last = metrics["history"][-1]
    return {f"{v:.2f}%" for v in (metrics["final_test_acc"], metrics["final_test_acc_tta"], last["train_acc"])}


def test_every_line_that_names_the_committed_run_quotes_its_metrics_json(metrics):
    ours, stale = _committed_figures(metrics), []
    for document in DOCUMENTS:
        for number, line in enumerate(document.read_text().splitlines(), 1):
            if NAMES_THE_COMMITTED_RUN.search(line):
                stale += [f"{document.name}:{number}: {p}" for p in re.findall(r"\d+\.\d+%", line) if p not in ours]
    assert stale == [], "a document quotes the committed run with numbers that are not metrics.json's"


def test_runs_md_and_training_logs_md_give_the_committed_runs_numbers(metrics):
    plain, tta = f"{metrics['final_test_acc']:.2f}%", f"{metrics['final_test_acc_tta']:.2f}%"
    runs = (RESULTS / "runs.md").read_text()
    committed = runs.split("## The committed run")[1].split("\n## ")[0]
    row = next(line for line in committed.splitlines() if line.startswith("| shipped"))
    assert f"| {plain} | {tta} |" in row and metrics["date"][:10] in row
    log = (ROOT / "training_logs.md").read_text()
    assert f"test accuracy: {plain} ({tta} with flip TTA)" in log and metrics["date"] in log
