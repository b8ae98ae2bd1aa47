"""EmoLoRA Optimizer: pick a variant of the registry (or torch AdamW), a preset, and the parameters that matter for
its family; outputs an immutable, validated OptimizerSpec."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ._common import CATEGORY, OPTIMIZER_TYPE, PREFIX, optimizer_info, optimizer_names, preset_files
from .optimizer_spec import AUTO_PRESET, SCHEDULERS, build_spec

OptimizerType = io.Custom(OPTIMIZER_TYPE)


class EmoLoRAOptimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        info = optimizer_info()
        presets = [p["name"] for p in preset_files("optimizer")]
        return io.Schema(
            node_id=PREFIX + "Optimizer",
            display_name="EmoLoRA Optimizer",
            category=CATEGORY,
            description="An optimizer of the Emo family (or torch AdamW) with its preset and parameters, "
                        "validated here. Unused parameters of other families are ignored.",
            inputs=[
                io.Combo.Input("optimizer", options=optimizer_names(), default="EmoNavi",
                               tooltip="; ".join(f"{n}: {i.description}" for n, i in info.items())),
                io.Combo.Input("preset", options=[AUTO_PRESET, *presets], default=AUTO_PRESET,
                               tooltip="An optimizer preset from presets/ (its optimizer must match)."),
                io.Float.Input("lr", default=0.0, min=0.0, max=1.0, step=1e-6, round=False,
                               tooltip="Learning rate; 0 = the preset's or the optimizer's recommended SDXL-LoRA "
                                       "value. Not used by the EmoSens line (see emopulse_scale)."),
                io.Float.Input("emopulse_scale", default=1.0, min=0.001, max=10.0, step=0.01,
                               tooltip="emoScope: the lr of the EmoSens line (EmoSens/Airy/Cats/Tion/Void) and "
                                       "the base of the EmoPulse scheduler."),
                io.Float.Input("beta1", default=-1.0, min=-1.0, max=0.9999, step=0.001,
                               tooltip="-1 = the optimizer's default."),
                io.Float.Input("beta2", default=-1.0, min=-1.0, max=0.9999, step=0.001,
                               tooltip="-1 = the optimizer's default."),
                io.Float.Input("weight_decay", default=-1.0, min=-1.0, max=1.0, step=0.001,
                               tooltip="-1 = the optimizer's default."),
                io.Boolean.Input("use_shadow", default=False,
                                 tooltip="Keep a shadow copy of the weights (Emo optimizers only)."),
                io.Float.Input("trust_level", default=0.4, min=0.0, max=1.0, step=0.05,
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
