"""The resumable training state: LoRA weights, optimizer (with its emotion), scheduler, scaler, RNGs, position.

One file, state/state.pt in the run folder, replaced atomically, so a kill at any moment leaves the
previous complete state. Restoring it and training on gives the same LoRA bit for bit (on the CPU) as never
having stopped: data order and augmentation are functions of (seed, epoch, index), noise of (seed, step),
and everything else that draws random numbers is covered by the RNG states saved here.

save_trainer_state/restore_trainer_state map a run's parts (RunSetup, LoopState) to and from that file; the rest
is the file format.
"""

import hashlib
import logging
import random
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .config import ConfigError
from .parts import LoopState, RunSetup

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
        h.update(f"{it.sha256}|{it.repeats}|{it.caption}{'|reg' if it.is_reg else ''}\n".encode())
    return h.hexdigest()


def save_trainer_state(run: RunSetup, loop: LoopState, store, rank_rngs: list | None = None) -> Path:
    """The run's resumable state, atomically, to <run>/state/state.pt. rank_rngs: every rank's RNG states, in
    rank order, when several processes train (trainer/distributed.py)."""
    path = store.state_dir / STATE_FILE
    state = {
        "loop": loop.to_dict(),
        "lora": [p.detach().cpu().clone() for p in run.params],
        "optimizer": run.optimizer.state_dict(),
        "pulse": run.pulse.state_dict() if run.pulse is not None else None,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": rng_state(),
        "dataset": dataset_fingerprint(run.items),
    }
    if rank_rngs is not None:
        state["rank_rngs"] = rank_rngs
    save_state(path, state)
    store.event(loop.step, "state", {"path": str(path)})
    return path


def saved_loop(state: dict) -> LoopState:
    """Where the saved loop stood. Files written before LoopState was saved whole hold the position at the top
    and the counters under "counters" (what they lack takes LoopState's defaults)."""
    if "loop" in state:
        return LoopState.from_dict(state["loop"])
    return LoopState.from_dict({**state["counters"], **{k: state[k] for k in ("step", "epoch", "batch_in_epoch")}})


def restore_trainer_state(cfg, run: RunSetup, store, rank: int = 0, world: int = 1) -> LoopState:
    """Load <cfg.resume>/state/state.pt into a freshly built run, cut the run's log back to its step and return
    where the loop stands. Rank r of `world` gets its own saved RNGs when the state holds as many ranks."""
    path = Path(cfg.resume).expanduser() / "state" / STATE_FILE
    state = load_state(path)
    saved = state["lora"]
    if len(saved) != len(run.params) or any(s.shape != p.shape for s, p in zip(saved, run.params)):
        raise ConfigError(f"resume: the LoRA in {path} does not match this network (rank, targets or model "
                          "changed)")
    with torch.no_grad():
        for p, s in zip(run.params, saved):
            p.copy_(s)
    run.optimizer.load_state_dict(state["optimizer"])
    if run.pulse is not None and state.get("pulse") is not None:
        run.pulse.load_state_dict(state["pulse"])
    if run.scaler is not None and state.get("scaler") is not None:
        run.scaler.load_state_dict(state["scaler"])
    loop = saved_loop(state)
    if state.get("dataset") != dataset_fingerprint(run.items):
        log.warning("resume: the dataset changed since the state was saved; the data order will differ")
    rank_rngs = state.get("rank_rngs") or [state["rng"]]
    if len(rank_rngs) != world:
        log.warning("resume: the state was saved by %d process(es), this run has %d: RNG streams (LoRA dropout) "
                    "and the global batch (batch size x processes) differ from the saved run", len(rank_rngs), world)
    # after the loads: the next step must see exactly the saved streams
    set_rng_state(rank_rngs[rank] if rank < len(rank_rngs) else state["rng"])
    store.truncate_after(loop.step)
    store.event(loop.step, "resume", {"from": str(path)})
    log.info("resumed %s at step %d (epoch %d, batch %d)", store.run_dir, loop.step, loop.epoch, loop.batch_in_epoch)
    return loop
