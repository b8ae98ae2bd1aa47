"""The Dataset node's logic, free of ComfyUI imports (unit-testable): a folder or an IMAGE batch -> a scanned,
validated DatasetSpec."""

from __future__ import annotations

import hashlib
import os

from ._common import DatasetSpec, EmoLoRAError, fail, freeze_settings, resolve_input_path


def images_to_folder(images, captions: str, root: str) -> str:
    """Write an IMAGE batch [B,H,W,C] float 0..1 as PNG + .txt captions into a content-addressed folder."""
    import numpy as np
    from PIL import Image

    arr = (images.detach().cpu().float().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    lines = [c.strip() for c in (captions or "").splitlines() if c.strip()]
    if len(lines) not in (0, 1, arr.shape[0]):
        raise EmoLoRAError(f"EmoLoRA Dataset: {arr.shape[0]} images but {len(lines)} caption lines; give one "
                           "caption per image (one per line), a single caption for all, or none")
    digest = hashlib.sha256(arr.tobytes() + "\n".join(lines).encode()).hexdigest()[:16]
    folder = os.path.join(root, f"images-{digest}")
    if os.path.isfile(os.path.join(folder, ".complete")):
        return folder
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(arr):
        if img.shape[-1] == 1:
            img = img[..., 0]
        Image.fromarray(img[..., :3] if img.ndim == 3 else img).save(os.path.join(folder, f"{i:05d}.png"))
        caption = lines[i] if len(lines) == arr.shape[0] else (lines[0] if lines else "")
        with open(os.path.join(folder, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
            f.write(caption)
    open(os.path.join(folder, ".complete"), "w").close()
    return folder


def build_dataset(folder: str, resolution: int, enable_buckets: bool, bucket_step: int, default_repeats: int,
                  flip_aug: bool, images=None, captions: str = "", images_root: str | None = None, mask: str = "off",
                  validation_split: float = 0.0, validation_folder: str = "", reg_folder: str = "",
                  prior_loss_weight: float = 1.0) -> DatasetSpec:
    """mask: masked loss ("file": <stem>_mask.png beside each image, "alpha": the image's alpha channel);
    validation_split / validation_folder: images held out for the validation loss (a share, or a folder);
    reg_folder / prior_loss_weight: regularization images (kohya's reg_data_dir) and their loss weight."""
    from ..trainer.config import ConfigError, TrainConfig
    from ..trainer.data import DatasetError, scan_dataset, split_validation

    if images is not None:
        if images_root is None:
            import folder_paths

            images_root = os.path.join(folder_paths.get_temp_directory(), "emolora_datasets")
        path = images_to_folder(images, captions, images_root)
    else:
        if not folder or not folder.strip():
            raise EmoLoRAError("EmoLoRA Dataset: give a folder (absolute, or relative to ComfyUI's input folder) "
                               "or connect IMAGE batches")
        path = resolve_input_path(folder)
    settings = {"resolution": int(resolution), "enable_buckets": bool(enable_buckets),
                "bucket_step": int(bucket_step), "default_repeats": int(default_repeats), "flip_aug": bool(flip_aug),
                "mask": mask, "validation_split": float(validation_split)}
    if validation_folder and validation_folder.strip():
        settings["validation_data"] = str(resolve_input_path(validation_folder))
    if reg_folder and reg_folder.strip():
        settings.update(reg_data=str(resolve_input_path(reg_folder)), prior_loss_weight=float(prior_loss_weight))
    try:
        TrainConfig(**settings).validate(require_paths=False)
        items, report = scan_dataset(path, default_repeats=int(default_repeats), mask=mask)
        if settings.get("validation_data"):  # a bad validation folder fails here, before the Trainer runs
            held = len(scan_dataset(settings["validation_data"], mask=mask)[0])
        else:
            held = len(split_validation(items, settings["validation_split"], 0)[1])  # the count, whatever the seed
        reg = 0
        if settings.get("reg_data"):  # a missing or empty reg folder fails here, before the Trainer runs
            try:
                reg = len(scan_dataset(settings["reg_data"], mask=mask)[0])
            except DatasetError as e:
                raise DatasetError(f"reg_folder: {e}".replace("data folder", "regularization folder")) from None
    except (ConfigError, DatasetError) as e:
        raise fail("Dataset", e) from None
    skipped = tuple(f"{line.path}: {line.reason}" for line in report.lines if line.action == "skipped")
    return DatasetSpec(folder=str(path), images=len(items), samples_per_epoch=report.samples_per_epoch,
                       skipped=skipped, settings=freeze_settings(settings), validation_images=held, reg_images=reg)


def describe(spec: DatasetSpec) -> str:
    text = f"{spec.images} images ({spec.samples_per_epoch} samples per epoch) in {spec.folder}"
    settings = spec.overrides()
    if settings.get("validation_data"):
        text += f"\nvalidation: {spec.validation_images} images in {settings['validation_data']}"
    elif spec.validation_images:
        text += f"\nvalidation: {spec.validation_images} of these held out of training"
    if settings.get("reg_data"):
        text += (f"\nregularization: {spec.reg_images} images in {settings['reg_data']}, loss weight "
                 f"{settings.get('prior_loss_weight', 1.0):g}")
    if settings.get("mask", "off") != "off":
        text += f"\nmasked loss: {'<name>_mask.png files' if settings['mask'] == 'file' else 'alpha channel'}"
    if spec.skipped:
        text += f"\nskipped {len(spec.skipped)}:\n" + "\n".join(spec.skipped[:50])
        if len(spec.skipped) > 50:
            text += f"\n... and {len(spec.skipped) - 50} more"
    else:
        text += "\nskipped: none"
    return text
