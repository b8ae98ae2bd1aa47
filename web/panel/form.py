"""The start form's logic, without Gradio: what it offers (presets, the optimizer's own arguments, the network
and validation options) and the form's choices -> the presets and overrides the trainer's CLI merges.

A value is passed on only where it differs from what the chosen presets and optimizer already give, so the run
the form starts is the run `python -m trainer train` starts with the same choices as flags.
"""

import json
import math

from ...trainer.config import (
    CHOICES,
    OPTIMIZER_NAMES,
    ConfigError,
    TrainConfig,
    build_config,
    list_presets,
    load_preset,
    optimizer_preset_name,
)
from .paths import PathError

NONE = "(none)"
NETWORK_TYPES = CHOICES["network"]
MASKS = CHOICES["mask"]  # masked loss: none, <stem>_mask.png beside each image, the alpha channel
AUTO_STOP_ON = CHOICES["auto_stop_on"]  # what auto-stop acts on: the optimizer's flag or the validation loss
# Constructor arguments that are not the optimizer's maths: the trainer sets them (or they only print).
ENGINE_ARGS = {"self", "params", "defaults", "lr", "writer", "foreach", "state_dtype", "fused", "dtype", "notify",
               "maximize", "capturable", "differentiable"}


def training_presets() -> list[dict]:
    """[{name, description}] of the training presets (character, style, concept, low-vram, ...)."""
    return [p for p in list_presets() if p["kind"] != "optimizer"]


def preset_summary(name) -> str:
    if not name or name == NONE:
        return "no training preset: the trainer's defaults and the optimizer's preset"
    settings = load_preset(name)
    return f"**{name}** sets " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in settings.items())


# ---- the optimizer's own arguments ------------------------------------------------------------------------------
def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def constructor_defaults(name: str) -> dict:
    """The optimizer's own keyword arguments with their defaults, without lr and the engine's switches."""
    if name not in OPTIMIZER_NAMES:
        raise ConfigError(f"optimizer: unknown name {name!r}")
    from ...trainer.optim import constructor_defaults as defaults_of

    return {k: _jsonable(v) for k, v in defaults_of(name).items() if k not in ENGINE_ARGS}


def _preset_args(name: str) -> dict:
    preset = optimizer_preset_name(name)
    return dict(load_preset(preset).get("optimizer_args") or {}) if preset else {}


def optimizer_defaults(name: str) -> dict:
    """What the form shows for `name`: its constructor's defaults with its own preset's values on top."""
    return {**constructor_defaults(name), **{k: _jsonable(v) for k, v in _preset_args(name).items()}}


def recommended_lr(name: str):
    preset = optimizer_preset_name(name)
    return load_preset(preset).get("lr") if preset else None


def _same_kind(value, default) -> bool:
    number = (int, float)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, number) or default is None:
        return value is None and default is None or isinstance(value, number) and not isinstance(value, bool)
    if isinstance(default, list):
        return isinstance(value, list) and len(value) == len(default) and all(
            isinstance(v, number) and not isinstance(v, bool) for v in value)
    return isinstance(value, type(default))


def optimizer_args(name: str, text: str) -> dict:
    """The form's JSON of arguments -> the optimizer_args to pass: {} when nothing changed; else every argument
    that differs from the constructor's default, plus the optimizer preset's (a config's optimizer_args replaces
    the preset's as a whole)."""
    shown = optimizer_defaults(name)
    try:
        given = json.loads(text) if text and text.strip() else {}
    except ValueError as e:
        raise ConfigError(f"optimizer arguments: not valid JSON ({e})") from None
    if not isinstance(given, dict):
        raise ConfigError("optimizer arguments: a JSON object, e.g. {\"weight_decay\": 0.01}")
    for k, v in given.items():
        if k not in shown:
            raise ConfigError(f"optimizer arguments: {name} takes no {k!r}; its arguments: {', '.join(shown)}")
        if not _same_kind(v, shown[k]) or isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"optimizer arguments: {k} must be like {json.dumps(shown[k])}, got {json.dumps(v)}")
    given = {**shown, **given}
    if given == shown:
        return {}
    ctor, preset = constructor_defaults(name), _preset_args(name)
    return {k: v for k, v in given.items() if k in preset or v != ctor[k]}


# ---- choices -> presets and overrides ---------------------------------------------------------------------------
def defaults(preset, optimizer: str) -> TrainConfig:
    """The config the chosen presets give before the form's own values (what the form shows)."""
    return build_config(presets=[preset] if preset and preset != NONE else [], overrides={"optimizer": optimizer},
                        validate=False)


def run_options(model_roots, data_roots, *, model, dataset, optimizer, preset, steps, lr=None, args_text="",
                resolution=None, rank=None, network=None, dora=None, rslora=None, validation_split=None,
                validation_data=None, validation_every=None, auto_stop_on=None, mask=None) -> tuple:
    """(presets, overrides) for the trainer; paths confined to the roots. Raises PathError or ConfigError."""
    if optimizer not in OPTIMIZER_NAMES:
        raise ConfigError(f"optimizer: unknown name {optimizer!r}")
    base = defaults(preset, optimizer)
    model_path = model_roots.resolve(model)
    if not model_path.exists():
        raise PathError(f"model not found: {model}")
    data_path = data_roots.resolve(dataset)
    if not data_path.is_dir():
        raise PathError(f"dataset folder not found: {dataset}")
    overrides = {"model": str(model_path), "data": str(data_path), "optimizer": optimizer, "steps": int(steps)}
    chosen = {"lr": lr, "resolution": resolution, "rank": rank, "network": network, "dora": dora,
              "rslora": rslora, "validation_split": validation_split, "validation_every": validation_every,
              "auto_stop_on": auto_stop_on, "mask": mask}
    for key, value in chosen.items():
        if value is not None and value != getattr(base, key):
            overrides[key] = value
    if validation_data:
        folder = data_roots.resolve(validation_data)
        if not folder.is_dir():
            raise PathError(f"validation folder not found: {validation_data}")
        overrides["validation_data"] = str(folder)
    args = optimizer_args(optimizer, args_text)
    if args:
        overrides["optimizer_args"] = args
    presets = [preset] if preset and preset != NONE else []
    return presets, overrides
