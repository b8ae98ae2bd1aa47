"""The Trainer node's logic, free of ComfyUI imports at module level (unit-testable with the tiny model): build
the TrainConfig from the specs and train, reporting progress and throttled telemetry.

Host contract (research comfyui-host.md §2): the prompt runs under torch.inference_mode() on the prompt_worker
thread; each ProgressBar update is also the interrupt check (it raises InterruptProcessingException when Cancel was
pressed). The trainer core turns an exception raised from on_step into "save the LoRA and the state, mark the run
stopped, re-raise", so Cancel leaves a loadable LoRA and ComfyUI still marks the prompt interrupted.
"""

from __future__ import annotations

import logging
import math
import os
import re

from ..trainer.config import CHOICES
from . import previews
from ._common import (
    TELEMETRY_EVENT,
    DatasetSpec,
    EmoLoRAError,
    OptimizerSpec,
    Throttle,
    fail,
    send_event,
)

log = logging.getLogger("emolora.nodes")

PRECISIONS = {"auto": "auto", "fp32": "no", "bf16": "bf16", "fp16": "fp16"}
NO_PRESET = "none"
NO_LORA = "none"
EVENT_INTERVAL_S = 0.25  # at most ~4 telemetry events per second
EVENT_FIELDS = ("loss", "lr", "emo_scalar", "emo_pulse", "effective_lr", "trust", "grad_norm", "steps_per_s",
                "eval_loss", "val_loss", "lr_scale", "confidence_mean")
_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_output_name(name: str) -> str:
    stem = _NAME_RE.sub("_", (name or "").strip()).strip("._")
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    return stem or "emolora"


def unique_lora_path(lora_dir: str, stem: str) -> str:
    """<stem>_00001.safetensors, the first counter not taken (never overwrites an earlier LoRA)."""
    os.makedirs(lora_dir, exist_ok=True)
    n = 1
    while True:
        path = os.path.join(lora_dir, f"{stem}_{n:05d}.safetensors")
        if not os.path.exists(path):
            return path
        n += 1


def event_payload(rec: dict, node_id, optimizer: str) -> dict:
    out = {"node": str(node_id) if node_id is not None else None, "optimizer": optimizer,
           "step": int(rec.get("step", 0)), "steps_total": int(rec.get("steps_total", 0)),
           "should_stop": bool(rec.get("should_stop", False))}
    for k in EVENT_FIELDS:
        v = rec.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v) if math.isfinite(v) else None  # NaN is not JSON the browser can parse
    return out


NETWORKS = CHOICES["network"]
NO_RESUME = "none"
# A run trained from the node saves its resumable state this often (unless a preset or the node asks for another
# interval), so a run killed with ComfyUI can continue from the last one.
STATE_EVERY = 100


def resume_choices(runs_dir: str) -> list[str]:
    """The resume combo's entries: "<run> (step S/T, optimizer, stopped|cancelled|interrupted)" for every run
    under `runs_dir` that can continue (trainer.runstore.unfinished_runs), newest first."""
    from ..trainer.runstore import unfinished_runs

    try:
        runs = unfinished_runs(runs_dir)
    except Exception as e:  # a broken run folder must not take the node's definition down
        log.warning("EmoLoRA: cannot list the runs in %s: %r", runs_dir, e)
        return []
    return [f"{r['name']} (step {r['step']}/{r['steps_total'] or '?'}, {r['optimizer']}, {r['how']})" for r in runs]


def resume_run_dir(runs_dir: str, choice: str | None) -> str | None:
    """The run folder a resume entry names (its text up to " ("), None for none; a run that is gone is an error."""
    if not choice or choice == NO_RESUME:
        return None
    name = choice.split(" (", 1)[0].strip()
    run_dir = os.path.join(runs_dir, name)
    if not name or os.sep in name or "/" in name or not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise EmoLoRAError(f"EmoLoRA Trainer: resume: no run {name!r} in {runs_dir}")
    return run_dir


def _prompts(text) -> list:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


# Widget name -> its TrainConfig entries, only where the key or the value differs from the widget's; every other
# widget sets the TrainConfig field of its own name. None: not a config value (the node uses it itself).
WIDGET_TO_CONFIG = {
    "ckpt_name": None, "preset": None, "output_name": None, "gpus": None,
    "alpha": lambda v: {"alpha": float(v) if v else None},  # 0 = equal to rank
    "precision": lambda v: {"mixed_precision": PRECISIONS[v]},
    "auto_stop": lambda v: {"auto_stop": "stop" if v else "mark"},
    "sample_prompts": lambda v: {"sample_prompts": _prompts(v)},
    "sample_size": lambda v: {"sample_size": int(v) or None},  # 0 = the training resolution
    "network_weights": lambda v: {"network_weights": None if v in (None, "", NO_LORA) else v},
    # cached text-encoder outputs cannot train the text encoders
    "train_text_encoder": lambda v: {"train_text_encoder": bool(v), **({"cache_text": "off"} if v else {})},
}


def widgets_to_config(values: dict) -> dict:
    """The TrainConfig overrides of the training nodes' widget values (only those given: a widget that is not on
    the graph leaves the preset's or TrainConfig's value)."""
    out: dict = {}
    for name, value in values.items():
        if name not in WIDGET_TO_CONFIG:
            out[name] = value
        elif WIDGET_TO_CONFIG[name] is not None:
            out.update(WIDGET_TO_CONFIG[name](value))
    if out.get("alpha", 1) is None and "rank" in values:
        out["alpha"] = float(values["rank"])  # "equal to rank" must also win over a preset's alpha (None would not)
    if "sample_every" in out and not out.get("sample_prompts"):
        out["sample_every"] = 0  # no prompts, no samples
    return out


def preset_status(preset: str | None, config) -> str:
    """What the training preset set, and which of its values this node's widgets changed (they win, as
    command-line flags win over --preset)."""
    if not preset:
        return ""
    from ..trainer.config import load_preset

    settings = load_preset(preset)
    kept = {k: v for k, v in settings.items() if getattr(config, k, v) == v}
    changed = {k: getattr(config, k) for k in settings if k not in kept}
    text = f"preset {preset}: " + ", ".join(f"{k}={v}" for k, v in kept.items())
    if changed:
        text += "; set here instead: " + ", ".join(f"{k}={v} (preset {settings[k]})" for k, v in changed.items())
    return text


def free_comfy_models() -> None:
    try:
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()
    except Exception as e:  # outside ComfyUI
        log.debug("could not free ComfyUI's models: %r", e)


def comfy_device() -> str:
    try:
        import comfy.model_management as mm

        return str(mm.get_torch_device())
    except Exception:
        return "auto"


def expected_errors() -> tuple:
    from ..trainer.config import ConfigError
    from ..trainer.data import DatasetError, ImageError
    from ..trainer.model import LoRAError, ModelError

    return ConfigError, DatasetError, ImageError, ModelError, LoRAError


def _train_in_child(config, gpus: int, on_step, check_cancel, stop_types: list):
    """run_child with ComfyUI's interrupt check polled between steps too (Cancel during the set-up)."""
    from ..trainer.launch import run_child

    cancel: list = []

    def cancelled() -> bool:
        if check_cancel is not None and not cancel:
            try:
                check_cancel()
            except BaseException as e:
                stop_types.append(type(e))
                cancel.append(e)
        return bool(cancel)

    result = run_child(config, gpus, on_step=on_step, should_stop=cancelled)
    if cancel:
        raise cancel[0]
    return result


def _resume_config(run_dir: str, run_config: dict, asked):
    """The config that continues `run_dir`: the run's, with this call's RESUME_MAY_CHANGE options and device. A
    setting that fixes the numbers and differs from the run's is an error naming each (never silently replaced)."""
    from ..trainer.config import RESUME_MAY_CHANGE, resume_config, resume_conflicts

    conflicts = resume_conflicts(run_config, asked)
    if conflicts:
        raise EmoLoRAError(f"EmoLoRA Trainer: cannot resume {os.path.basename(run_dir)} with other settings: "
                           f"{'; '.join(conflicts)}. Set them back, or choose resume 'none' to start a new run.")
    keep = {k: getattr(asked, k) for k in RESUME_MAY_CHANGE}
    return resume_config(run_dir, **keep, device=asked.device)


def run_training(*, checkpoint: str, dataset: DatasetSpec, optimizer: OptimizerSpec, lora_dir: str, runs_dir: str,
                 cache_dir: str, output_name: str, node_id=None, progress=None, check_cancel=None,
                 device: str = "auto", preset: str | None = None, gpus: int = 1, resume: str | None = None,
                 **options) -> dict:
    """Build the TrainConfig (the training `preset`, then the optimizer's presets, then the node's values: the
    CLI's merge order) and train. progress(step, total, preview=None) may raise to stop (the LoRA is saved
    first); at a sample step `preview` is the set's strip image. check_cancel() may raise during the set-up
    (model load, caching), before there is a LoRA to save. gpus > 1: the CLI under torchrun in a child process,
    followed through its run store (trainer/launch.py); Cancel stops it through the control file.
    resume: a run folder to continue (as the CLI's --resume: its state, its LoRA file); the options that fix the
    numbers must equal the run's (a difference is an error naming each), the others (steps, saves, samples,
    stop rules: trainer.config.RESUME_MAY_CHANGE) are this call's.
    Returns {lora_path, lora_name, run_dir, steps_done, stop_reason, samples, config, message (why it stopped,
    when that needs words: diverged), validation (the validation loss in words, or ""), barely_moving (the
    "barely changed the LoRA" warning, or "")}."""
    import torch

    from ..trainer.config import build_config, load_run_config
    from ..trainer.telemetry import validation_line
    from ..trainer.train import train

    if not isinstance(optimizer, OptimizerSpec):
        raise EmoLoRAError("EmoLoRA Trainer: 'optimizer' must come from an EmoLoRA Optimizer node")
    if not isinstance(dataset, DatasetSpec):
        raise EmoLoRAError("EmoLoRA Trainer: 'dataset' must come from an EmoLoRA Dataset node")
    errors = expected_errors()
    try:
        run_config = load_run_config(resume) if resume else None
    except errors as e:
        raise fail("Trainer", e) from None
    output = run_config["output"] if resume else unique_lora_path(lora_dir, safe_output_name(output_name))
    overrides = {**optimizer.overrides(), **dataset.overrides(), **options, "model": checkpoint, "output": output,
                 "runs_dir": runs_dir, "cache_dir": cache_dir, "device": device}
    presets = [*([preset] if preset else []), *optimizer.presets]
    try:
        config = build_config(presets=presets, overrides=overrides)
        if not config.save_state_every and not config.save_every:
            config = config.replace(save_state_every=STATE_EVERY)
        if resume:
            config = _resume_config(resume, run_config, config)
    except errors as e:
        raise fail("Trainer", e) from None
    throttle = Throttle(EVENT_INTERVAL_S)
    node = str(node_id) if node_id is not None else None

    stop_types: list = []  # the exception class the progress callback raised (ComfyUI's Cancel)
    samples: list = []  # the last set of sample images (PIL)

    def on_step(rec: dict) -> None:
        step, last = rec["step"], rec["step"] >= rec["steps_total"]
        preview = None
        if config.sample_every and step % config.sample_every == 0:  # the trainer sampled just before this call
            images = previews.load_images(previews.sample_paths(rec["run_dir"], step))
            if images:
                samples[:] = images
                preview = previews.strip(images)
                send_event(TELEMETRY_EVENT, {"node": node, "status": "sample", "step": step,
                                             "steps_total": rec["steps_total"], "run_dir": rec["run_dir"],
                                             "samples": len(images)})
        if rec.get("barely_moving"):  # once a run: the trainer's "barely changed the LoRA" warning
            send_event(TELEMETRY_EVENT, {"node": node, "status": "warning", "step": step,
                                         "message": rec["barely_moving"]})
        if throttle.ready(force=last or step == 1):
            send_event(TELEMETRY_EVENT, {**event_payload(rec, node_id, config.optimizer), "run_dir": rec["run_dir"],
                                         "status": "running"})
        if progress is not None:
            try:  # raises InterruptProcessingException on Cancel
                progress(step, rec["steps_total"], preview)
            except BaseException as e:
                stop_types.append(type(e))
                raise

    def on_setup(phase: str, done: int, total: int) -> None:
        if check_cancel is not None:
            try:
                check_cancel()  # ComfyUI's interrupt check: Cancel works while the checkpoint loads
            except BaseException as e:
                stop_types.append(type(e))
                raise

    send_event(TELEMETRY_EVENT, {"node": node, "status": "starting", "step": 0, "steps_total": config.steps,
                                 "optimizer": config.optimizer})
    failure: BaseException | None = None
    cancelled: type | None = None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            if gpus > 1:
                result = _train_in_child(config, gpus, on_step, check_cancel, stop_types)
            else:
                result = train(config, on_step=on_step, on_setup=on_setup)
    except errors as e:
        failure = fail("Trainer", e)
    except BaseException as e:
        if not (stop_types and type(e) is stop_types[-1]):
            send_event(TELEMETRY_EVENT, {"node": node, "status": "failed"})
            raise  # unexpected: keep the full traceback
        cancelled = type(e)
    # Raised outside the except blocks: the original exception's traceback would otherwise keep the trainer (and
    # its multi-GB model) alive for as long as ComfyUI keeps the error around.
    if failure is not None or cancelled is not None:
        import gc

        gc.collect()
    if failure is not None:
        send_event(TELEMETRY_EVENT, {"node": node, "status": "failed", "error": str(failure)})
        raise failure
    if cancelled is not None:
        saved = os.path.basename(output) if os.path.isfile(output) else None  # None: cancelled before step 1
        send_event(TELEMETRY_EVENT, {"node": node, "status": "interrupted", "lora": saved})
        try:
            fresh = cancelled()
        except Exception:
            fresh = RuntimeError(f"EmoLoRA Trainer: cancelled ({cancelled.__name__}); the LoRA so far is saved as "
                                 f"{os.path.basename(output)}")
        raise fresh
    if not result.lora_path:
        raise EmoLoRAError(f"EmoLoRA Trainer: the run ended ({result.stop_reason}) without saving a LoRA; see "
                           f"{result.run_dir}")
    send_event(TELEMETRY_EVENT, {"node": node, "status": "done",
                                 "step": result.steps_done, "steps_total": config.steps,
                                 "stop_reason": result.stop_reason, "message": result.message,
                                 "lora": os.path.basename(result.lora_path), "run_dir": result.run_dir})
    rel = os.path.relpath(result.lora_path, lora_dir)
    return {"lora_path": result.lora_path, "lora_name": rel.replace(os.sep, "/"), "run_dir": result.run_dir,
            "steps_done": result.steps_done, "stop_reason": result.stop_reason, "samples": list(samples),
            "config": config, "message": result.message or "", "validation": validation_line(result.summary),
            "barely_moving": barely_moving_message(result.run_dir)}


def result_text(out: dict, preset_line: str = "") -> str:
    """The Trainer node's text output: the LoRA and its steps, why it stopped, the "barely changed the LoRA"
    warning, the validation loss, the run folder and the preset line (empty lines left out)."""
    lines = [f"{out['lora_name']}: {out['steps_done']} steps ({out['stop_reason']})", out["message"],
             out["barely_moving"], out["validation"], f"run: {out['run_dir']}", preset_line]
    return "\n".join(x for x in lines if x)


def barely_moving_message(run_dir) -> str:
    """The run's "barely changed the LoRA" warning (also when a torchrun child or an earlier part of a resumed run
    raised it), or ""."""
    from ..trainer import runstore

    reader = runstore.RunReader(run_dir)
    try:
        return runstore.barely_moving_message(reader.events(kind="barely_moving")) or ""
    finally:
        reader.close()

