"""EmoLoRA Trainer: trains an SDXL LoRA in-process with the trainer core and saves it into ComfyUI's loras folder
(see training.py for the host contract: inference mode, ProgressBar as the interrupt check, telemetry events)."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ._common import CATEGORY, PREFIX, EmoLoRAError, checkpoint_names
from .dataset import DatasetType
from .optimizer import OptimizerType
from .training import PRECISIONS, comfy_device, free_comfy_models, run_training


class EmoLoRATrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "Trainer",
            display_name="EmoLoRA Trainer (SDXL)",
            category=CATEGORY,
            description="Train an SDXL LoRA with an Emo optimizer. Frees ComfyUI's loaded models first. Cancel "
                        "stops gracefully and the LoRA so far is saved. The LoRA goes to the loras folder "
                        "(kohya keys), so LoraLoader lists it.",
            inputs=[
                io.Combo.Input("ckpt_name", options=checkpoint_names(),
                               tooltip="An SDXL-family checkpoint from models/checkpoints."),
                DatasetType.Input("dataset"),
                OptimizerType.Input("optimizer"),
                io.Int.Input("rank", default=16, min=1, max=256),
                io.Float.Input("alpha", default=0.0, min=0.0, max=256.0, step=0.5, tooltip="0 = equal to rank."),
                io.Int.Input("conv_rank", default=0, min=0, max=256, tooltip="> 0 adds LoCon 3x3 conv LoRA."),
                io.Float.Input("conv_alpha", default=1.0, min=0.0, max=256.0, step=0.5),
                io.Boolean.Input("train_text_encoder", default=False),
                io.Int.Input("steps", default=1000, min=1, max=1000000),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("grad_accum", default=1, min=1, max=1024),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="auto: bf16 (or fp16) on a GPU, fp32 on the CPU."),
                io.Boolean.Input("gradient_checkpointing", default=True),
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=False),
                io.Boolean.Input("auto_stop", default=False,
                                 tooltip="Stop (and save) when the optimizer signals should_stop."),
                io.Int.Input("save_every", default=0, min=0, max=1000000, tooltip="0 = only the final LoRA."),
                io.String.Input("output_name", default="emolora"),
            ],
            outputs=[
                io.String.Output("lora_name", display_name="lora_name"),
                io.Image.Output("telemetry", display_name="telemetry"),
                io.String.Output("run_dir", display_name="run_dir"),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # training is the point (the LoRA file): a graph with only the trainer runs
        )

    @classmethod
    def execute(cls, ckpt_name, dataset, optimizer, rank, alpha, conv_rank, conv_alpha, train_text_encoder, steps,
                batch_size, grad_accum, precision, gradient_checkpointing, seed, auto_stop, save_every,
                output_name) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils
        import folder_paths

        from .plot import telemetry_image

        node_id = cls.hidden.unique_id
        try:
            checkpoint = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        except FileNotFoundError as e:
            raise EmoLoRAError(f"EmoLoRA Trainer: checkpoint not found: {ckpt_name} ({e})") from None
        lora_dir = folder_paths.get_folder_paths("loras")[0]
        work = os.path.join(folder_paths.get_output_directory(), "emolora")
        free_comfy_models()
        bar = comfy.utils.ProgressBar(int(steps), node_id=node_id)
        options = {"rank": int(rank), "alpha": float(alpha) if alpha > 0 else None, "conv_rank": int(conv_rank),
                   "conv_alpha": float(conv_alpha), "train_text_encoder": bool(train_text_encoder),
                   "steps": int(steps), "batch_size": int(batch_size), "grad_accum": int(grad_accum),
                   "mixed_precision": PRECISIONS[precision], "gradient_checkpointing": bool(gradient_checkpointing),
                   "seed": int(seed), "auto_stop": "stop" if auto_stop else "mark", "save_every": int(save_every)}
        if train_text_encoder:
            options["cache_text"] = "off"  # cached text-encoder outputs cannot train the text encoders
        out = run_training(checkpoint=checkpoint, dataset=dataset, optimizer=optimizer, lora_dir=lora_dir,
                           runs_dir=os.path.join(work, "runs"), cache_dir=os.path.join(work, "cache"),
                           output_name=output_name, node_id=node_id, device=comfy_device(),
                           progress=lambda s, t: bar.update_absolute(s, t),
                           check_cancel=comfy.model_management.throw_exception_if_processing_interrupted, **options)
        image = telemetry_image(out["run_dir"])
        text = (f"{out['lora_name']}: {out['steps_done']} steps ({out['stop_reason']})\nrun: {out['run_dir']}")
        return io.NodeOutput(out["lora_name"], image, out["run_dir"], ui=ui.PreviewText(text))
