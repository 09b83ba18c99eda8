"""S9.ipynb as students use it: a disconnect mid-training resumes to the same weights, a checkpoint of another
run is refused, the parameters cell follows papermill's convention. (nbval re-executes it whole, in quick mode.)"""

import ast
import json
from pathlib import Path

import pytest
import torch

from helpers import backprop

ROOT = Path(__file__).resolve().parents[1]
CELLS = [c for c in json.loads((ROOT / "S9.ipynb").read_text())["cells"] if c["cell_type"] == "code"]


def _source(cell) -> str:
    return "".join(cell["source"])


def _run_training_path(overrides: dict) -> dict:
    """Run the notebook's cells in one namespace up to its training cell, parameters overridden as papermill would.

    The LR range test cell is skipped: it restores model, optimizer and RNGs bit for bit (tests/test_lr_finder.py).
    """
    namespace: dict = {}
    for cell in CELLS:
        source = _source(cell)
        if "lr_range_test(" in source:
            continue
        exec(compile(source, "S9.ipynb", "exec"), namespace)
        if "parameters" in cell["metadata"].get("tags", []):
            namespace.update(overrides)
        if "save_checkpoint(" in source:  # the training cell
            return namespace
    raise AssertionError("no training cell")


def test_an_interrupted_notebook_run_resumes_to_bit_identical_weights(cifar_root, tmp_path, capsys, killed_in_epoch):
    straight = _run_training_path({"EPOCHS": 2, "RESULTS": str(tmp_path / "a"), "CHECKPOINT": str(tmp_path / "a.pt")})
    overrides = {"EPOCHS": 2, "RESULTS": str(tmp_path / "b"), "CHECKPOINT": str(tmp_path / "b.pt")}
    undo = killed_in_epoch(backprop, 2)  # the runtime went away during epoch 2
    with pytest.raises(KeyboardInterrupt):
        _run_training_path(overrides)
    undo()
    capsys.readouterr()
    resumed = _run_training_path(overrides)  # Run all again, in a fresh kernel
    assert "after epoch 1" in capsys.readouterr().out
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda hs: [{k: v for k, v in h.items() if "seconds" not in k} for h in hs]  # noqa: E731
    assert strip(resumed["history"]) == strip(straight["history"])


def test_a_checkpoint_of_another_recipe_is_refused_by_the_notebook(cifar_root, tmp_path):
    checkpoint = str(tmp_path / "run.pt")
    _run_training_path({"EPOCHS": 1, "RESULTS": str(tmp_path / "a"), "CHECKPOINT": checkpoint})
    with pytest.raises(Exception, match="another run; it differs in\n  seed: 0 then, 1 now"):
        _run_training_path({"EPOCHS": 1, "SEED": 1, "RESULTS": str(tmp_path / "b"), "CHECKPOINT": checkpoint})


def test_the_parameters_cell_is_tagged_for_papermill_and_holds_only_plain_assignments():
    (cell,) = [c for c in CELLS if "parameters" in c["metadata"].get("tags", [])]
    body = [node for node in ast.parse(_source(cell)).body if not isinstance(node, ast.Import)]
    assert body and all(isinstance(node, ast.Assign) and len(node.targets) == 1 for node in body)
    assert {"QUICK", "SEED", "EPOCHS", "CHECKPOINT"} <= {node.targets[0].id for node in body}
