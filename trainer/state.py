"""The resumable training state: LoRA weights, optimizer (with its emotion), scheduler, scaler, RNGs, position.

One file, state/state.pt in the run folder, replaced atomically, so a kill at any moment leaves the
previous complete state. Restoring it and training on gives the same LoRA bit for bit (on the CPU) as never
having stopped: data order and augmentation are functions of (seed, epoch, index), noise of (seed, step),
and everything else that draws random numbers is covered by the RNG states saved here.
"""

import random

import numpy as np
import torch

from .atomic import atomic_write

STATE_FORMAT = 1
STATE_FILE = "state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_state(path, state: dict) -> None:
    """torch.save `state` (plus the format number) atomically."""
    atomic_write(path, lambda tmp: torch.save({"format": STATE_FORMAT, **state}, tmp))


def load_state(path) -> dict:
    """The dict written by save_state, loaded with torch's safe (weights-only) unpickler."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read the training state {path}: {e}") from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt != STATE_FORMAT:
        raise ValueError(f"{path}: not a training state of this trainer (format {fmt!r})")
    return state
