"""Save and resume: a run killed at epoch k goes on from epoch k, bit for bit, and only the run it came from.

A checkpoint is one dict: the state of the model, optimizer, scheduler and GradScaler, every RNG, the epoch,
the history, the machine, and the run's config (the recipe's record, the epochs and the data sizes). Every
file is written to a temporary name and renamed, so a crash leaves the old file or the new one, never half.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "history", "config", "machine"}


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, is not a checkpoint, or belongs to another run."""


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> None:
    """write(tmp_path) then rename: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def save_checkpoint(path: str | Path, *, config: dict, machine: dict, history: list, **states: Any) -> None:
    """After an epoch: the config, the history and the state of each object in `states` (None: not used)."""
    state = {name: obj.state_dict() if obj is not None else {} for name, obj in states.items()}
    state |= {"rng": rng_state(), "epoch": len(history), "history": history, "config": config, "machine": machine}
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by fit, with an error that says what the file is when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); delete it to start the run afresh."
        ) from err
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is a weights file (a state_dict), not a checkpoint: load it with load_model.")
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        what = (
            f"a dict without {sorted(CHECKPOINT_KEYS - state.keys())}"
            if isinstance(state, dict)
            else f"a {type(state).__name__}"
        )
        raise CheckpointError(f"{path} holds {what}, not a checkpoint of fit; delete it or pass another path.")
    return state


def resume(path: str | Path, config: dict, machine: dict, states: dict[str, Any]) -> list[dict[str, float]]:
    """Restore every object in `states` from the checkpoint of this same run; return its history ([]: no file yet).

    Refuses, naming the fields that differ, a checkpoint of another config: resuming it would mix two runs.
    The machine is not part of the run: a run goes on on another CPU or a GPU, and says so.
    """
    if not Path(path).exists():
        return []
    state = load_checkpoint(path)
    differ = sorted(k for k in config.keys() | state["config"].keys() if config.get(k) != state["config"].get(k))
    if differ:
        raise CheckpointError(
            f"{path} belongs to another run (it differs in: {', '.join(differ)}); delete it or match it."
        )
    for name, obj in states.items():
        if obj is not None:
            obj.load_state_dict(state[name])
    set_rng_state(state["rng"])
    tqdm.write(
        f"resumed after epoch {state['epoch']} of {config['epochs']} from {path}: {state['epoch']} epochs restored"
    )
    if state["machine"] != machine:
        tqdm.write(
            f"note: epochs 1-{state['epoch']} ran on {state['machine']['hardware']} ({state['machine']['precision']}); "
            f"the rest runs on {machine['hardware']} ({machine['precision']})"
        )
    return state["history"]
