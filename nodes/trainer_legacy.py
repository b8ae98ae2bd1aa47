"""The v0.1.0 Trainer (node id EmoLoRA_Trainer, every option on one node), kept so that saved workflows keep
loading and training the same: ComfyUI's frontend restores widget values by position, so a workflow saved with
this node must meet exactly its widgets in their order. Hidden from the node search (deprecated); new graphs use
the compact Trainer with the Training Options node."""

from __future__ import annotations

from comfy_api.latest import io

from ._common import CATEGORY, PREFIX
from .dataset import DatasetType
from .optimizer import OptimizerType
from .trainer_inputs import legacy_inputs
from .trainer_node import DESCRIPTION, outputs, train_node


class EmoLoRATrainerLegacy(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        widgets = legacy_inputs()
        return io.Schema(
            node_id=PREFIX + "Trainer",
            display_name="EmoLoRA Trainer (SDXL, all options; legacy)",
            category=CATEGORY,
            description=DESCRIPTION + " The v0.1.0 node, kept for saved workflows: new graphs use EmoLoRA Trainer "
                                      "(SDXL) with EmoLoRA Training Options.",
            inputs=[widgets[0], DatasetType.Input("dataset"), OptimizerType.Input("optimizer"), *widgets[1:]],
            outputs=outputs(),
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            is_deprecated=True,
        )

    @classmethod
    def execute(cls, dataset, optimizer, **widgets) -> io.NodeOutput:
        return train_node(cls, dataset, optimizer, widgets)
