"""EmoLoRA Optimizer Sweep: train the same LoRA with several optimizers on the user's data (one model load), rank
them by the held-out validation loss, and hand the winner to the Trainer node (see sweep_run.py for the logic and
the Cancel contract)."""

from __future__ import annotations

import logging
import os

from comfy_api.latest import io, ui

from ._common import CATEGORY, PREFIX, EmoLoRAError, checkpoint_names
from .dataset import DatasetType
from .optimizer import OptimizerType
from .sweep_run import LOSS_MODES, image_tensor, report_text, run_sweep_node, sweep_stem, unique_sweep_dir
from .training import comfy_device, free_comfy_models

log = logging.getLogger("emolora.nodes")


class EmoLoRASweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "Sweep",
            display_name="EmoLoRA Optimizer Sweep",
            category=CATEGORY,
            description="Train a short LoRA with each optimizer on your images (same seed, data order, noise and "
                        "timesteps; each at its own recommended LR), rank them by the loss of held-out validation "
                        "images, and output the winner for the Trainer node. With loss_control, each optimizer "
                        "that reads the loss also runs without it, as other trainers call it. Without a validation "
                        "share in the Dataset node, 20% of the images are held out. Cancel stops at the next step; "
                        "what finished stays in the sweep folder.",
            inputs=[
                io.Combo.Input("ckpt_name", options=checkpoint_names(),
                               tooltip="An SDXL-family checkpoint from models/checkpoints."),
                DatasetType.Input("dataset"),
                io.String.Input("optimizers", default="EmoNavi,EmoSens,AdamW",
                                tooltip="A comma list of optimizer names, or 'all', or 'emo' (the Emo family)."),
                io.Int.Input("steps", default=300, min=1, max=1000000, tooltip="Training steps of each run."),
                io.Boolean.Input("loss_control", default=False,
                                 tooltip="Also run each optimizer that reads the loss with the loss withheld "
                                         "(step() without it, as kohya/diffusers/OneTrainer call it)."),
                io.Int.Input("seeds", default=1, min=1, max=16,
                             tooltip="Repeat every run with this many seeds; with 2 or more the recommendation "
                                     "says 'no clear winner' when the margin is inside the seed spread."),
                # ---- sweep options (issue 16): candidates for the EmoLoRA Training Options node at merge time
                io.Combo.Input("optimizer_loss", options=list(LOSS_MODES), default="raw", optional=True,
                               tooltip="What the optimizers are handed: the raw step loss, the loss normalized by "
                                       "its running mean per timestep range, or both (two runs each)."),
                io.Int.Input("rank", default=16, min=1, max=256, optional=True),
                io.Int.Input("batch_size", default=1, min=1, max=64, optional=True),
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=False, optional=True,
                             tooltip="The first seed (the others count up from it)."),
                io.String.Input("sweep_name", default="sweep", optional=True,
                                tooltip="Folder name under output/emolora/sweeps (a counter is added)."),
            ],
            outputs=[
                OptimizerType.Output("optimizer_spec", display_name="optimizer"),
                io.Image.Output("chart", display_name="chart"),
                io.String.Output("table", display_name="table"),
                io.String.Output("sweep_dir", display_name="sweep_dir"),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # the sweep folder is the point: a graph with only the sweep runs
        )

    @classmethod
    def execute(cls, ckpt_name, dataset, optimizers, steps, loss_control, seeds, optimizer_loss="raw", rank=16,
                batch_size=1, seed=42, sweep_name="sweep") -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils
        import folder_paths

        node_id = cls.hidden.unique_id
        try:
            checkpoint = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        except FileNotFoundError as e:
            raise EmoLoRAError(f"EmoLoRA Optimizer Sweep: not found: {e}") from None
        work = os.path.join(folder_paths.get_output_directory(), "emolora")
        folder = unique_sweep_dir(os.path.join(work, "sweeps"), sweep_stem(sweep_name))
        free_comfy_models()
        bar = comfy.utils.ProgressBar(1, node_id=node_id)

        def progress(value, total):  # each update is ComfyUI's interrupt check too
            bar.update_absolute(value, total)

        out = run_sweep_node(checkpoint=checkpoint, dataset=dataset, optimizers=optimizers, steps=int(steps),
                             loss_control=bool(loss_control), seeds=int(seeds), sweep_dir=folder,
                             cache_dir=os.path.join(work, "cache"), node_id=node_id, progress=progress,
                             interrupted=mm.processing_interrupted, device=comfy_device(),
                             optimizer_loss=optimizer_loss or "raw", rank=int(rank), batch_size=int(batch_size),
                             seed=int(seed))
        text = report_text(out)
        if out["cancel"] is not None or out["status"] != "finished":
            log.warning("EmoLoRA Optimizer Sweep cancelled:\n%s", text)
            if out["cancel"] is not None:
                try:
                    raise type(out["cancel"])()
                except TypeError:
                    raise out["cancel"] from None
            mm.throw_exception_if_processing_interrupted()
            raise EmoLoRAError(f"EmoLoRA Optimizer Sweep: stopped after {out['done']} of {out['total']} runs; "
                               f"results so far in {out['output_dir']}")
        if out["spec"] is None:
            raise EmoLoRAError(f"EmoLoRA Optimizer Sweep: {out['recommendation']}; see {out['output_dir']}/sweep.md")
        return io.NodeOutput(out["spec"], image_tensor(out["png_path"]), text, out["output_dir"],
                             ui=ui.PreviewText(text))
