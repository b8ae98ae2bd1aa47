"""EmoLoRA Trainer: trains an SDXL LoRA in-process with the trainer core and saves it into ComfyUI's loras folder
(see training.py for the host contract: inference mode, ProgressBar as the interrupt check, telemetry events)."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ..trainer.config import CHOICES
from ._common import (
    CATEGORY,
    PREFIX,
    EmoLoRAError,
    checkpoint_names,
    describe_settings,
    lora_names,
    training_presets,
)
from .dataset import DatasetType
from .optimizer import OptimizerType
from .previews import PREVIEW_MAX, to_image_batch
from .training import (
    NETWORKS,
    NO_RESUME,
    PRECISIONS,
    comfy_device,
    free_comfy_models,
    preset_status,
    resume_choices,
    result_text,
    resume_run_dir,
    run_training,
)

NO_PRESET = "none"
NO_LORA = "none"
OFFLOAD_CHOICES = ("none", "blocks", *(f"blocks:{n}" for n in range(1, 7)))  # SDXL's UNet has 7 blocks


def _work_dir() -> str:
    """<ComfyUI output>/emolora: the runs and caches of the node's runs."""
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), "emolora")


def _resume_options() -> list[str]:
    try:
        runs = os.path.join(_work_dir(), "runs")
    except Exception:  # outside ComfyUI (unit tests)
        return [NO_RESUME]
    return [NO_RESUME, *resume_choices(runs)]


def _preset_tooltip() -> str:
    lines = ["A training preset (presets/), merged as the CLI's --preset: the values below unless this node or the "
             "Dataset node sets them (picking one fills those widgets with the preset's values)."]
    lines += [f"{name}: {describe_settings(p['settings'])}" for name, p in training_presets().items()]
    return "\n".join(lines)


def _gpus_input() -> list:
    """The gpus input, offered only when more than one CUDA device is visible: > 1 trains under torchrun in a
    child process, one GPU per process (trainer/launch.py), followed like an in-process run."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return []
    return [io.Int.Input("gpus", default=1, min=1, max=n, optional=True,
                         tooltip="GPUs to train on (torchrun, one process each); the global batch is batch_size x "
                                 "gpus x grad_accum.")]


class EmoLoRATrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "Trainer",
            display_name="EmoLoRA Trainer (SDXL)",
            category=CATEGORY,
            description="Train an SDXL LoRA (or LoHa/LoKr/OFT/BOFT) with an Emo optimizer. Frees ComfyUI's loaded "
                        "models first. Cancel stops gracefully and the LoRA so far is saved. The LoRA goes to the "
                        "loras folder (kohya/LyCORIS keys), so LoraLoader lists it. Sample previews appear on the "
                        "node while it trains.",
            inputs=[
                io.Combo.Input("ckpt_name", options=checkpoint_names(),
                               tooltip="An SDXL-family checkpoint from models/checkpoints."),
                DatasetType.Input("dataset"),
                OptimizerType.Input("optimizer"),
                io.Combo.Input("preset", options=[NO_PRESET, *training_presets()], default=NO_PRESET,
                               tooltip=_preset_tooltip()),
                io.Combo.Input("network", options=list(NETWORKS), default="lora",
                               tooltip="lora (LoCon with conv_rank > 0), loha (LyCORIS Hadamard), lokr "
                                       "(LyCORIS Kronecker), oft (LyCORIS Diag-OFT: rank is its block layout) or "
                                       "boft (butterfly OFT; on SDXL rank >= 10). OFT/BOFT ignore alpha."),
                io.Boolean.Input("dora", default=False, tooltip="Weight-decomposed LoRA (DoRA); network lora only."),
                io.Boolean.Input("rslora", default=False, tooltip="Rank-stabilised scale alpha/sqrt(rank)."),
                io.Int.Input("rank", default=16, min=1, max=256),
                io.Float.Input("alpha", default=0.0, min=0.0, max=256.0, step=0.5, tooltip="0 = equal to rank."),
                io.Int.Input("conv_rank", default=0, min=0, max=256, tooltip="> 0 adds 3x3 conv layers (LoCon)."),
                io.Float.Input("conv_alpha", default=1.0, min=0.0, max=256.0, step=0.5),
                io.Boolean.Input("train_text_encoder", default=False),
                io.Combo.Input("network_weights", options=[NO_LORA, *lora_names()], default=NO_LORA,
                               tooltip="Continue an existing LoRA/LoHa/LoKr from the loras folder (ours, kohya's "
                                       "or LyCORIS's); none = start fresh."),
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
                io.String.Input("sample_prompts", default="", multiline=True,
                                tooltip="Preview prompts, one per line; each set appears on the node as it is "
                                        "made and the last set is the samples output."),
                io.Int.Input("sample_every", default=0, min=0, max=1000000,
                             tooltip="Steps between previews; 0 = none."),
                io.Int.Input("sample_size", default=0, min=0, max=4096, step=32,
                             tooltip="Preview width and height; 0 = the training resolution."),
                io.Int.Input("sample_steps", default=20, min=1, max=200),
                io.String.Input("output_name", default="emolora"),
                io.Combo.Input("auto_stop_on", options=list(CHOICES["auto_stop_on"]), default="should_stop",
                               optional=True,
                               tooltip="What auto_stop acts on: the optimizer's should_stop, or a validation loss "
                                       "(the Dataset node's validation images) without a new minimum for "
                                       "val_patience checks."),
                io.Int.Input("validation_every", default=0, min=0, max=1000000, optional=True,
                             tooltip="Steps between validation losses when the dataset has validation images; "
                                     "0 = every 50 steps."),
                io.Int.Input("val_patience", default=5, min=1, max=1000, optional=True,
                             tooltip="val-plateau: validations without a new minimum before stopping."),
                io.Boolean.Input("compile", default=False, optional=True,
                                 tooltip="torch.compile the UNet's transformer blocks: a slower start, faster steps "
                                         "on a GPU."),
                io.Boolean.Input("tucker", default=False, optional=True,
                                 tooltip="Tucker cores for the 3x3 conv layers (LyCORIS use_tucker); needs "
                                         "conv_rank > 0, network lora or loha."),
                # ---- low VRAM (issue 17): for the lead to move into the Training Options node
                io.Combo.Input("base_dtype", options=list(CHOICES["base_dtype"]), default="auto", optional=True,
                               tooltip="How the frozen UNet's Linear/Conv weights are held. fp8: float8 with a "
                                       "per-tensor scale, upcast layer by layer (about half the weight memory of "
                                       "bf16). auto: fp8 for an fp8 checkpoint, else the precision's dtype."),
                io.Combo.Input("offload", options=list(OFFLOAD_CHOICES), default="none", optional=True,
                               tooltip="Stream the UNet's down/mid/up blocks from host memory to the GPU as they "
                                       "run: blocks = all 7, blocks:N = the N largest. Less VRAM, slower steps; "
                                       "saves nothing on the CPU."),
                # OFT/BOFT (issue 18)
                io.Boolean.Input("oft_rescale", default=False, optional=True,
                                 tooltip="network boft: also train LyCORIS's per-channel rescale."),
                *_gpus_input(),
                # ---- resume (issue 18): continue an unfinished run of this node's output folder
                io.Combo.Input("resume", options=_resume_options(), default=NO_RESUME, optional=True,
                               tooltip="Continue a stopped, cancelled or interrupted run exactly where its last "
                                       "state was saved (step, optimizer state, data order), into its own LoRA "
                                       "file. Settings that decide the result must match the run's; steps, "
                                       "saves, samples and stop rules may change. Refresh (R) to list new runs."),
            ],
            outputs=[
                io.String.Output("lora_name", display_name="lora_name"),
                io.Image.Output("telemetry", display_name="telemetry"),
                io.String.Output("run_dir", display_name="run_dir"),
                io.Image.Output("samples", display_name="samples"),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # training is the point (the LoRA file): a graph with only the trainer runs
        )

    @classmethod
    def execute(cls, ckpt_name, dataset, optimizer, preset, network, dora, rslora, rank, alpha, conv_rank,
                conv_alpha, train_text_encoder, network_weights, steps, batch_size, grad_accum, precision,
                gradient_checkpointing, seed, auto_stop, save_every, sample_prompts, sample_every, sample_size,
                sample_steps, output_name, auto_stop_on="should_stop", validation_every=0, val_patience=5,
                compile=False, tucker=False, base_dtype="auto", offload="none", oft_rescale=False, gpus=1,
                resume=NO_RESUME) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils
        import folder_paths

        from .plot import telemetry_image

        node_id = cls.hidden.unique_id
        try:
            checkpoint = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
            weights = None if network_weights in (None, "", NO_LORA) else \
                folder_paths.get_full_path_or_raise("loras", network_weights)
        except FileNotFoundError as e:
            raise EmoLoRAError(f"EmoLoRA Trainer: not found: {e}") from None
        lora_dir = folder_paths.get_folder_paths("loras")[0]
        work = _work_dir()
        resume_dir = resume_run_dir(os.path.join(work, "runs"), resume)
        prompts = [line.strip() for line in (sample_prompts or "").splitlines() if line.strip()]
        options = {"rank": int(rank), "alpha": float(alpha) if alpha > 0 else None, "conv_rank": int(conv_rank),
                   "conv_alpha": float(conv_alpha), "train_text_encoder": bool(train_text_encoder),
                   "steps": int(steps), "batch_size": int(batch_size), "grad_accum": int(grad_accum),
                   "mixed_precision": PRECISIONS[precision], "gradient_checkpointing": bool(gradient_checkpointing),
                   "seed": int(seed), "auto_stop": "stop" if auto_stop else "mark", "save_every": int(save_every),
                   "sample_prompts": prompts, "sample_every": int(sample_every) if prompts else 0,
                   "sample_size": int(sample_size) or None, "sample_steps": int(sample_steps),
                   "network": network, "dora": bool(dora), "rslora": bool(rslora), "network_weights": weights,
                   "auto_stop_on": auto_stop_on or "should_stop", "validation_every": int(validation_every or 0),
                   "val_patience": int(val_patience or 5), "compile": bool(compile), "tucker": bool(tucker),
                   "base_dtype": base_dtype or "auto", "offload": offload or "none",
                   "oft_rescale": bool(oft_rescale)}
        if train_text_encoder:
            options["cache_text"] = "off"  # cached text-encoder outputs cannot train the text encoders
        free_comfy_models()
        bar = comfy.utils.ProgressBar(int(steps), node_id=node_id)

        def progress(step, total, preview=None):  # each update is ComfyUI's interrupt check too
            shown = None if preview is None else ("PNG", preview, min(PREVIEW_MAX, max(preview.size)))  # no upscale
            bar.update_absolute(step, total, shown)

        out = run_training(checkpoint=checkpoint, dataset=dataset, optimizer=optimizer, lora_dir=lora_dir,
                           runs_dir=os.path.join(work, "runs"), cache_dir=os.path.join(work, "cache"),
                           output_name=output_name, node_id=node_id, device=comfy_device(), progress=progress,
                           preset=None if preset == NO_PRESET else preset, gpus=int(gpus or 1), resume=resume_dir,
                           check_cancel=comfy.model_management.throw_exception_if_processing_interrupted, **options)
        cfg = out["config"]
        samples = to_image_batch(out["samples"], fallback_size=cfg.sample_size or 64)
        chosen = None if preset == NO_PRESET else preset
        shown = {**ui.PreviewText(result_text(out, preset_status(chosen, cfg))).as_dict()}
        if out["samples"]:
            shown.update(ui.PreviewImage(samples, cls=cls).as_dict())
        return io.NodeOutput(out["lora_name"], telemetry_image(out["run_dir"]), out["run_dir"], samples, ui=shown)
