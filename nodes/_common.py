"""Shared bits of the EmoLoRA nodes: the custom socket types, the immutable specs they carry, error wrapping, and
lazy access to ComfyUI's host modules (never imported at our import time: ComfyUI provides them)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("emolora.nodes")

CATEGORY = "EmoLoRA"
PREFIX = "EmoLoRA_"
TELEMETRY_EVENT = "emolora.telemetry"
OPTIMIZER_TYPE = "EMOLORA_OPTIMIZER"
DATASET_TYPE = "EMOLORA_DATASET"
OPTIONS_TYPE = "EMOLORA_TRAINING_OPTIONS"
PACK_ROOT = Path(__file__).resolve().parent.parent


class EmoLoRAError(RuntimeError):
    """A clear, user-facing failure: ComfyUI shows the message in its error dialog."""


def fail(node: str, exc: BaseException) -> EmoLoRAError:
    """Wrap an expected trainer error (ConfigError, DatasetError, ModelError, ...) into one clear message."""
    return EmoLoRAError(f"EmoLoRA {node}: {exc}")


# ---- trainer metadata (torch-free: trainer.optim loads its optimizers only on first use) -------------------------
def optimizer_info() -> dict:
    """name -> OptimizerInfo (AdamW included)."""
    from ..trainer.optim import OPTIMIZER_INFO

    return dict(OPTIMIZER_INFO)


def optimizer_names() -> list[str]:
    """The registry order of trainer.config (AdamW moved first, as the baseline)."""
    from ..trainer.config import OPTIMIZER_NAMES

    return ["AdamW", *[n for n in OPTIMIZER_NAMES if n != "AdamW"]]


def is_pulse_line(name: str) -> bool:
    """The EmoSens line (v3.9.x): step size from emoPulse, lr is the emoPulse scale (emoScope)."""
    info = optimizer_info().get(name)
    return info is not None and "emo_pulse" in info.signals


def preset_files(kind: str | None = None) -> list[dict]:
    from ..trainer.config import list_presets

    return [p for p in list_presets() if kind is None or p["kind"] == kind]


def training_presets() -> dict:
    """name -> {description, settings} of the training presets (character, style, ...), their `extends` chains
    resolved by trainer.config.load_preset, the function the CLI's merge uses."""
    from ..trainer.config import load_preset

    return {p["name"]: {"description": p["description"], "settings": load_preset(p["name"])}
            for p in preset_files("training")}


def describe_settings(settings: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())


def preset_optimizer(name: str) -> str | None:
    from ..trainer.config import PRESETS_DIR

    try:
        data = json.loads((PRESETS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    settings = data.get("settings", {})
    if "optimizer" in settings:
        return settings["optimizer"]
    return preset_optimizer(data["extends"]) if data.get("extends") else None


# ---- the immutable specs passed between nodes ------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerSpec:
    """What the Optimizer node hands the Trainer: a name, preset names and TrainConfig overrides (never a live
    torch optimizer: ComfyUI caches node outputs and reuses them across runs)."""

    optimizer: str
    presets: tuple = ()
    settings: tuple = ()  # sorted (key, json-encoded value) pairs of TrainConfig fields

    def overrides(self) -> dict:
        return {k: json.loads(v) for k, v in self.settings}

    def describe(self) -> str:
        parts = [self.optimizer]
        if self.presets:
            parts.append("preset " + "+".join(self.presets))
        parts += [f"{k}={json.loads(v)}" for k, v in self.settings if k != "optimizer"]
        return ", ".join(parts)


def freeze_settings(d: dict) -> tuple:
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in d.items()))


@dataclass(frozen=True)
class DatasetSpec:
    """What the Dataset node hands the Trainer: a scanned folder plus the data options of TrainConfig."""

    folder: str
    images: int
    samples_per_epoch: int
    skipped: tuple = ()
    settings: tuple = field(default=())
    validation_images: int = 0  # held out of training (validation_split) or in the validation folder
    reg_images: int = 0  # regularization images found in the reg folder

    def overrides(self) -> dict:
        return {"data": self.folder, **{k: json.loads(v) for k, v in self.settings}}


@dataclass(frozen=True)
class TrainingOptions:
    """What the Training Options node hands the Trainer: its widget values by name (as the widgets hold them; the
    Trainer maps them to TrainConfig with training.widgets_to_config)."""

    settings: tuple = ()  # sorted (widget name, json-encoded value) pairs

    def values(self) -> dict:
        return {k: json.loads(v) for k, v in self.settings}


# ---- ComfyUI host access (lazy) --------------------------------------------------------------------------------
def folder_paths():
    import folder_paths as fp  # provided by ComfyUI

    return fp


def checkpoint_names() -> list[str]:
    try:
        return folder_paths().get_filename_list("checkpoints")
    except Exception:  # outside ComfyUI (unit tests)
        return []


def lora_names() -> list[str]:
    try:
        return folder_paths().get_filename_list("loras")
    except Exception:  # outside ComfyUI (unit tests)
        return []


def send_event(event: str, data: dict) -> None:
    """PromptServer.send_sync to the tab that queued the prompt (thread-safe on the worker thread)."""
    try:
        from server import PromptServer

        inst = PromptServer.instance
        inst.send_sync(event, data, getattr(inst, "client_id", None))
    except Exception as e:  # no server (unit tests) or a closed socket: telemetry is best-effort
        log.debug("send_sync(%s) failed: %r", event, e)


class Throttle:
    """At most one event per `interval` seconds; the caller forces the last one."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self._last = 0.0

    def ready(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            return True
        return False


def resolve_input_path(path: str, pathmod=os.path) -> str:
    """A folder typed by the user: absolute (a drive letter or share on Windows; quotes from Explorer's "Copy as
    path" dropped), ~, or relative to ComfyUI's input directory. pathmod: ntpath to check Windows paths anywhere."""
    path = pathmod.expanduser(path.strip().strip('"'))
    if pathmod.isabs(path):
        return path
    try:
        return pathmod.join(folder_paths().get_input_directory(), path)
    except Exception:
        return pathmod.abspath(path)
