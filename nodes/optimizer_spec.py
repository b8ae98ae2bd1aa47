"""The Optimizer node's logic, free of ComfyUI imports (unit-testable): widget values -> a validated
OptimizerSpec."""

from __future__ import annotations

from ._common import (
    EmoLoRAError,
    OptimizerSpec,
    fail,
    freeze_settings,
    is_pulse_line,
    optimizer_info,
    optimizer_names,
    preset_files,
    preset_optimizer,
)

AUTO_PRESET = "auto (the optimizer's own)"
SCHEDULERS = ("constant", "cosine", "linear")


def _accepted_kwargs(name: str) -> set[str]:
    from ..trainer.optim import constructor_defaults

    return set(constructor_defaults(name))


def optimizer_defaults(optimizer: str, preset: str = AUTO_PRESET) -> dict:
    """The values this optimizer trains with when nothing else is set: its preset (the chosen one, else its own,
    merged by trainer.config exactly as the CLI merges it) over its constructor's defaults. Keys are widget
    names; a parameter the optimizer does not take is absent."""
    from ..trainer.config import build_config
    from ..trainer.optim import constructor_defaults

    presets = [preset] if preset and preset != AUTO_PRESET else []
    cfg = build_config(presets=presets, overrides={"optimizer": optimizer}, validate=False)
    ctor = {**constructor_defaults(optimizer), **cfg.optimizer_args}
    lr = cfg.lr if cfg.lr is not None else optimizer_info()[optimizer].recommended_lr
    out: dict = {"lr_scheduler": cfg.lr_scheduler if cfg.lr_scheduler in SCHEDULERS else "constant",
                 "warmup_steps": int(cfg.warmup_steps),
                 "emopulse_scheduler": cfg.lr_scheduler == "emopulse"}
    if is_pulse_line(optimizer):
        out["emopulse_scale"] = float(lr)
    else:
        out["lr"] = float(lr)
        out["emopulse_scale"] = float(cfg.scheduler_args.get("base_lr", 1.0))
    if ctor.get("betas") is not None:
        out["beta1"], out["beta2"] = (float(b) for b in ctor["betas"])
    if ctor.get("weight_decay") is not None:
        out["weight_decay"] = float(ctor["weight_decay"])
    if "use_shadow" in ctor:
        out["use_shadow"] = bool(ctor["use_shadow"])
    if "trust_level" in ctor:
        out["trust_level"] = float(ctor["trust_level"])
    return out


def defaults_table() -> dict:
    """{optimizer: {preset: optimizer_defaults}} for every optimizer and each preset of it (the frontend fills
    the Optimizer node's widgets from it when the optimizer or the preset changes)."""
    table: dict = {}
    for name in optimizer_names():
        own = [p["name"] for p in preset_files("optimizer") if preset_optimizer(p["name"]) == name]
        table[name] = {p: optimizer_defaults(name, p) for p in (AUTO_PRESET, *own)}
    return table


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
    accepted = _accepted_kwargs(optimizer)
    settings: dict = {"optimizer": optimizer}
    # The preset's other optimizer arguments (those without a widget) stay: a config layer replaces the whole
    # optimizer_args of the layers below it.
    args: dict = dict(build_config(presets=list(presets), overrides={"optimizer": optimizer},
                                   validate=False).optimizer_args)
    # Every value is explicit (the widgets show the real defaults): what the workflow records is what trains.
    # A parameter the optimizer does not take is ignored (its widget keeps whatever it shows).
    if pulse_line:
        settings["lr"] = float(emopulse_scale)  # the EmoSens line's lr is emoScope, the emoPulse scale
    else:
        if not lr > 0:
            raise EmoLoRAError(f"EmoLoRA Optimizer: lr must be > 0, got {lr}")
        settings["lr"] = float(lr)
    if "betas" in accepted:
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise EmoLoRAError(f"EmoLoRA Optimizer: beta1 and beta2 must be in [0, 1); got {beta1}, {beta2}")
        args["betas"] = [float(beta1), float(beta2)]
    if "weight_decay" in accepted:
        if weight_decay < 0:
            raise EmoLoRAError(f"EmoLoRA Optimizer: weight_decay must be >= 0, got {weight_decay}")
        args["weight_decay"] = float(weight_decay)
    if use_shadow and "use_shadow" not in accepted:
        raise EmoLoRAError(f"EmoLoRA Optimizer: {optimizer} has no shadow; turn use_shadow off")
    if "use_shadow" in accepted:
        args["use_shadow"] = bool(use_shadow)
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
    else:
        if lr_scheduler != "constant" and pulse_line:
            raise EmoLoRAError(f"EmoLoRA Optimizer: {optimizer} sets its own step size (emoPulse); an LR schedule "
                               "has no effect, use 'constant'")
        settings["lr_scheduler"] = lr_scheduler
    settings["warmup_steps"] = int(warmup_steps)
    try:  # the trainer's own validation, without paths
        build_config(presets=list(presets), overrides=settings, validate=False).validate(require_paths=False)
    except ConfigError as e:
        raise fail("Optimizer", e) from None
    return OptimizerSpec(optimizer=optimizer, presets=presets, settings=freeze_settings(settings))
