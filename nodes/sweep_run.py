"""The Optimizer Sweep node's logic, free of ComfyUI imports at module level (unit-testable with the tiny model):
plan the sweep from the node's inputs, run it with one progress bar over all runs, and turn the winner into the
OptimizerSpec the Trainer node takes.

Cancel: ComfyUI's interrupt check raises inside the progress callback. Raised through the trainer, the sweep
would record that run as failed and go on with the next, so the callback instead sets the sweep's stop event
(the current run saves and stops at its next step boundary, the sweep ends "stopped" and can be resumed with
`python -m trainer sweep --resume DIR`), and the interrupt is raised again once the sweep has written what
finished (sweep.json, sweep.md, sweep.png).
"""

from __future__ import annotations

import logging
import os
import threading

from ._common import (
    DatasetSpec,
    EmoLoRAError,
    OptimizerSpec,
    Throttle,
    fail,
    freeze_settings,
    send_event,
)
from .training import EVENT_INTERVAL_S, expected_errors, safe_output_name

log = logging.getLogger("emolora.nodes")

SWEEP_EVENT = "emolora.sweep"  # progress of the sweep (the Trainer's telemetry event carries one run's steps)
LOSS_MODES = {"raw": ("raw",), "normalized": ("normalized",), "both": ("raw", "normalized")}


def unique_sweep_dir(root: str, stem: str) -> str:
    """<root>/<stem>_00001, the first counter not taken (a new sweep never mixes with an old one)."""
    os.makedirs(root, exist_ok=True)
    n = 1
    while os.path.exists(os.path.join(root, f"{stem}_{n:05d}")):
        n += 1
    return os.path.join(root, f"{stem}_{n:05d}")


def winner_spec(row: dict) -> OptimizerSpec:
    """The OptimizerSpec that trains as the sweep's run `row` did: the optimizer's own preset (as the sweep applied
    it), the run's LR and, when it won with the normalized loss, optimizer_loss=normalized."""
    from ..trainer.config import ConfigError, build_config, optimizer_preset_name

    name = row["optimizer"]
    preset = optimizer_preset_name(name)
    presets = (preset,) if preset else ()
    settings: dict = {"optimizer": name, "lr": float(row["lr"])}
    if row.get("optimizer_loss") == "normalized":
        settings["optimizer_loss"] = "normalized"
    try:
        build_config(presets=list(presets), overrides=settings, validate=False).validate(require_paths=False)
    except ConfigError as e:
        raise fail("Optimizer Sweep", e) from None
    return OptimizerSpec(optimizer=name, presets=presets, settings=freeze_settings(settings))


def best_row(rows: list) -> dict | None:
    """The fed run group with the lowest mean final validation loss (the sweep's own ranking), even when its lead
    is inside the seed spread: its first row."""
    from ..trainer.sweep import report

    cands = [g for g in report.groups(rows) if g["loss_fed"] == "fed" and g["usable"]]
    return min(cands, key=lambda g: g["val_end"])["rows"][0] if cands else None


def run_sweep_node(*, checkpoint: str, dataset: DatasetSpec, optimizers: str, steps: int, loss_control: bool,
                   seeds: int, sweep_dir: str, cache_dir: str, node_id=None, progress=None, interrupted=None,
                   device: str = "auto", optimizer_loss: str = "raw", **options) -> dict:
    """Plan (bad input fails here, before the model loads) and run the sweep. progress(value, total) may raise to
    cancel (ComfyUI's ProgressBar does on Cancel); interrupted() -> bool is polled between steps and during the
    set-up. Returns {spec, winner (row or None), best (row or None), recommendation, table_md, png_path,
    status, output_dir, done, total}."""
    import torch

    from ..trainer.config import build_config
    from ..trainer.sweep import plan_sweep, run_sweep

    if not isinstance(dataset, DatasetSpec):
        raise EmoLoRAError("EmoLoRA Optimizer Sweep: 'dataset' must come from an EmoLoRA Dataset node")
    if optimizer_loss not in LOSS_MODES:
        raise EmoLoRAError(f"EmoLoRA Optimizer Sweep: optimizer_loss must be one of {', '.join(LOSS_MODES)}, "
                           f"got {optimizer_loss!r}")
    errors = expected_errors()
    explicit = {**dataset.overrides(), **options}  # what the user set wins over each optimizer's preset
    if not explicit.get("validation_split"):  # 0 = "none chosen": the sweep then holds out its default share
        explicit.pop("validation_split", None)
    overrides = {**explicit, "model": checkpoint, "cache_dir": cache_dir, "device": device,
                 "output": os.path.join(sweep_dir, "loras", "sweep.safetensors")}
    try:
        base = build_config(overrides=overrides)
        plan = plan_sweep(base, optimizers, seeds=int(seeds), loss_control=bool(loss_control),
                          optimizer_loss_modes=LOSS_MODES[optimizer_loss], steps=int(steps), output_dir=sweep_dir,
                          explicit=explicit)
    except errors as e:
        raise fail("Optimizer Sweep", e) from None

    total_steps = len(plan.runs) * plan.steps
    stop = threading.Event()
    cancel: list = []  # the exception ComfyUI's progress check raised
    throttle = Throttle(EVENT_INTERVAL_S)
    node = str(node_id) if node_id is not None else None

    def on_step(info: dict) -> None:
        value = (info["sweep_run"] - 1) * plan.steps + info["step"]
        if throttle.ready(force=info["step"] >= info["steps_total"]):
            send_event(SWEEP_EVENT, {"node": node, "status": "running", "sweep_run": info["sweep_run"],
                                         "sweep_runs": info["sweep_runs"], "label": info["sweep_label"],
                                         "step": info["step"], "steps_total": info["steps_total"],
                                         "eta_s": info.get("sweep_eta_s"), "output_dir": str(plan.output_dir)})
        if progress is not None and not cancel:
            try:
                progress(value, total_steps)
            except BaseException as e:  # Cancel: stop at the step boundary, keep what finished
                cancel.append(e)
                stop.set()
        if interrupted is not None and interrupted():
            stop.set()

    done = threading.Event()

    def watch() -> None:  # Cancel while the model loads or the caches fill (no step callback yet)
        while not done.wait(0.25):
            if interrupted():
                stop.set()
                return

    watcher = threading.Thread(target=watch, name="emolora-sweep-cancel", daemon=True) if interrupted else None
    if watcher is not None:
        watcher.start()
    send_event(SWEEP_EVENT, {"node": node, "status": "starting", "sweep_runs": len(plan.runs),
                                 "output_dir": str(plan.output_dir)})
    try:
        with torch.inference_mode(False), torch.enable_grad():
            result = run_sweep(plan, stop_event=stop, on_step=on_step)
    except errors as e:
        raise fail("Optimizer Sweep", e) from None
    finally:
        done.set()
        if watcher is not None:
            watcher.join(5)
    best = result.winner or best_row(result.rows)
    out = {"winner": result.winner, "best": best, "recommendation": result.recommendation,
           "table_md": result.table_md, "png_path": result.png_path, "status": result.status,
           "output_dir": result.output_dir, "done": len(result.rows), "total": len(plan.runs),
           "notes": list(result.notes), "cancel": cancel[0] if cancel else None,
           "spec": winner_spec(best) if best is not None else None}
    send_event(SWEEP_EVENT, {"node": node, "status": result.status, "sweep_runs": len(plan.runs),
                                 "done": len(result.rows), "recommendation": result.recommendation,
                                 "output_dir": result.output_dir})
    return out


def report_text(out: dict) -> str:
    """The node's STRING output: what finished, the recommendation, the table and where the files are."""
    lines = [f"{out['done']} of {out['total']} runs ({out['status']}): {out['output_dir']}"]
    lines += out.get("notes") or []
    lines.append(out["recommendation"])
    if out["winner"] is None and out["best"] is not None:
        lines.append(f"optimizer output: the lowest final validation loss, {out['spec'].describe()} (not a clear "
                     "winner)")
    elif out["spec"] is not None:
        lines.append(f"optimizer output: {out['spec'].describe()}")
    return "\n".join(lines) + "\n\n" + out["table_md"]


def image_tensor(png_path: str | None):
    """sweep.png as a ComfyUI IMAGE [1, H, W, 3] in 0..1 (a blank strip when the sweep drew nothing)."""
    import numpy as np
    import torch
    from PIL import Image

    if png_path and os.path.isfile(png_path):
        with Image.open(png_path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    else:
        arr = np.ones((64, 256, 3), dtype=np.float32)
    return torch.from_numpy(arr)[None]


def sweep_stem(name: str) -> str:
    return safe_output_name(name or "sweep")
