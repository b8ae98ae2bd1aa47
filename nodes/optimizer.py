"""EmoLoRA Optimizer: pick a variant of the registry (or torch AdamW), a preset, and the parameters that matter for
its family; outputs an immutable, validated OptimizerSpec."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ._common import CATEGORY, OPTIMIZER_TYPE, PREFIX, optimizer_info, optimizer_names, preset_files
from .optimizer_spec import AUTO_PRESET, SCHEDULERS, build_spec, optimizer_defaults

OptimizerType = io.Custom(OPTIMIZER_TYPE)
DEFAULT_OPTIMIZER = "EmoNavi"


class EmoLoRAOptimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        info = optimizer_info()
        presets = [p["name"] for p in preset_files("optimizer")]
        d = optimizer_defaults(DEFAULT_OPTIMIZER)  # the widgets start at the default optimizer's real values
        return io.Schema(
            node_id=PREFIX + "Optimizer",
            display_name="EmoLoRA Optimizer",
            category=CATEGORY,
            description="An optimizer of the Emo family (or torch AdamW) with its preset and parameters, "
                        "validated here. The widgets show the values that train: picking an optimizer or a preset "
                        "fills them with its defaults. Parameters the optimizer does not take are ignored.",
            inputs=[
                io.Combo.Input("optimizer", options=optimizer_names(), default=DEFAULT_OPTIMIZER,
                               tooltip="; ".join(f"{n}: {i.description}" for n, i in info.items())),
                io.Combo.Input("preset", options=[AUTO_PRESET, *presets], default=AUTO_PRESET,
                               tooltip="An optimizer preset from presets/ (its optimizer must match); picking "
                                       "one fills the widgets below with its values."),
                io.Float.Input("lr", default=d["lr"], min=1e-8, max=1.0, step=1e-7, round=False,
                               tooltip="Learning rate. Set to the optimizer's (or the chosen preset's) value when "
                                       "you pick one. Not used by the EmoSens line (see emopulse_scale)."),
                io.Float.Input("emopulse_scale", default=d["emopulse_scale"], min=0.001, max=10.0, step=0.01,
                               tooltip="emoScope: the lr of the EmoSens line (EmoSens/Airy/Cats/Tion/Void) and "
                                       "the base of the EmoPulse scheduler."),
                io.Float.Input("beta1", default=d["beta1"], min=0.0, max=0.9999, step=0.001,
                               tooltip="The optimizer's beta1 (set to its default when you pick it); ignored by "
                                       "optimizers without betas (AutoTrustGO, RefAdamW)."),
                io.Float.Input("beta2", default=d["beta2"], min=0.0, max=0.9999, step=0.001,
                               tooltip="The optimizer's beta2 (set to its default when you pick it)."),
                io.Float.Input("weight_decay", default=d["weight_decay"], min=0.0, max=1.0, step=0.001,
                               tooltip="The optimizer's weight decay (set to its default when you pick it); "
                                       "ignored by optimizers without one."),
                io.Boolean.Input("use_shadow", default=d["use_shadow"],
                                 tooltip="Keep a shadow copy of the weights (Emo optimizers only)."),
                io.Float.Input("trust_level", default=d.get("trust_level", 0.4), min=0.0, max=1.0, step=0.05,
                               tooltip="AutoTrustGO only: 0 cautious .. 1 bold."),
                io.Boolean.Input("emopulse_scheduler", default=False,
                                 tooltip="Drive the LR of a non-EmoSens optimizer (AdamW included) by emoPulse."),
                io.Combo.Input("lr_scheduler", options=list(SCHEDULERS), default="constant"),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000),
            ],
            outputs=[OptimizerType.Output("optimizer_spec", display_name="optimizer")],
        )

    @classmethod
    def execute(cls, optimizer, preset, lr, emopulse_scale, beta1, beta2, weight_decay, use_shadow, trust_level,
                emopulse_scheduler, lr_scheduler, warmup_steps) -> io.NodeOutput:
        spec = build_spec(optimizer, preset, lr, emopulse_scale, beta1, beta2, weight_decay, use_shadow,
                          trust_level, emopulse_scheduler, lr_scheduler, warmup_steps)
        return io.NodeOutput(spec, ui=ui.PreviewText(spec.describe()))
