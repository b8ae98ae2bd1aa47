"""The resumable training state: LoRA weights, optimizer (with its emotion), scheduler, scaler, RNGs, position.

One file, state/state.pt in the run folder, replaced atomically, so a kill at any moment leaves the
previous complete state. Restoring it and training on gives the same LoRA bit for bit (on the CPU) as never
having stopped: data order and augmentation are functions of (seed, epoch, index), noise of (seed, step),
and everything else that draws random numbers is covered by the RNG states saved here.

save_trainer_state/restore_trainer_state map a Trainer to and from that file; the rest is the file format.
"""

import hashlib
import logging
import random
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .config import ConfigError

log = logging.getLogger("emolora.train")

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


def dataset_fingerprint(items) -> str:
    """What the data order depends on: a changed dataset on resume means a different order."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.sha256}|{it.repeats}|{it.caption}\n".encode())
    return h.hexdigest()


def save_trainer_state(trainer) -> Path:
    """The trainer's resumable state, atomically, to <run>/state/state.pt."""
    t = trainer
    path = t.store.state_dir / STATE_FILE
    state = {
        "step": t.step, "epoch": t.epoch, "batch_in_epoch": t.batch_in_epoch,
        "lora": [p.detach().cpu().clone() for p in t.params],
        "optimizer": t.optimizer.state_dict(),
        "pulse": t.pulse.state_dict() if t.pulse is not None else None,
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "rng": rng_state(),
        "counters": {"skipped": t.skipped, "consecutive_skips": t.consecutive_skips,
                     "should_stop_prev": t._should_stop_prev},
        "dataset": dataset_fingerprint(t.items),
    }
    save_state(path, state)
    t.store.event(t.step, "state", {"path": str(path)})
    return path


def restore_trainer_state(trainer) -> None:
    """Load <cfg.resume>/state/state.pt into a freshly built trainer and cut the run's log back to its step."""
    t = trainer
    path = Path(t.cfg.resume).expanduser() / "state" / STATE_FILE
    state = load_state(path)
    saved = state["lora"]
    if len(saved) != len(t.params) or any(s.shape != p.shape for s, p in zip(saved, t.params)):
        raise ConfigError(f"resume: the LoRA in {path} does not match this network (rank, targets or model "
                          "changed)")
    with torch.no_grad():
        for p, s in zip(t.params, saved):
            p.copy_(s)
    t.optimizer.load_state_dict(state["optimizer"])
    if t.pulse is not None and state.get("pulse") is not None:
        t.pulse.load_state_dict(state["pulse"])
    if t.scaler is not None and state.get("scaler") is not None:
        t.scaler.load_state_dict(state["scaler"])
    t.step, t.epoch, t.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    c = state["counters"]
    t.skipped, t.consecutive_skips = c["skipped"], c["consecutive_skips"]
    t._should_stop_prev = c["should_stop_prev"]
    if state.get("dataset") != dataset_fingerprint(t.items):
        log.warning("resume: the dataset changed since the state was saved; the data order will differ")
    set_rng_state(state["rng"])  # after the loads: the next step must see exactly the saved streams
    t.store.truncate_after(t.step)
    t.store.event(t.step, "resume", {"from": str(path)})
    log.info("resumed %s at step %d (epoch %d, batch %d)", t.run_dir, t.step, t.epoch, t.batch_in_epoch)
