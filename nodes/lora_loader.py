"""EmoLoRA Load Trained LoRA: apply a LoRA given by name (relative to the loras folder) or path to MODEL and CLIP.

The stock LoraLoader's file list is built when the graph is queued, before the trainer has written the file, so
train-then-sample in one graph needs a loader that takes the file name as a linked string."""

from __future__ import annotations

import os

from comfy_api.latest import io

from ._common import CATEGORY, PREFIX, EmoLoRAError


def resolve_lora(name: str) -> str:
    import folder_paths

    name = (name or "").strip()
    if not name:
        raise EmoLoRAError("EmoLoRA Load Trained LoRA: no LoRA name (connect the trainer's lora_name)")
    if os.path.isabs(name) and os.path.isfile(name):
        return name
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise EmoLoRAError(f"EmoLoRA Load Trained LoRA: {name!r} is not in the loras folders "
                           f"({', '.join(folder_paths.get_folder_paths('loras'))})")
    return path


class EmoLoRALoadTrainedLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "LoadTrainedLoRA",
            display_name="EmoLoRA Load Trained LoRA",
            category=CATEGORY,
            description="Apply the LoRA the trainer just wrote (its lora_name output) to MODEL and CLIP.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input("lora_name", force_input=True, lazy=True,
                                tooltip="A file name in the loras folder (or an absolute path)."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01),
            ],
            outputs=[io.Model.Output("MODEL", display_name="MODEL"), io.Clip.Output("CLIP", display_name="CLIP")],
        )

    @classmethod
    def check_lazy_status(cls, model, clip, strength_model, strength_clip, lora_name=None):
        # Both strengths 0: the LoRA (and the training that makes it) is not needed.
        if lora_name is None and (strength_model != 0 or strength_clip != 0):
            return ["lora_name"]
        return []

    @classmethod
    def execute(cls, model, clip, strength_model, strength_clip, lora_name=None) -> io.NodeOutput:
        if strength_model == 0 and strength_clip == 0:
            return io.NodeOutput(model, clip)
        import comfy.sd
        import comfy.utils

        path = resolve_lora(lora_name)
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)
        return io.NodeOutput(model_out, clip_out)
