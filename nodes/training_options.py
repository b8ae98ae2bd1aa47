"""EmoLoRA Training Options: every training choice the compact Trainer does not show (trainer_inputs.WIDGETS),
handed to the Trainer as one immutable value. Its widget defaults are the trainer's own, so an untouched Options
node trains as no Options node; picking a preset on the Trainer fills these widgets too (emolora_defaults.js)."""

from __future__ import annotations

from comfy_api.latest import io

from ._common import CATEGORY, PREFIX, TrainingOptions, freeze_settings
from .trainer_inputs import OPTION_WIDGETS, inputs
from .trainer_node import OptionsType


class EmoLoRATrainingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "TrainingOptions",
            display_name="EmoLoRA Training Options",
            category=CATEGORY,
            description="The rest of the training choices (network details, batch, precision, seed, saves, "
                        "samples, validation, auto-stop). Connect its output to the Trainer's options input; its "
                        "values win over the Trainer's preset.",
            inputs=inputs(OPTION_WIDGETS, False),
            outputs=[OptionsType.Output("options", display_name="options")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        return io.NodeOutput(TrainingOptions(freeze_settings(values)))
