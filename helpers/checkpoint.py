"""Save and resume, as nanoGPT does: after every epoch one dict (each object's state, the history, the run's
config), read back by the same run and refused by any other. The kit's loaders draw their batches from
(seed, epoch), so a resumed run goes on bit for bit."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


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


def save_checkpoint(path: str | Path | None, *, model: nn.Module, config: dict, history: list, **states: Any) -> None:
    """After an epoch: the model's and each other object's state (None: not used), the history, the config."""
    if path is None:  # a run without a checkpoint
        return
    check_finite(model)
    state = {name: obj.state_dict() for name, obj in {"model": model, **states}.items() if obj is not None}
    write_atomically(path, lambda tmp: torch.save(state | {"config": config, "history": history}, tmp))


def load_checkpoint(path: str | Path | None, *, config: dict, **states: Any) -> list[dict[str, float]]:
    """Restore each object in `states` from the checkpoint of this same run; return its history ([]: no file yet).

    Refuses, naming the fields that differ, a checkpoint of another config: resuming it would mix two runs.
    """
    if path is None or not Path(path).exists():
        return []
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}); delete it.") from err
    if not isinstance(state, dict) or not {"model", "config", "history"} <= state.keys():
        raise CheckpointError(f"{path} is not a checkpoint of a training run (a weights file?); delete it.")
    differ = sorted(k for k in config.keys() | state["config"].keys() if config.get(k) != state["config"].get(k))
    if differ:
        raise CheckpointError(f"{path} belongs to another run (it differs in: {', '.join(differ)}); delete it.")
    for name, obj in states.items():
        if obj is not None and name in state:  # a scaler absent from a CPU run's file starts afresh on a T4
            obj.load_state_dict(state[name])
    print(f"resumed from {path} after epoch {len(state['history'])}")
    return state["history"]
