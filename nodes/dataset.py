"""EmoLoRA Dataset: a kohya-style folder, or ComfyUI IMAGE batches with captions; resolution and bucket options.
Scans right away so the image count and the skipped files show on the node before any model is loaded."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..trainer.config import CHOICES
from ._common import CATEGORY, DATASET_TYPE, PREFIX
from .dataset_spec import build_dataset, describe

DatasetType = io.Custom(DATASET_TYPE)


class EmoLoRADataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "Dataset",
            display_name="EmoLoRA Dataset",
            category=CATEGORY,
            description="Training images: a folder (kohya conventions: N_name subfolders for repeats, .txt/.caption "
                        "captions) or IMAGE batches with captions. Shows the image count and the skipped files.",
            inputs=[
                io.String.Input("folder", default="", tooltip="Absolute path, or relative to ComfyUI's input "
                                                               "folder. Ignored when images are connected."),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=64,
                             tooltip="Training side length (bucket area = resolution^2); SDXL is trained at 1024."),
                io.Boolean.Input("enable_buckets", default=True, tooltip="Aspect-ratio buckets."),
                io.Int.Input("bucket_step", default=64, min=32, max=256, step=32),
                io.Int.Input("default_repeats", default=1, min=1, max=1000,
                             tooltip="Repeats for images outside an N_name folder."),
                io.Boolean.Input("flip_aug", default=False),
                io.Image.Input("images", optional=True, tooltip="IMAGE batch to train on instead of a folder."),
                io.String.Input("captions", optional=True, multiline=True, default="",
                                tooltip="With images: one caption per line (one per image), or one for all."),
                io.Combo.Input("mask", options=list(CHOICES["mask"]), default="off", optional=True,
                               tooltip="Masked loss: file = <name>_mask.png beside each image (white trains, black "
                                       "is ignored), alpha = the image's alpha channel."),
                io.Float.Input("validation_split", default=0.0, min=0.0, max=0.5, step=0.05, optional=True,
                               tooltip="Share of the images held out of training for a validation loss (fixed "
                                       "noise and timesteps, comparable across runs); 0 = none."),
                io.String.Input("validation_folder", default="", optional=True,
                                tooltip="A folder of validation images instead of a split (absolute, or relative "
                                        "to ComfyUI's input folder)."),
                io.String.Input("reg_folder", default="", optional=True,
                                tooltip="Regularization (class) images, kohya's layout (N_class folders; absolute, "
                                        "or relative to ComfyUI's input folder): each epoch trains as many of them "
                                        "as training samples. Empty = none."),
                io.Float.Input("prior_loss_weight", default=1.0, min=0.0, max=10.0, step=0.05, optional=True,
                               tooltip="The loss weight of a regularization image (kohya's prior_loss_weight)."),
            ],
            outputs=[DatasetType.Output("dataset", display_name="dataset"),
                     io.Int.Output("image_count", display_name="image_count")],
        )

    @classmethod
    def execute(cls, folder, resolution, enable_buckets, bucket_step, default_repeats, flip_aug, images=None,
                captions="", mask="off", validation_split=0.0, validation_folder="", reg_folder="",
                prior_loss_weight=1.0) -> io.NodeOutput:
        spec = build_dataset(folder, resolution, enable_buckets, bucket_step, default_repeats, flip_aug,
                             images=images, captions=captions or "", mask=mask or "off",
                             validation_split=float(validation_split or 0.0),
                             validation_folder=validation_folder or "", reg_folder=reg_folder or "",
                             prior_loss_weight=1.0 if prior_loss_weight is None else float(prior_loss_weight))
        return io.NodeOutput(spec, spec.images, ui=ui.PreviewText(describe(spec)))
