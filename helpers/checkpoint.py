"""Save, resume and refuse: a run killed at epoch k goes on from epoch k, and only the run it came from.

A checkpoint holds the model, optimizer, scheduler, GradScaler, history, every RNG and the run's
signature (network, data, augmentations, seed, optimizer groups, schedule, recipe). Every file is
written to a temporary name and renamed, so a crash leaves the old file or the new one, never half.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "history", "run", "rng", "epoch"}


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, is not a checkpoint, or belongs to another run."""


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> None:
    """write(tmp_path) then rename: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, in tensors and ints (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what rng_state saved."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def save_checkpoint(path: str | Path, **state: Any) -> None:
    """Save atomically: a crash mid-save leaves the previous checkpoint whole, never half a file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(state, tmp))


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


def save_run(
    path: str | Path,
    run: dict[str, Any],
    history: list[dict[str, float]],
    machine: dict[str, str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
) -> None:
    """Everything a resumed run needs, after an epoch, and the machine it ran on (hardware, precision)."""
    save_checkpoint(
        path,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict() if scheduler is not None else {},
        scaler=scaler.state_dict() if scaler is not None else {},
        epoch=len(history),
        history=history,
        run=run,
        machine=machine,
        rng=rng_state(),
    )


def resume_run(
    path: str | Path,
    run: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
) -> tuple[list[dict[str, float]], dict[str, str]]:
    """Restore every state from the checkpoint of this same run; return its history and the machine it ran on.

    The machine is not part of the run: a run goes on on another CPU or a GPU (fit says so). Refuses,
    naming what differs, a checkpoint of another run: resuming it would mix two recipes.
    """
    state = load_checkpoint(path)
    if state["run"] != run:
        changed = sorted(k for k in run.keys() | state["run"].keys() if run.get(k) != state["run"].get(k))
        raise CheckpointError(
            f"{path} belongs to another run (differs in: {', '.join(changed)}); delete it or match it."
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path} holds weights of another network: {err}") from err
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state["history"], state.get("machine", {})
