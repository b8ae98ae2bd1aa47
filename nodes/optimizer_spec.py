"""The Optimizer node's logic, free of ComfyUI imports (unit-testable): widget values -> a validated
OptimizerSpec."""

from __future__ import annotations

import inspect

from ._common import (
    EmoLoRAError,
    OptimizerSpec,
    fail,
    freeze_settings,
    is_pulse_line,
    optimizer_names,
    preset_optimizer,
)

AUTO_PRESET = "auto (the optimizer's own)"
SCHEDULERS = ("constant", "cosine", "linear")


def _accepted_kwargs(name: str) -> set[str] | None:
    """Keyword arguments the optimizer's constructor takes (None: it takes **kwargs we cannot see through)."""
    if name == "AdamW":
        return {"lr", "betas", "eps", "weight_decay", "amsgrad"}
    from ..trainer.optim import OPTIMIZERS

    names, cls = set(), OPTIMIZERS[name]
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        names |= {p for p, v in params.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
        if not any(v.kind == v.VAR_KEYWORD for v in params.values()):
            break
    return names - {"self", "params"}


def build_spec(optimizer: str, preset: str, lr: float, emopulse_scale: float, beta1: float, beta2: float,
               weight_decay: float, use_shadow: bool, trust_level: float, emopulse_scheduler: bool,
               lr_scheduler: str, warmup_steps: int) -> OptimizerSpec:
    """Validate the widget values and turn them into TrainConfig overrides (raises EmoLoRAError)."""
    from ..trainer.config import ConfigError, build_config

    names = optimizer_names()
    if optimizer not in names:
        raise EmoLoRAError(f"EmoLoRA Optimizer: unknown optimizer {optimizer!r}; choose one of {', '.join(names)}")
    presets: tuple = ()
    if preset and preset != AUTO_PRESET:
        owner = preset_optimizer(preset)
        if owner is not None and owner != optimizer:
            raise EmoLoRAError(f"EmoLoRA Optimizer: preset {preset!r} is for {owner}, not {optimizer}; pick "
                               f"{owner} or the preset '{AUTO_PRESET}'")
        presets = (preset,)
    pulse_line = is_pulse_line(optimizer)
    accepted = _accepted_kwargs(optimizer) or set()
    settings: dict = {"optimizer": optimizer}
    args: dict = {}
    if pulse_line:
        settings["lr"] = float(emopulse_scale)  # the EmoSens line's lr is emoScope, the emoPulse scale
    elif lr > 0:
        settings["lr"] = float(lr)
    if beta1 >= 0 or beta2 >= 0:
        if "betas" not in accepted:
            raise EmoLoRAError(f"EmoLoRA Optimizer: {optimizer} takes no betas; set beta1 and beta2 to -1")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise EmoLoRAError(f"EmoLoRA Optimizer: set both betas in [0, 1) (or both to -1 for the defaults); "
                               f"got {beta1}, {beta2}")
        args["betas"] = [float(beta1), float(beta2)]
    if weight_decay >= 0:
        if "weight_decay" not in accepted:
            raise EmoLoRAError(f"EmoLoRA Optimizer: {optimizer} takes no weight_decay; set it to -1")
        args["weight_decay"] = float(weight_decay)
    if use_shadow:
        if "use_shadow" not in accepted:
            raise EmoLoRAError(f"EmoLoRA Optimizer: {optimizer} has no shadow; turn use_shadow off")
        args["use_shadow"] = True
    if optimizer == "AutoTrustGO":
        args["trust_level"] = float(trust_level)
    if args:
        settings["optimizer_args"] = args
    if emopulse_scheduler:
        if pulse_line:
            raise EmoLoRAError(f"EmoLoRA Optimizer: {optimizer} already takes its step size from emoPulse; the "
                               "EmoPulse scheduler is for the other optimizers (turn it off)")
        settings["lr_scheduler"] = "emopulse"
        settings["scheduler_args"] = {"base_lr": float(emopulse_scale)}
    elif lr_scheduler != "constant":
        if pulse_line:
            raise EmoLoRAError(f"EmoLoRA Optimizer: {optimizer} sets its own step size (emoPulse); an LR schedule "
                               "has no effect, use 'constant'")
        settings["lr_scheduler"] = lr_scheduler
    if warmup_steps:
        settings["warmup_steps"] = int(warmup_steps)
    try:  # the trainer's own validation, without paths
        build_config(presets=list(presets), overrides=settings, validate=False).validate(require_paths=False)
    except ConfigError as e:
        raise fail("Optimizer", e) from None
    return OptimizerSpec(optimizer=optimizer, presets=presets, settings=freeze_settings(settings))
