"""EmoLoRA Trainer: trains an SDXL LoRA in-process with the trainer core and saves it into ComfyUI's loras folder
(see training.py for the host contract: inference mode, ProgressBar as the interrupt check, telemetry events).
The node shows what a first LoRA needs; the Training Options node (training_options.py) carries the rest."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ._common import CATEGORY, OPTIONS_TYPE, PREFIX, EmoLoRAError, TrainingOptions
from .dataset import DatasetType
from .optimizer import OptimizerType
from .previews import PREVIEW_MAX, to_image_batch
from .trainer_inputs import TRAINER_OPTIONAL, TRAINER_WIDGETS, inputs, work_dir
from .training import (
    NO_LORA,
    NO_PRESET,
    comfy_device,
    free_comfy_models,
    preset_status,
    result_text,
    resume_run_dir,
    run_training,
    widgets_to_config,
)

OptionsType = io.Custom(OPTIONS_TYPE)
DESCRIPTION = ("Train an SDXL LoRA (or LoHa/LoKr) with an Emo optimizer. Frees ComfyUI's loaded models first. Cancel "
               "stops gracefully and the LoRA so far is saved. The LoRA goes to the loras folder (kohya/LyCORIS "
               "keys), so LoraLoader lists it. Sample previews appear on the node while it trains.")


def outputs() -> list:
    """The Trainer's outputs (new objects for each schema: the legacy node has the same)."""
    return [io.String.Output("lora_name", display_name="lora_name"),
            io.Image.Output("telemetry", display_name="telemetry"),
            io.String.Output("run_dir", display_name="run_dir"),
            io.Image.Output("samples", display_name="samples")]


class EmoLoRATrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "SDXLTrainer",
            display_name="EmoLoRA Trainer (SDXL)",
            category=CATEGORY,
            description=DESCRIPTION + " More options: connect an EmoLoRA Training Options node; without it the "
                                      "preset and the trainer's defaults apply.",
            inputs=[
                *inputs(TRAINER_WIDGETS[:1], False),
                DatasetType.Input("dataset"),
                OptimizerType.Input("optimizer"),
                *inputs(TRAINER_WIDGETS[1:], False),
                OptionsType.Input("options", optional=True,
                                  tooltip="An EmoLoRA Training Options node: batch size, precision, seed, saves, "
                                          "network details, validation, ..."),
                *inputs(TRAINER_OPTIONAL, True),
            ],
            outputs=outputs(),
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # training is the point (the LoRA file): a graph with only the trainer runs
        )

    @classmethod
    def execute(cls, dataset, optimizer, options=None, **widgets) -> io.NodeOutput:
        if options is not None and not isinstance(options, TrainingOptions):
            raise EmoLoRAError("EmoLoRA Trainer: 'options' must come from an EmoLoRA Training Options node")
        return train_node(cls, dataset, optimizer, {**(options.values() if options else {}), **widgets})


def train_node(cls, dataset, optimizer, values: dict) -> io.NodeOutput:
    """Train from the widget values of a training node (the Trainer's with its Options', or the legacy node's)."""
    import comfy.model_management
    import comfy.utils
    import folder_paths

    from .plot import telemetry_image

    node_id = cls.hidden.unique_id
    values = dict(values)
    try:
        checkpoint = folder_paths.get_full_path_or_raise("checkpoints", values["ckpt_name"])
        if values.get("network_weights") not in (None, "", NO_LORA):
            values["network_weights"] = folder_paths.get_full_path_or_raise("loras", values["network_weights"])
    except FileNotFoundError as e:
        raise EmoLoRAError(f"EmoLoRA Trainer: not found: {e}") from None
    preset = None if values.get("preset") in (None, NO_PRESET) else values["preset"]
    lora_dir = folder_paths.get_folder_paths("loras")[0]
    work = work_dir()
    resume = resume_run_dir(os.path.join(work, "runs"), values.pop("resume", None))
    options = widgets_to_config(values)
    free_comfy_models()
    bar = comfy.utils.ProgressBar(int(values["steps"]), node_id=node_id)

    def progress(step, total, preview=None):  # each update is ComfyUI's interrupt check too
        shown = None if preview is None else ("PNG", preview, min(PREVIEW_MAX, max(preview.size)))  # no upscale
        bar.update_absolute(step, total, shown)

    out = run_training(checkpoint=checkpoint, dataset=dataset, optimizer=optimizer, lora_dir=lora_dir,
                       runs_dir=os.path.join(work, "runs"), cache_dir=os.path.join(work, "cache"),
                       output_name=values.get("output_name", "emolora"), node_id=node_id, device=comfy_device(),
                       progress=progress, preset=preset, gpus=int(values.get("gpus") or 1), resume=resume,
                       check_cancel=comfy.model_management.throw_exception_if_processing_interrupted, **options)
    cfg = out["config"]
    samples = to_image_batch(out["samples"], fallback_size=cfg.sample_size or 64)
    shown = {**ui.PreviewText(result_text(out, preset_status(preset, cfg))).as_dict()}
    if out["samples"]:
        shown.update(ui.PreviewImage(samples, cls=cls).as_dict())
    return io.NodeOutput(out["lora_name"], telemetry_image(out["run_dir"]), out["run_dir"], samples, ui=shown)
