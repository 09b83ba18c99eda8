"""Save and resume, as nanoGPT does: after every epoch one dict (each object's state, the history, the run's
config and a description of its network), read back by the same run and refused by any other. The kit's loaders
draw their batches from (seed, epoch), so a resumed run goes on bit for bit."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .measure import count_parameters

# What a refusal offers instead of the file in the way, which it never asks to delete.
ANOTHER_PATH = "python3 train.py --checkpoint NEW.pt, or CHECKPOINT = 'NEW.pt' in the notebook's parameters cell"


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, is not a checkpoint, or belongs to another run."""


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> None:
    """write(tmp_path) then rename: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def check_finite(model: nn.Module) -> None:
    """Refuse to save a model whose weights or BatchNorm statistics hold NaN or inf."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{len(bad)} tensors hold NaN/inf (first: {bad[0]}); nothing was saved.")


def describe_network(model: nn.Module) -> str:
    """'Net: 193,898 parameters in 31 layers (layout fe9954)': the layout digest covers every tensor's name and
    shape, so any edit (a layer more, other widths, another kind of layer) changes it."""
    layers = [m for m in model.modules() if list(m.parameters(recurse=False))]  # convolutions, BatchNorms, linears
    layout = "".join(f"{name}{tuple(t.shape)}" for name, t in model.state_dict().items())
    digest = hashlib.sha1(layout.encode()).hexdigest()[:6]
    return f"{type(model).__name__}: {count_parameters(model):,} parameters in {len(layers)} layers (layout {digest})"


def save_checkpoint(path: str | Path | None, *, model: nn.Module, config: dict, history: list, **states: Any) -> None:
    """After an epoch: the model's and each other object's state (None: not used), the history, the config."""
    if path is None:  # a run without a checkpoint
        return
    check_finite(model)
    state = {name: obj.state_dict() for name, obj in {"model": model, **states}.items() if obj is not None}
    state |= {"config": config, "history": history, "network": describe_network(model)}
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path | None, *, config: dict, model: nn.Module, **states: Any) -> list[dict]:
    """Restore the model and each object in `states` from the checkpoint of this same run; return its history
    ([]: no file yet). Refuses, before loading anything, a checkpoint of another config or network, saying what
    differs, then and now: resuming it would mix two runs."""
    if path is None or not Path(path).exists():
        return []
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}): train under another path, {ANOTHER_PATH}."
        ) from err
    if not isinstance(state, dict) or not {"model", "config", "history"} <= state.keys():
        raise CheckpointError(
            f"{path} is not a checkpoint of a training run (a weights file?): train under another path, {ANOTHER_PATH}."
        )
    then, now = state["config"] | {"network": state.get("network")}, config | {"network": describe_network(model)}
    differ = [f"  {k}: {then.get(k)} then, {now.get(k)} now" for k in sorted(then | now) if then.get(k) != now.get(k)]
    if differ:
        raise CheckpointError(
            f"{path} holds {len(state['history'])} finished epochs of another run; it differs in\n"
            + "\n".join(differ)
            + f"\nResume it with the code and settings that made it, or start a new run beside it: {ANOTHER_PATH}."
        )
    for name, obj in {"model": model, **states}.items():
        if obj is not None and name in state:  # a scaler absent from a CPU run's file starts afresh on a T4
            obj.load_state_dict(state[name])
    print(f"resumed from {path} after epoch {len(state['history'])}")
    return state["history"]
