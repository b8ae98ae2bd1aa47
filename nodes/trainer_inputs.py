"""Every widget the training nodes offer, in one table: the compact Trainer shows TRAINER_WIDGETS, the Training
Options node everything else, the legacy Trainer (the v0.1.0 node, kept so saved workflows load) all of them in
their v0.1.0 order. A new option is one line in WIDGETS (it lands on the Options node and, appended, on the
legacy node) plus, only when its config key or value differs from the widget's, one entry in
training.WIDGET_TO_CONFIG."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.config import CHOICES
from ._common import checkpoint_names, describe_settings, lora_names, training_presets
from .training import NETWORKS, NO_LORA, NO_PRESET, NO_RESUME, PRECISIONS, resume_choices

OFFLOAD_CHOICES = ("none", "blocks", *(f"blocks:{n}" for n in range(1, 7)))  # SDXL's UNet has 7 blocks


def _preset_tooltip() -> str:
    lines = ["A training preset (presets/), merged as the CLI's --preset: the values below unless this node, the "
             "Training Options node or the Dataset node sets them (picking one fills those widgets with the "
             "preset's values)."]
    lines += [f"{name}: {describe_settings(p['settings'])}" for name, p in training_presets().items()]
    return "\n".join(lines)


def work_dir() -> str:
    """<ComfyUI output>/emolora: the runs and caches of the node's runs."""
    import os

    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), "emolora")


def _resume_options() -> list[str]:
    """none, then the unfinished runs under the node's runs folder (their step, optimizer and how they ended)."""
    import os

    try:
        runs = os.path.join(work_dir(), "runs")
    except Exception:  # outside ComfyUI (unit tests)
        return [NO_RESUME]
    return [NO_RESUME, *resume_choices(runs)]


def _gpus(optional: bool):
    """Offered only when more than one CUDA device is visible: > 1 trains under torchrun in a child process, one GPU
    per process (trainer/launch.py), followed like an in-process run."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return None
    return io.Int.Input("gpus", default=1, min=1, max=n, optional=optional,
                        tooltip="GPUs to train on (torchrun, one process each); the global batch is batch_size x "
                                "gpus x grad_accum.")


# name -> factory(optional) -> io input (or None: not offered on this machine). Insertion order is the order on
# the Options node; widget defaults are TrainConfig's, so an untouched Options node trains as no Options node.
WIDGETS = {
    "ckpt_name": lambda o: io.Combo.Input("ckpt_name", options=checkpoint_names(), optional=o,
                                          tooltip="An SDXL-family checkpoint from models/checkpoints."),
    "preset": lambda o: io.Combo.Input("preset", options=[NO_PRESET, *training_presets()], default=NO_PRESET,
                                       optional=o, tooltip=_preset_tooltip()),
    "network": lambda o: io.Combo.Input("network", options=list(NETWORKS), default="lora", optional=o,
                                        tooltip="lora (LoCon with conv_rank > 0), loha (LyCORIS Hadamard), lokr "
                                                "(LyCORIS Kronecker), oft (LyCORIS Diag-OFT) or boft "
                                                "(butterfly OFT)."),
    "dora": lambda o: io.Boolean.Input("dora", default=False, optional=o,
                                       tooltip="Weight-decomposed LoRA (DoRA); network lora only."),
    "rslora": lambda o: io.Boolean.Input("rslora", default=False, optional=o,
                                         tooltip="Rank-stabilised scale alpha/sqrt(rank)."),
    "rank": lambda o: io.Int.Input("rank", default=16, min=1, max=256, optional=o),
    "alpha": lambda o: io.Float.Input("alpha", default=0.0, min=0.0, max=256.0, step=0.5, optional=o,
                                      tooltip="0 = equal to rank."),
    "conv_rank": lambda o: io.Int.Input("conv_rank", default=0, min=0, max=256, optional=o,
                                        tooltip="> 0 adds 3x3 conv layers (LoCon)."),
    "conv_alpha": lambda o: io.Float.Input("conv_alpha", default=1.0, min=0.0, max=256.0, step=0.5, optional=o),
    "train_text_encoder": lambda o: io.Boolean.Input("train_text_encoder", default=False, optional=o),
    "network_weights": lambda o: io.Combo.Input("network_weights", options=[NO_LORA, *lora_names()],
                                                default=NO_LORA, optional=o,
                                                tooltip="Continue an existing LoRA/LoHa/LoKr from the loras folder "
                                                        "(ours, kohya's or LyCORIS's); none = start fresh."),
    "steps": lambda o: io.Int.Input("steps", default=1000, min=1, max=1000000, optional=o),
    "batch_size": lambda o: io.Int.Input("batch_size", default=1, min=1, max=64, optional=o),
    "grad_accum": lambda o: io.Int.Input("grad_accum", default=1, min=1, max=1024, optional=o),
    "precision": lambda o: io.Combo.Input("precision", options=list(PRECISIONS), default="auto", optional=o,
                                          tooltip="auto: bf16 (or fp16) on a GPU, fp32 on the CPU."),
    "gradient_checkpointing": lambda o: io.Boolean.Input("gradient_checkpointing", default=True, optional=o),
    "seed": lambda o: io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=False,
                                   optional=o),
    "auto_stop": lambda o: io.Boolean.Input("auto_stop", default=False, optional=o,
                                            tooltip="Stop (and save) when the optimizer signals should_stop."),
    "save_every": lambda o: io.Int.Input("save_every", default=0, min=0, max=1000000, optional=o,
                                         tooltip="0 = only the final LoRA."),
    "sample_prompts": lambda o: io.String.Input("sample_prompts", default="", multiline=True, optional=o,
                                                tooltip="Preview prompts, one per line; each set appears on the "
                                                        "node as it is made and the last set is the samples "
                                                        "output."),
    "sample_every": lambda o: io.Int.Input("sample_every", default=0, min=0, max=1000000, optional=o,
                                           tooltip="Steps between previews; 0 = none."),
    "sample_size": lambda o: io.Int.Input("sample_size", default=0, min=0, max=4096, step=32, optional=o,
                                          tooltip="Preview width and height; 0 = the training resolution."),
    "sample_steps": lambda o: io.Int.Input("sample_steps", default=20, min=1, max=200, optional=o),
    "output_name": lambda o: io.String.Input("output_name", default="emolora", optional=o),
    "auto_stop_on": lambda o: io.Combo.Input("auto_stop_on", options=list(CHOICES["auto_stop_on"]),
                                             default="should_stop", optional=o,
                                             tooltip="What auto_stop acts on: the optimizer's should_stop, or a "
                                                     "validation loss (the Dataset node's validation images) "
                                                     "without a new minimum for val_patience checks."),
    "validation_every": lambda o: io.Int.Input("validation_every", default=0, min=0, max=1000000, optional=o,
                                               tooltip="Steps between validation losses when the dataset has "
                                                       "validation images; 0 = every 50 steps."),
    "val_patience": lambda o: io.Int.Input("val_patience", default=5, min=1, max=1000, optional=o,
                                           tooltip="val-plateau: validations without a new minimum before "
                                                   "stopping."),
    "compile": lambda o: io.Boolean.Input("compile", default=False, optional=o,
                                          tooltip="torch.compile the UNet's transformer blocks: a slower start, "
                                                  "faster steps on a GPU."),
    "tucker": lambda o: io.Boolean.Input("tucker", default=False, optional=o,
                                         tooltip="Tucker cores for the 3x3 conv layers (LyCORIS use_tucker); needs "
                                                 "conv_rank > 0, network lora or loha."),
    "oft_rescale": lambda o: io.Boolean.Input("oft_rescale", default=False, optional=o,
                                              tooltip="network boft: also train LyCORIS's per-channel rescale."),
    # low VRAM (docs/low-vram.md)
    "base_dtype": lambda o: io.Combo.Input("base_dtype", options=list(CHOICES["base_dtype"]), default="auto",
                                           optional=o,
                                           tooltip="How the frozen UNet's Linear/Conv weights are held. fp8: float8 "
                                                   "with a per-tensor scale, upcast layer by layer (about half the "
                                                   "weight memory of bf16). auto: fp8 for an fp8 checkpoint, else "
                                                   "the precision's dtype."),
    "offload": lambda o: io.Combo.Input("offload", options=list(OFFLOAD_CHOICES), default="none", optional=o,
                                        tooltip="Stream the UNet's down/mid/up blocks from host memory to the GPU as "
                                                "they run: blocks = all 7, blocks:N = the N largest. Less VRAM, "
                                                "slower steps; saves nothing on the CPU."),
    "optimizer_loss": lambda o: io.Combo.Input("optimizer_loss", options=list(CHOICES["optimizer_loss"]),
                                               default="raw", optional=o,
                                               tooltip="The loss handed to the optimizer: raw, normalized (divided "
                                                       "by a running mean of the loss at the step's timesteps) or "
                                                       "withheld (step() without it, as other trainers call it)."),
    "gpus": _gpus,
    # On the Trainer (optional): continue an unfinished run of this node's output folder.
    "resume": lambda o: io.Combo.Input("resume", options=_resume_options(), default=NO_RESUME, optional=True,
                                       tooltip="Continue a stopped, cancelled or interrupted run exactly where its "
                                               "last state was saved (step, optimizer state, data order), into its "
                                               "own LoRA file. Settings that decide the result must match the "
                                               "run's; steps, saves, samples and stop rules may change. Refresh (R) "
                                               "to list new runs."),
}

# What a first LoRA needs, on the Trainer itself (with its dataset and optimizer sockets), in this order.
TRAINER_WIDGETS = ("ckpt_name", "preset", "network", "rank", "steps", "sample_prompts", "sample_every",
                   "output_name")
TRAINER_OPTIONAL = ("resume",)  # on the Trainer too, below the options socket
OPTION_WIDGETS = tuple(name for name in WIDGETS if name not in (*TRAINER_WIDGETS, *TRAINER_OPTIONAL))

# The v0.1.0 Trainer's widgets in their order: UI workflows store widget values by position, so this order and
# which of them were required are frozen. Inputs added later are appended (optional) after these.
LEGACY_REQUIRED = ("ckpt_name", "preset", "network", "dora", "rslora", "rank", "alpha", "conv_rank", "conv_alpha",
                   "train_text_encoder", "network_weights", "steps", "batch_size", "grad_accum", "precision",
                   "gradient_checkpointing", "seed", "auto_stop", "save_every", "sample_prompts", "sample_every",
                   "sample_size", "sample_steps", "output_name")
LEGACY_OPTIONAL = ("auto_stop_on", "validation_every", "val_patience", "compile", "tucker", "gpus")


def inputs(names, optional: bool) -> list:
    return [w for w in (WIDGETS[name](optional) for name in names) if w is not None]


def legacy_inputs() -> list:
    later = [n for n in WIDGETS if n not in LEGACY_REQUIRED and n not in LEGACY_OPTIONAL]
    return [*inputs(LEGACY_REQUIRED, False), *inputs((*LEGACY_OPTIONAL, *later), True)]
