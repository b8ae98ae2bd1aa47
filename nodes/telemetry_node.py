"""EmoLoRA Telemetry Plot: loss, emo_scalar and the variant's signals of a run as an IMAGE."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ._common import CATEGORY, PREFIX, EmoLoRAError


class EmoLoRATelemetryPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "TelemetryPlot",
            display_name="EmoLoRA Telemetry Plot",
            category=CATEGORY,
            description="Chart of a training run (loss, emo_scalar, the optimizer's signals) for Preview/Save Image.",
            inputs=[io.String.Input("run_dir", force_input=True, tooltip="The trainer's run_dir output.")],
            outputs=[io.Image.Output("IMAGE", display_name="IMAGE")],
        )

    @classmethod
    def fingerprint_inputs(cls, run_dir):
        path = os.path.join(run_dir or "", "telemetry.sqlite")
        return os.path.getmtime(path) if os.path.isfile(path) else float("nan")

    @classmethod
    def execute(cls, run_dir) -> io.NodeOutput:
        from .plot import telemetry_image

        if not run_dir or not os.path.isfile(os.path.join(run_dir, "telemetry.sqlite")):
            raise EmoLoRAError(f"EmoLoRA Telemetry Plot: not a run folder: {run_dir!r}")
        image = telemetry_image(run_dir)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))
